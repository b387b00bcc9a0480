"""Group commit of metric batches: more batches than one SQL statement takes, callers that go away."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from runledger.v1 import tracking_pb2, tracking_service_pb2 as tpb, tracking_service_pb2_grpc
from runledger_server.backends.sql import migrate, tracking_store
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.config import Settings
from runledger_server.domain import ids
from runledger_server.domain.errors import NotFound
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import RESUME_GAP, Batch, Series, joined
from runledger_server.embedded import EmbeddedServer
from runledger_server.services.metric_ingest import MetricIngest


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    sqlite_url = f"sqlite:///{tmp_path / 'meta.db'}"
    url = sqlite_url if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    database = Database(url)
    migrate.upgrade(database)
    yield database
    database.dispose()


def test_a_group_of_70000_one_point_batches_is_stored_once(db: Database) -> None:
    store = SqlTrackingStore(db)
    exp = store.create_experiment("tiny-batches", "", {})
    run_id = ids.new_id()
    store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    n = 70_000  # above PostgreSQL's 65,535 parameters per statement (and SQLite's default 32,766)
    batches = [
        Batch(run_id, "w", seq, (Series("loss", np.array([seq]), np.array([seq / 2]), np.array([7])),))
        for seq in range(n)
    ]
    assert store.commit_metric_batches(batches) == [False] * n  # stored
    assert store.commit_metric_batches(batches) == [True] * n  # re-sent: recognised, stored once
    history = joined(SqlTrackingStore(db, chunk_cache_bytes=0).metric_chunks(run_id, "loss", None, None))
    assert history.steps.tolist() == list(range(n)) and history.values[-1] == (n - 1) / 2


def test_a_caller_that_goes_away_does_not_stop_the_group_commit(db: Database) -> None:
    # A stream that ends (or a call whose deadline passes) while its batch waits for the commit cancels the
    # batch's future. The committer must still store the batch and go on committing everyone else's.
    store = SqlTrackingStore(db)
    exp = store.create_experiment("cancelled-callers", "", {})
    run_id = ids.new_id()
    store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    ingest = MetricIngest(store)
    try:

        def batch(seq: int) -> Batch:
            return Batch(run_id, "w", seq, (Series("loss", np.array([seq]), np.array([seq / 2]), np.array([7])),))

        cancelled = 0
        for seq in range(20):
            cancelled += ingest.submit(batch(seq)).cancel()  # pending unless its commit began already
        assert cancelled > 0
        assert ingest.submit(batch(20)).result(timeout=30) is False  # stored, not a duplicate
        assert [ingest.submit(batch(seq)).result(timeout=30) for seq in range(20)] == [True] * 20  # all stored
    finally:
        ingest.close()
    history = joined(SqlTrackingStore(db, chunk_cache_bytes=0).metric_chunks(run_id, "loss", None, None))
    assert history.steps.tolist() == list(range(21))


def test_batches_another_replica_is_storing_at_the_same_moment_settle_as_duplicates(pg_database_url: str) -> None:
    """Two of a group's batches collide with another replica's open transactions, one after the other: the
    group is retried until every batch is settled, instead of failing the group (and other writers with it)."""
    import psycopg
    from sqlalchemy.engine import make_url

    db = Database(pg_database_url)
    migrate.upgrade(db)
    store = SqlTrackingStore(db)
    exp = store.create_experiment("replica-race", "", {})
    run_id = ids.new_id()
    store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    url = make_url(pg_database_url)
    dsn = f"host={url.host} port={url.port} user={url.username} dbname={url.database}"
    other = [psycopg.connect(dsn), psycopg.connect(dsn)]  # the other replica's two group transactions, open
    ingest = MetricIngest(store)
    try:

        def batch(writer: str, seq: int) -> Batch:
            return Batch(run_id, writer, seq, (Series("loss", np.array([seq]), np.array([1.0]), np.array([7])),))

        for conn, seq in zip(other, (1, 2), strict=True):  # the same batches, as that replica records them
            conn.execute(
                "INSERT INTO metric_batches (run_id, writer_id, seq, points, commit_time_us, content_crc) "
                "VALUES (%s, 'w', %s, 1, 0, %s)",
                (run_id, seq, batch("w", seq).checksum()),
            )

        futures = [ingest.submit(batch("w", 1)), ingest.submit(batch("w", 2)), ingest.submit(batch("other", 0))]
        for conn in other:  # our insert waits on each in turn, then collides with its committed row
            time.sleep(0.3)
            conn.commit()
        assert [f.result(30) for f in futures] == [True, True, False]  # two duplicates, one stored here
        history = joined(SqlTrackingStore(db, chunk_cache_bytes=0).metric_chunks(run_id, "loss", None, None))
        assert history.steps.tolist() == [0]  # the other writer's point (the replica stored no chunks for w)
    finally:
        ingest.close()
        for conn in other:
            conn.close()
        db.dispose()


def test_a_resuming_writer_continues_after_the_batches_still_waiting_for_their_commit(settings: Settings) -> None:
    """A job restarted with its writer's ID asks where to continue while its previous incarnation's last batch
    waits for its commit (here: another connection holds SQLite's write lock): the answer waits for that commit
    and counts the batch, instead of handing out its seq again (the new batch would be taken for a duplicate).
    Twenty such questions wait on the event loop, not on the worker pool: other calls are answered meanwhile."""
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = stub.CreateExperiment(tpb.CreateExperimentRequest(display_name="resumed")).name
        run_id = stub.CreateRun(tpb.CreateRunRequest(experiment=exp)).run_id
        series = tracking_pb2.MetricSeries(key="loss", steps=[0], values=[0.5], timestamps_ms=[7])
        blocker = sqlite3.connect(settings.data_dir / "runledger.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with ThreadPoolExecutor(24) as pool:
                last = pool.submit(
                    stub.LogMetrics,
                    tpb.LogMetricsRequest(run_id=run_id, writer_id="rank0", seq=0, series=[series]),
                    timeout=60,
                )
                time.sleep(0.3)  # the batch is queued behind the lock
                where = tpb.GetMetricWriterRequest(run_id=run_id, writer_id="rank0")
                answers = [pool.submit(stub.GetMetricWriter, where, timeout=60) for _ in range(20)]
                time.sleep(0.5)
                assert not last.done() and not any(a.done() for a in answers)  # they wait for the commit
                started = time.monotonic()
                assert stub.GetRun(tpb.GetRunRequest(run_id=run_id), timeout=5).run_id == run_id
                assert time.monotonic() - started < 2
                blocker.execute("COMMIT")
                assert last.result(timeout=60).duplicate is False
                seqs = [a.result(timeout=60).next_seq for a in answers]  # past the batch they waited for
                assert all(seq > 1 and (seq - 1) % RESUME_GAP == 0 for seq in seqs), seqs
        finally:
            if blocker.in_transaction:
                blocker.execute("ROLLBACK")
            blocker.close()


def test_runs_the_store_forgot_are_looked_up_again(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The set of runs known to exist is bounded; past the bound it starts over, and commits stay correct: batches
    of forgotten runs are stored (and re-sent ones are still duplicates), batches of unknown runs refused."""
    monkeypatch.setattr(tracking_store, "KNOWN_RUNS_LIMIT", 2)
    store = SqlTrackingStore(db)
    exp = store.create_experiment("many-runs", "", {})
    run_ids = [ids.new_id() for _ in range(5)]
    for run_id in run_ids:
        store.create_run(run_id, exp.experiment_id, "", {}, {}, Lineage(), None)
    assert len(store._known_runs) <= 2

    def batch(run_id: str) -> Batch:
        return Batch(run_id, "w", 0, (Series("loss", np.array([1]), np.array([0.5]), np.array([7])),))

    assert store.commit_metric_batches([batch(r) for r in run_ids]) == [False] * 5
    assert len(store._known_runs) <= 2
    assert store.commit_metric_batches([batch(r) for r in run_ids]) == [True] * 5
    assert len(store._known_runs) <= 2
    (refused,) = store.commit_metric_batches([batch("no-such-run")])
    assert isinstance(refused, NotFound)


def test_a_stream_gone_quiet_does_not_keep_its_last_batch_in_memory(tmp_path: Path) -> None:
    """The ingest budget is given back when a batch is committed; a stream that then sends nothing more must not
    hold that batch's message (its points, and padding as large as the message limit) until its next one."""
    import threading
    import tracemalloc

    from runledger import wire

    pad = 16 << 20
    streams = 3
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    tracemalloc.start()
    try:
        with (
            EmbeddedServer(settings) as srv,
            grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch,
        ):
            tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="quiet"))
            run_id = tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name)).run_id
            send = ch.stream_stream(
                "/runledger.v1.TrackingService/StreamMetrics",
                request_serializer=lambda b: b,
                response_deserializer=tpb.StreamMetricsResponse.FromString,
            )
            quiet = threading.Event()

            def one_padded_batch(writer: str) -> Iterator[bytes]:
                steps = np.arange(1_000, dtype=np.int64)
                series = wire.encode_series("loss", steps, steps.astype(np.float64), steps)
                yield (
                    wire.length_delimited(1, run_id.encode())
                    + wire.length_delimited(2, writer.encode())
                    + wire.varint_field(3, 0)
                    + wire.length_delimited(4, series)
                    + wire.length_delimited(15, bytes(pad))  # an unknown field: skipped, but part of the message
                )
                quiet.wait(60)  # then nothing more, with the stream left open

            calls = [send(one_padded_batch(f"w{i}")) for i in range(streams)]
            try:
                for call in calls:
                    assert next(call).seq == 0  # committed and acknowledged
                import gc

                gc.collect()
                # What the server's code allocated and still holds (gRPC's client may keep the last request it
                # sent while it waits for the next one: that copy is the client's).
                snapshot = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(True, "*runledger_server*", all_frames=True)]
                )
                held = sum(stat.size for stat in snapshot.statistics("filename"))
                assert held < pad, f"{held / 2**20:.0f} MiB held by {streams} quiet streams"
            finally:
                quiet.set()
                for call in calls:
                    call.cancel()
    finally:
        tracemalloc.stop()
