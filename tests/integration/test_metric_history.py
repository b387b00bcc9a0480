"""Long histories over the real server: chunks in every stored form come back exact and in step order,
split into messages of at most HISTORY_CHUNK_POINTS, the same through protobuf and through the client."""

from __future__ import annotations

import numpy as np
import pytest

from runledger import Client, errors, wire
from runledger.v1 import tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.embedded import EmbeddedServer
from runledger_server.transport.tracking_servicer import HISTORY_CHUNK_POINTS


def log(tracking, run_id: str, seq: int, steps: np.ndarray, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.sin(steps / 7.0) + seq
    values[::997] = np.nan
    series = wire.series("train/reward", steps, values, stamps)
    tracking.LogMetrics(pb.LogMetricsRequest(run_id=run_id, writer_id="w", seq=seq, series=[series]))
    return steps, values


@pytest.fixture
def logged(server: EmbeddedServer, tracking) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="history"))
    run_id = tracking.CreateRun(pb.CreateRunRequest(experiment=exp.name)).run_id
    t0 = 1_700_000_000_000
    batches = [
        # regular steps and near timestamps: both stored compactly
        (np.arange(0, 100_000, dtype=np.int64), t0 + np.arange(100_000, dtype=np.int64)),
        # irregular steps, timestamps too far apart for 32-bit offsets: both stored raw
        (np.array([100_003, 100_001, 100_010], dtype=np.int64), np.array([0, 2**40, 5], dtype=np.int64)),
        # stride 3, overlapping the first batch: forces a re-sort (ties keep logging order)
        (np.arange(99_000, 130_000, 3, dtype=np.int64), t0 + np.arange(0, 31_000, 3, dtype=np.int64)),
    ]
    return (run_id, *log_all(tracking, run_id, batches))


def log_all(tracking, run_id: str, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log (steps, timestamps) batches as seq 0, 1, ...; every point logged, in step order (ties in logging order)."""
    steps, values, stamps = [], [], []
    for seq, (s, t) in enumerate(batches):
        s, v = log(tracking, run_id, seq, s, t)
        steps.append(s)
        values.append(v)
        stamps.append(t)
    all_steps, all_values, all_stamps = np.concatenate(steps), np.concatenate(values), np.concatenate(stamps)
    order = np.argsort(all_steps, kind="stable")
    return all_steps[order], all_values[order], all_stamps[order]


def same(got_steps, got_values, got_stamps, steps, values, stamps) -> None:
    assert np.array_equal(np.asarray(got_steps), steps)
    assert np.array_equal(np.asarray(got_values, dtype=np.float64).view(np.int64), values.view(np.int64))
    assert np.array_equal(np.asarray(got_stamps), stamps)


def test_long_history_is_exact_ordered_and_split_into_bounded_messages(server, tracking, logged) -> None:
    run_id, steps, values, stamps = logged
    messages = list(tracking.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run_id, key="train/reward")))
    assert len(messages) == -(-steps.shape[0] // HISTORY_CHUNK_POINTS)
    assert all(len(m.steps) <= HISTORY_CHUNK_POINTS and m.key == "train/reward" for m in messages)
    same(
        [s for m in messages for s in m.steps],
        [v for m in messages for v in m.values],
        [t for m in messages for t in m.timestamps_ms],
        steps,
        values,
        stamps,
    )
    with Client(server.address) as client:
        h = client.metric_history(run_id, "train/reward")
        same(h.steps, h.values, h.timestamps_ms, steps, values, stamps)
        assert h.values.flags.writeable  # fresh arrays, not views of received messages


def announced(call) -> int:
    (value,) = [v for k, v in call.initial_metadata() if k == wire.HISTORY_POINTS_KEY]
    return int(value)


def test_the_server_announces_how_many_points_a_read_holds(server, tracking, logged) -> None:
    """The count in the initial metadata is the number of points the messages carry, for every form of read
    (whole, range, downsampled, empty), so the client can place them into arrays of the final size."""
    run_id, steps, *_ = logged
    requests = [
        pb.GetMetricHistoryRequest(run_id=run_id, key="train/reward"),
        pb.GetMetricHistoryRequest(run_id=run_id, key="train/reward", start_step=99_990, end_step=100_005),
        pb.GetMetricHistoryRequest(run_id=run_id, key="train/reward", max_points=1000),
        pb.GetMetricHistoryRequest(run_id=run_id, key="no/such-key"),
    ]
    counts = []
    for request in requests:
        call = tracking.GetMetricHistory(request)
        counts.append(announced(call))
        assert counts[-1] == sum(len(m.steps) for m in call)
    assert counts[0] == steps.shape[0] and counts[1] == np.count_nonzero((steps >= 99_990) & (steps <= 100_005))
    assert 4 <= counts[2] <= 1000 and counts[3] == 0
    with Client(server.address) as client, pytest.raises(errors.NotFound):  # refused before any metadata
        client.metric_history("0" * 32, "train/reward")


def test_ranges_of_a_long_history(server, logged) -> None:
    run_id, steps, values, stamps = logged
    with Client(server.address) as client:
        for lo, hi in [(0, 0), (99_990, 100_005), (100_002, 129_999), (65_535, 65_537)]:
            h = client.metric_history(run_id, "train/reward", start_step=lo, end_step=hi)
            keep = (steps >= lo) & (steps <= hi)
            same(h.steps, h.values, h.timestamps_ms, steps[keep], values[keep], stamps[keep])
        empty = client.metric_history(run_id, "no/such-key")
        assert empty.steps.shape == (0,) and empty.values.dtype == np.float64


def test_a_range_longer_than_one_read_is_refused_and_the_client_reads_it_in_parts(tmp_path) -> None:
    """The server bounds what one read holds in memory; the client splits a longer range by the steps the
    refusal names, and the parts join into exactly the whole history (downsampled parts keep the extremes)."""
    import grpc

    from runledger_server.config import Settings
    from tests.support import refusal

    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", history_max_points=25_000)
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="long"))
        run_id = tracking.CreateRun(pb.CreateRunRequest(experiment=exp.name)).run_id
        # 10 chunks of 10,000 steps, the last overlapping the others (a re-sort)
        chunks = [np.arange(seq * 10_000, (seq + 1) * 10_000, dtype=np.int64) for seq in range(9)]
        chunks.append(np.arange(5, 100_000, 10, dtype=np.int64))
        batches = [(s, np.full(s.shape[0], 1_700_000_000_000 + seq, dtype=np.int64)) for seq, s in enumerate(chunks)]
        all_steps, all_values, all_stamps = log_all(tracking, run_id, batches)

        r = refusal(lambda: list(tracking.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run_id, key=KEY))))
        assert (r.code, r.reason, r.metadata["field"]) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "HISTORY_TOO_LARGE",
            "end_step",
        )
        assert (r.metadata["minStep"], r.metadata["maxStep"], r.metadata["limit"]) == ("0", "99995", "25000")
        part = pb.GetMetricHistoryRequest(run_id=run_id, key=KEY, start_step=10_000, end_step=19_999)
        assert sum(len(m.steps) for m in tracking.GetMetricHistory(part)) == 11_000  # a part within the bound

        with Client(srv.address) as client:
            h = client.metric_history(run_id, KEY)
            same(h.steps, h.values, h.timestamps_ms, all_steps, all_values, all_stamps)
            small = client.metric_history(run_id, KEY, max_points=400)
            assert 4 <= small.steps.shape[0] <= 1_000 and np.all(np.diff(small.steps) >= 0)
            finite = all_values[~np.isnan(all_values)]
            assert small.steps[0] == 0 and small.steps[-1] == 99_995
            assert np.nanmax(small.values) == finite.max() and np.nanmin(small.values) == finite.min()


KEY = "train/reward"


def test_chunks_that_overlap_every_part_of_a_range_count_only_their_points_in_it(tmp_path) -> None:
    """Two writers logging the same steps: each chunk spans the whole range, so counting chunks whole would
    refuse every part however small; the bound counts the points each part actually holds."""
    import grpc

    from runledger_server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", history_max_points=100)
    with EmbeddedServer(settings) as srv, Client(srv.address) as client:
        run = client.start_run(experiment="overlap")
        writers = [client.attach_run(run.run_id, writer_id=f"rank{r}") for r in range(2)]
        for rank, writer in enumerate(writers):
            writer.log_series({"loss": np.arange(60.0) + rank / 10}, steps=np.arange(60))
            writer.flush()
        h = client.metric_history(run.run_id, "loss")  # 120 points, 2 per step
        assert h.steps.tolist() == [s for s in range(60) for _ in range(2)]
        assert sorted(h.values.tolist()) == sorted([s + r / 10 for s in range(60) for r in range(2)])
        with grpc.insecure_channel(srv.address) as ch:
            stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            one = pb.GetMetricHistoryRequest(run_id=run.run_id, key="loss", start_step=5, end_step=5)
            assert [len(m.steps) for m in stub.GetMetricHistory(one)] == [2]  # a part this small always fits
        run.finish()
