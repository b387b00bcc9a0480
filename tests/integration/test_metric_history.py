"""Long histories over the real server: chunks in every stored form come back exact and in step order,
split into messages of at most HISTORY_CHUNK_POINTS, the same through protobuf and through the client."""

from __future__ import annotations

import numpy as np
import pytest

from runledger import Client, wire
from runledger.v1 import tracking_service_pb2 as pb
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
    steps, values, stamps = [], [], []
    for seq, (s, t) in enumerate(batches):
        s, v = log(tracking, run_id, seq, s, t)
        steps.append(s)
        values.append(v)
        stamps.append(t)
    all_steps, all_values, all_stamps = np.concatenate(steps), np.concatenate(values), np.concatenate(stamps)
    order = np.argsort(all_steps, kind="stable")
    return run_id, all_steps[order], all_values[order], all_stamps[order]


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


def test_ranges_of_a_long_history(server, logged) -> None:
    run_id, steps, values, stamps = logged
    with Client(server.address) as client:
        for lo, hi in [(0, 0), (99_990, 100_005), (100_002, 129_999), (65_535, 65_537)]:
            h = client.metric_history(run_id, "train/reward", start_step=lo, end_step=hi)
            keep = (steps >= lo) & (steps <= hi)
            same(h.steps, h.values, h.timestamps_ms, steps[keep], values[keep], stamps[keep])
        empty = client.metric_history(run_id, "no/such-key")
        assert empty.steps.shape == (0,) and empty.values.dtype == np.float64
