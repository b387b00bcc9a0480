"""TrackingService against PostgreSQL through the real server: runs, params, exact metric values,
SearchRuns, and two replicas sharing one database (re-sent batches stored once, raced writes serialized)."""

from __future__ import annotations

import contextlib
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from runledger.v1 import common_pb2, tracking_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer
from tests.integration.test_tracking import check_paging_over_long_sort_values, check_pattern_filters
from tests.support import outcome, refusal

pytestmark = pytest.mark.postgres

Stub = tracking_service_pb2_grpc.TrackingServiceStub


@pytest.fixture
def pg_tracking(pg_settings: Settings) -> Iterator[Stub]:
    with EmbeddedServer(pg_settings) as srv, grpc.insecure_channel(srv.address) as ch:
        yield tracking_service_pb2_grpc.TrackingServiceStub(ch)


@pytest.fixture
def replicas(pg_settings: Settings) -> Iterator[tuple[Stub, Stub]]:
    """Two servers on the same PostgreSQL database, each on its own free port."""
    with (
        EmbeddedServer(pg_settings) as a,
        EmbeddedServer(pg_settings) as b,
        grpc.insecure_channel(a.address) as ch_a,
        grpc.insecure_channel(b.address) as ch_b,
    ):
        assert a.port != b.port
        yield tracking_service_pb2_grpc.TrackingServiceStub(ch_a), tracking_service_pb2_grpc.TrackingServiceStub(ch_b)


@contextlib.contextmanager
def _database(postgres_url: str, locale: str, icu_locale: str = "") -> Iterator[str]:
    """The URL of a new database with this locale (or this ICU collation), dropped afterwards."""
    name = f"rl_{uuid.uuid4().hex[:16]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    icu = f" LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'" if icu_locale else ""
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LOCALE '{locale}'{icu}"
            )
        try:
            yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _new_run(stub: Stub, experiment: str = "pg", **kwargs: object) -> tracking_pb2.Run:
    exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name=experiment))
    return stub.CreateRun(pb.CreateRunRequest(experiment=exp.name, **kwargs))  # type: ignore[arg-type]


def _series(key: str, values: list[float], first_step: int = 0) -> tracking_pb2.MetricSeries:
    steps = list(range(first_step, first_step + len(values)))
    return tracking_pb2.MetricSeries(
        key=key, steps=steps, values=values, timestamps_ms=[1_700_000_000_000 + s for s in steps]
    )


def _history(stub: Stub, run_id: str, key: str) -> tuple[list[int], list[float]]:
    steps: list[int] = []
    values: list[float] = []
    for chunk in stub.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run_id, key=key)):
        steps.extend(chunk.steps)
        values.extend(chunk.values)
    return steps, values


def _bits(values: list[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def test_experiment_and_run_round_trip(pg_tracking: Stub) -> None:
    exp = pg_tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="qwen3-sft", tags={"team": "rl"}))
    assert pg_tracking.GetExperiment(pb.GetExperimentRequest(name=exp.name)) == exp
    run = pg_tracking.CreateRun(
        pb.CreateRunRequest(experiment=exp.name, display_name="r0", params={"lr": "2e-5"}, tags={"stage": "sft"})
    )
    got = pg_tracking.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert got.experiment == exp.name
    assert dict(got.params) == {"lr": "2e-5"} and dict(got.tags) == {"stage": "sft"}
    assert got.status == tracking_pb2.RUN_STATUS_RUNNING

    r = refusal(lambda: pg_tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="qwen3-sft")))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS
    listed = pg_tracking.ListExperiments(pb.ListExperimentsRequest())
    assert [e.name for e in listed.experiments] == [exp.name]


def test_params_are_immutable(pg_tracking: Stub) -> None:
    run = _new_run(pg_tracking, params={"lr": "2e-5", "lora_r": "16"})
    same = pg_tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"lr": "2e-5", "seed": "1"}))
    assert dict(same.params) == {"lr": "2e-5", "lora_r": "16", "seed": "1"}

    r = refusal(
        lambda: pg_tracking.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"lr": "3e-5", "warmup": "100"}))
    )
    assert r.code == grpc.StatusCode.ALREADY_EXISTS
    assert r.reason == "PARAM_IMMUTABLE" and r.domain == "runledger"
    assert r.metadata.get("key") == "lr"
    # Nothing of the refused call was stored, not even the new key.
    after = pg_tracking.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert dict(after.params) == {"lr": "2e-5", "lora_r": "16", "seed": "1"}


def test_metric_values_round_trip_bit_exact(pg_tracking: Stub) -> None:
    run = _new_run(pg_tracking)
    values = [0.1, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, -2.5e-300, 1 / 3]
    tails = {"last/nan": math.nan, "last/inf": math.inf, "last/-inf": -math.inf}
    series = [_series("train/loss", values)] + [_series(k, [1.0, v]) for k, v in tails.items()]
    ack = pg_tracking.LogMetrics(pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=0, series=series))
    assert not ack.duplicate

    steps, got = _history(pg_tracking, run.run_id, "train/loss")
    assert steps == list(range(len(values)))
    assert _bits(got) == _bits(values)

    latest = pg_tracking.GetRun(pb.GetRunRequest(run_id=run.run_id)).latest_metrics
    assert latest["train/loss"].step == len(values) - 1 and latest["train/loss"].value == 1 / 3
    assert math.isnan(latest["last/nan"].value) and latest["last/nan"].step == 1
    assert latest["last/inf"].value == math.inf
    assert latest["last/-inf"].value == -math.inf


def _search_all(stub: Stub, page_size: int, **kwargs: str) -> list[str]:
    """Every run ID of a search, page by page."""
    out: list[str] = []
    token = ""
    while True:
        resp = stub.SearchRuns(pb.SearchRunsRequest(page_size=page_size, page_token=token, **kwargs))  # type: ignore[arg-type]
        assert len(resp.runs) <= page_size
        out.extend(r.run_id for r in resp.runs)
        token = resp.next_page_token
        if not token:
            return out


def test_search_runs_filters_order_and_paging(pg_tracking: Stub) -> None:
    exp = pg_tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="sweep"))
    other = pg_tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="other"))
    # (lr, team, eval/acc or None for never logged)
    grid = [
        ("1e-5", "rl", 0.71),
        ("1e-5", "rl", 0.42),
        ("1e-5", "sft", 0.90),
        ("2e-5", "rl", 0.88),
        ("1e-5", "rl", math.inf),
        ("1e-5", "rl", math.nan),
        ("1e-5", "rl", None),
        ("1e-5", "rl", 0.55),
    ]
    ids: list[str] = []
    for i, (lr, team, acc) in enumerate(grid):
        run = pg_tracking.CreateRun(
            pb.CreateRunRequest(experiment=exp.name, display_name=f"r{i}", params={"lr": lr}, tags={"team": team})
        )
        ids.append(run.run_id)
        if acc is not None:
            series = [_series("eval/acc", [0.0, acc])]
            pg_tracking.LogMetrics(pb.LogMetricsRequest(run_id=run.run_id, writer_id="w", seq=0, series=series))
    pg_tracking.CreateRun(pb.CreateRunRequest(experiment=other.name, params={"lr": "1e-5"}, tags={"team": "rl"}))

    query = {
        "experiments": [exp.name],
        "filter": "params.lr = \"1e-5\" AND tags.team = 'rl' AND metrics.`eval/acc` > 0.5",
        "order_by": "metrics.eval/acc DESC",
    }
    # NaN is not greater than 0.5, +Inf is; runs 1 (0.42), 2 (sft), 3 (lr) and 6 (no metric) do not match.
    expected = [ids[4], ids[0], ids[7]]
    assert _search_all(pg_tracking, 100, **query) == expected
    for page_size in (1, 2):
        assert _search_all(pg_tracking, page_size, **query) == expected

    # Without a filter, runs lacking a value for the sort key (never logged, or NaN) sort last.
    ordered = _search_all(pg_tracking, 3, experiments=[exp.name], order_by="metrics.`eval/acc` DESC")
    assert ordered[:6] == [ids[4], ids[2], ids[3], ids[0], ids[7], ids[1]]
    assert set(ordered[6:]) == {ids[5], ids[6]}
    assert _search_all(pg_tracking, 100, experiments=[exp.name], order_by="create_time") == ids

    # A page token belongs to its query.
    first = pg_tracking.SearchRuns(pb.SearchRunsRequest(page_size=1, **query))  # type: ignore[arg-type]
    r = refusal(
        lambda: pg_tracking.SearchRuns(
            pb.SearchRunsRequest(experiments=[exp.name], page_size=1, page_token=first.next_page_token)
        )
    )
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("locale", ["C", "C.utf8"])
def test_like_is_case_sensitive_and_ilike_is_not(postgres_url: str, tmp_path: Path, locale: str) -> None:
    """The SQLite test's patterns select the same runs here, also where the locale folds `É` to `é` (C.utf8, like
    most production databases), since ILIKE folds only A-Z."""
    with (
        _database(postgres_url, locale) as url,
        EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", db_url=url)) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        check_pattern_filters(tracking_service_pb2_grpc.TrackingServiceStub(ch))


def test_text_orders_and_compares_bytewise_as_on_sqlite_under_any_collation(postgres_url: str, tmp_path: Path) -> None:
    """A database with an en-US collation (ICU, as many production databases have) sorts `aaa` before `BBB`;
    filters and orders over params, tags and names compare bytes here too, so they pick the runs SQLite picks."""
    with (
        _database(postgres_url, "C", icu_locale="en-US") as url,
        EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", db_url=url)) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name="collation")).name
        for value in ("aaa", "BBB", "bbb", "Ab"):
            stub.CreateRun(
                pb.CreateRunRequest(experiment=exp, display_name=value, params={"p": value}, tags={"t": value})
            )

        def names(**kwargs: str) -> list[str]:
            return [r.display_name for r in stub.SearchRuns(pb.SearchRunsRequest(experiments=[exp], **kwargs)).runs]

        bytewise = ["Ab", "BBB", "aaa", "bbb"]  # uppercase before lowercase, as Python's sorted() and SQLite
        assert names(order_by="params.p") == bytewise
        assert names(order_by="tags.t DESC") == bytewise[::-1]
        assert names(order_by="display_name") == bytewise
        assert names(filter='params.p < "a"') == ["BBB", "Ab"]  # in creation order, the default
        assert sorted(names(filter='display_name >= "B"')) == ["BBB", "aaa", "bbb"]
        paged, token = [], ""
        while True:  # the keyset cursor follows the same order across pages
            page = stub.SearchRuns(
                pb.SearchRunsRequest(experiments=[exp], order_by="params.p", page_size=1, page_token=token)
            )
            paged += [r.display_name for r in page.runs]
            token = page.next_page_token
            if not token:
                break
        assert paged == bytewise


def test_two_replicas_share_data_and_store_a_resent_batch_once(replicas: tuple[Stub, Stub]) -> None:
    a, b = replicas
    run = _new_run(a, params={"lr": "2e-5"})
    batch = pb.LogMetricsRequest(
        run_id=run.run_id, writer_id="rank0", seq=7, series=[_series("train/loss", [2.0, 1.5, 1.25])]
    )
    assert not a.LogMetrics(batch).duplicate
    # The client's connection to A dropped before the ack; it re-sends the batch to B.
    resent = b.LogMetrics(batch)
    assert resent.duplicate and resent.seq == 7 and resent.writer_id == "rank0"
    assert not b.LogMetrics(
        pb.LogMetricsRequest(run_id=run.run_id, writer_id="rank0", seq=8, series=[_series("train/loss", [1.0], 3)])
    ).duplicate

    # The streaming form on B deduplicates against what A stored too.
    acks = list(
        b.StreamMetrics(
            iter(
                [
                    pb.StreamMetricsRequest(**_fields(batch)),
                    pb.StreamMetricsRequest(
                        run_id=run.run_id, writer_id="rank1", seq=0, series=[_series("train/loss", [9.0], 100)]
                    ),
                ]
            )
        )
    )
    assert [(x.writer_id, x.seq, x.duplicate) for x in acks] == [("rank0", 7, True), ("rank1", 0, False)]

    for stub in (a, b):
        steps, values = _history(stub, run.run_id, "train/loss")
        assert steps == [0, 1, 2, 3, 100] and values == [2.0, 1.5, 1.25, 1.0, 9.0]
    assert a.GetRun(pb.GetRunRequest(run_id=run.run_id)) == b.GetRun(pb.GetRunRequest(run_id=run.run_id))

    # Params written through one replica are immutable through the other.
    b.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"seed": "3"}))
    r = refusal(lambda: b.LogParams(pb.LogParamsRequest(run_id=run.run_id, params={"lr": "1e-4"})))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "PARAM_IMMUTABLE"
    assert dict(a.GetRun(pb.GetRunRequest(run_id=run.run_id)).params) == {"lr": "2e-5", "seed": "3"}


def _fields(req: pb.LogMetricsRequest) -> dict[str, object]:
    return {"run_id": req.run_id, "writer_id": req.writer_id, "seq": req.seq, "series": list(req.series)}


def test_same_batch_raced_to_both_replicas_is_stored_once(replicas: tuple[Stub, Stub]) -> None:
    a, b = replicas
    run = _new_run(a)
    rounds = 20
    start = threading.Barrier(2)

    def send(stub: Stub, seq: int) -> bool:
        start.wait(timeout=30)
        req = pb.LogMetricsRequest(
            run_id=run.run_id, writer_id="rank0", seq=seq, series=[_series("loss", [float(seq)], seq)]
        )
        return stub.LogMetrics(req, timeout=60).duplicate

    with ThreadPoolExecutor(max_workers=2) as pool:
        for seq in range(rounds):
            outcomes = sorted(f.result() for f in [pool.submit(send, a, seq), pool.submit(send, b, seq)])
            assert outcomes == [False, True], f"seq {seq}: exactly one replica stores the batch, got {outcomes}"

    steps, values = _history(b, run.run_id, "loss")
    assert steps == list(range(rounds)) and values == [float(s) for s in range(rounds)]


def test_lineage_and_params_raced_on_two_replicas_stay_immutable_and_consistent(
    replicas: tuple[Stub, Stub],
) -> None:
    a, b = replicas
    exp = a.CreateExperiment(pb.CreateExperimentRequest(display_name="races")).name
    start = threading.Barrier(2)
    base = {"data_version": "d", "code_commit": "c", "config": '{"x": 1}', "base_model": "m"}

    def call(fn: Callable[[], object]) -> str:
        start.wait(timeout=30)
        return outcome(fn)

    def race(fa: Callable[[], object], fb: Callable[[], object]) -> list[str]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return sorted(f.result() for f in [pool.submit(call, fa), pool.submit(call, fb)])

    def lineage(run: str, **fields: object) -> pb.SetLineageRequest:
        return pb.SetLineageRequest(run_id=run, lineage=common_pb2.Lineage(**fields))  # type: ignore[arg-type]

    for i in range(12):
        # Two complete lineages that differ: one is stored, the other refused (lineage is immutable).
        run = a.CreateRun(pb.CreateRunRequest(experiment=exp)).run_id
        got = race(
            partial(a.SetLineage, lineage(run, **base, seed=1)), partial(b.SetLineage, lineage(run, **base, seed=2))
        )
        assert got == ["ALREADY_EXISTS LINEAGE_IMMUTABLE", "OK"], (i, got)
        # The last two missing fields set at once: the run ends complete, with its fingerprint.
        partly = common_pb2.Lineage(config='{"x": 1}', base_model="m", seed=0)
        run = a.CreateRun(pb.CreateRunRequest(experiment=exp, lineage=partly)).run_id
        got = race(
            partial(a.SetLineage, lineage(run, data_version="d")), partial(b.SetLineage, lineage(run, code_commit="c"))
        )
        stored = b.GetRun(pb.GetRunRequest(run_id=run))
        assert got == ["OK", "OK"] and not stored.missing_lineage_fields and stored.lineage_fingerprint, (i, got)
        # The same param twice at once (a retry racing the original) is a no-op; a different value is refused.
        run = a.CreateRun(pb.CreateRunRequest(experiment=exp)).run_id
        same = pb.LogParamsRequest(run_id=run, params={"lr": "1e-4"})
        assert race(partial(a.LogParams, same), partial(b.LogParams, same)) == ["OK", "OK"], i
        got = race(
            partial(a.LogParams, pb.LogParamsRequest(run_id=run, params={"wd": "0.1"})),
            partial(b.LogParams, pb.LogParamsRequest(run_id=run, params={"wd": "0.2"})),
        )
        assert got == ["ALREADY_EXISTS PARAM_IMMUTABLE", "OK"], (i, got)
        # Tags are mutable: two callers adding the same new key both succeed (one inserts, the other updates).
        got = race(
            partial(a.SetTags, pb.SetTagsRequest(run_id=run, tags={"stage": "a"})),
            partial(b.SetTags, pb.SetTagsRequest(run_id=run, tags={"stage": "b"})),
        )
        assert got == ["OK", "OK"] and b.GetRun(pb.GetRunRequest(run_id=run)).tags["stage"] in ("a", "b"), (i, got)
        # An eval result logged twice at once (a retry racing the original) is stored once, without a conflict.
        scores = pb.LogEvalResultRequest(run_id=run, suite_fingerprint="mmlu@1", metrics={"acc": 0.5})
        assert race(partial(a.LogEvalResult, scores), partial(b.LogEvalResult, scores)) == ["OK", "OK"], i
        # Two callers creating one experiment name: one creates it, the other is told which experiment has it
        # (the metadata get-or-create follows), never a generic conflict.
        name = f"raced-{i}"
        got = race(
            partial(a.CreateExperiment, pb.CreateExperimentRequest(display_name=name)),
            partial(b.CreateExperiment, pb.CreateExperimentRequest(display_name=name)),
        )
        assert got == ["ALREADY_EXISTS ALREADY_EXISTS", "OK"], (i, got)
        # Two callers creating one run ID (a retried start_run racing its original): one creates it, the other is
        # told that run exists (the client then reads it back), never a generic conflict.
        run_id = f"raced-run-{i}-{uuid.uuid4().hex[:8]}"
        got = race(
            partial(a.CreateRun, pb.CreateRunRequest(experiment=exp, run_id=run_id)),
            partial(b.CreateRun, pb.CreateRunRequest(experiment=exp, run_id=run_id)),
        )
        assert got == ["ALREADY_EXISTS ALREADY_EXISTS", "OK"], (i, got)


@pytest.mark.parametrize(
    ("order", "value"),
    [
        ({"kind": "metrics", "key": "m", "descending": False}, "text"),
        ({"kind": "params", "key": "a", "descending": False}, 1.5),
        ({"kind": "attribute", "key": "create_time", "descending": False}, "text"),
    ],
)
def test_a_page_cursor_of_the_wrong_type_for_its_order_is_a_malformed_token(
    pg_tracking: Stub, order: dict[str, object], value: object
) -> None:
    """PostgreSQL refuses to compare a number with text (SQLite compares anything): a hand-made cursor whose sort
    value does not have the order's type is INVALID_ARGUMENT page_token, not INTERNAL."""
    from runledger_server.domain import paging

    order_by = f"{order['kind']}.{order['key']}" if order["kind"] != "attribute" else str(order["key"])
    token = paging.encode([value, 0, "r"], {"experiments": [], "filter": [], "order": order})
    r = refusal(lambda: pg_tracking.SearchRuns(pb.SearchRunsRequest(order_by=order_by, page_token=token)))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token"), r.message


def test_a_lock_timeout_on_any_read_path_is_unavailable_not_internal(pg_settings: Settings) -> None:
    """With a lock timeout set for the server's sessions (`options=-c lock_timeout=...` in its URL), a table held
    by another session makes each call wait, then give up: UNAVAILABLE, as on every path. SearchRuns and the
    run that CreateRun and UpdateRun return are read with the driver's own cursors inside an ORM session, whose
    errors SQLAlchemy never sees: they came back INTERNAL."""
    url = make_url(pg_settings.db_url).update_query_dict({"options": "-c lock_timeout=300"})
    settings = replace(pg_settings, db_url=url.render_as_string(hide_password=False))
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name="locked"))
        run = stub.CreateRun(pb.CreateRunRequest(experiment=exp.name, params={"lr": "1"}))
        holder = create_engine(pg_settings.db_url)
        calls: list[tuple[str, Callable[[], object]]] = [
            ("run_params", lambda: stub.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name]), timeout=30)),
            (
                "run_params",
                lambda: stub.UpdateRun(pb.UpdateRunRequest(run_id=run.run_id, display_name="n"), timeout=30),
            ),
            ("latest_metrics", lambda: stub.CreateRun(pb.CreateRunRequest(experiment=exp.name), timeout=30)),
        ]
        try:
            for table, call in calls:
                with holder.connect() as conn, conn.begin():
                    conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                    r = refusal(call)
                assert r.code == grpc.StatusCode.UNAVAILABLE and r.reason == "DATABASE_UNAVAILABLE", (table, r)
                assert outcome(call) == "OK"  # the lock released, the call goes through: its connection is fine
        finally:
            holder.dispose()


def test_a_restarted_writer_asking_another_replica_leaves_the_numbers_of_batches_still_committing(
    replicas: tuple[Stub, Stub], pg_settings: Settings
) -> None:
    """A writer dies while its last batches wait for their commit on replica A; restarted, it asks replica B where
    to continue. B cannot see A's queue, so it must not answer with the numbers those batches hold: they commit
    later, and the new batches under the same numbers were acknowledged as duplicates and dropped."""
    a, b = replicas
    run = _new_run(a)

    def batch(seq: int, value: float) -> pb.StreamMetricsRequest:
        return pb.StreamMetricsRequest(
            run_id=run.run_id, writer_id="rank0", seq=seq, series=[_series("loss", [value], seq % 1000)]
        )

    holder = create_engine(pg_settings.db_url)
    try:
        with holder.connect() as conn, conn.begin():
            # Every metric commit of this run waits for this lock (its rows reference the run).
            conn.exec_driver_sql("SELECT id FROM runs WHERE id = %(id)s FOR UPDATE", {"id": run.run_id})
            old = a.StreamMetrics(iter([batch(seq, 111.0) for seq in range(5)]))  # the previous incarnation ...
            time.sleep(1.0)  # ... whose batches A has taken and queued
            old.cancel()  # it dies before any acknowledgement
            resume_at = b.GetMetricWriter(pb.GetMetricWriterRequest(run_id=run.run_id, writer_id="rank0")).next_seq
            assert resume_at >= 5
            new = b.StreamMetrics(iter([batch(resume_at + i, 222.0) for i in range(5)]))
            with ThreadPoolExecutor(1) as pool:
                acks = pool.submit(list, new)
                time.sleep(0.5)
                conn.commit()  # A's queued batches commit, then B's
                assert [(x.seq, x.duplicate) for x in acks.result(timeout=60)] == [
                    (resume_at + i, False) for i in range(5)
                ]
    finally:
        holder.dispose()
    assert (
        sorted(_history(a, run.run_id, "loss")[1]) == [111.0] * 5 + [222.0] * 5
    )  # both incarnations' points, each once


def test_an_eval_score_of_minus_zero_reads_back_as_on_sqlite(pg_tracking: Stub) -> None:
    """SQLite reads -0.0 back as 0.0; PostgreSQL kept the sign, so replicas on either answered differently."""
    exp = pg_tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="zero")).name
    run = pg_tracking.CreateRun(pb.CreateRunRequest(experiment=exp)).run_id
    logged = pg_tracking.LogEvalResult(
        pb.LogEvalResultRequest(run_id=run, suite_fingerprint="suite@1", metrics={"loss": -0.0})
    )
    won = pg_tracking.SelectWinner(
        pb.SelectWinnerRequest(experiment=exp, metric="loss", direction=common_pb2.DIRECTION_MINIMIZE)
    )
    assert won.winner_run_id == run
    assert math.copysign(1.0, won.score) == 1.0 and math.copysign(1.0, logged.metrics["loss"]) == 1.0
    again = pb.LogEvalResultRequest(run_id=run, suite_fingerprint="suite@1", metrics={"loss": 0.0})
    assert pg_tracking.LogEvalResult(again).metrics["loss"] == 0.0  # the same score: a repeat, not a change


def test_pages_ordered_by_long_param_values_follow_each_other_on_postgresql(pg_tracking: Stub) -> None:
    check_paging_over_long_sort_values(pg_tracking)
