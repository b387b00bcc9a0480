"""Metric ingest and history throughput of a runledger server subprocess, with same-run baselines.

Prints: points/s over one StreamMetrics stream and over 16 concurrent streams (batches of 1,000
points: 4 keys x 250 steps, up to 32 batches in flight per stream, timed until the last ack, i.e.
until everything is durably committed), the time to read back 1,000,000 points of one key, and two
baselines measured in the same run on the same machine: raw `sqlite3.executemany` of the same
points as one row per point into an indexed table (the storage ceiling of a row-per-point design),
and building the same points as one protobuf message per point (the client ceiling of that design).

Run: .venv/bin/python bench/bench_tracking.py [--points 300000] [--history-points 1000000]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _server import peak_rss_mib, runledger_server

from runledger import wire
from runledger.v1 import tracking_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc

KEYS = ("train/loss", "train/reward", "train/kl", "train/entropy")
IN_FLIGHT = 32


def batches(run_id: str, writer: str, points: int, steps_per_batch: int) -> Iterator[pb.StreamMetricsRequest]:
    rng = np.random.default_rng(0)
    total_steps = points // len(KEYS)
    for seq, lo in enumerate(range(0, total_steps, steps_per_batch)):
        steps = np.arange(lo, min(total_steps, lo + steps_per_batch), dtype=np.int64)
        stamps = np.full(steps.shape[0], 1_700_000_000_000, dtype=np.int64)
        yield pb.StreamMetricsRequest(
            run_id=run_id,
            writer_id=writer,
            seq=seq,
            series=[wire.series(k, steps, rng.random(steps.shape[0]), stamps) for k in KEYS],
        )


def stream(stub: tracking_service_pb2_grpc.TrackingServiceStub, reqs: list[pb.StreamMetricsRequest]) -> int:
    """Send with at most IN_FLIGHT unacknowledged batches; return the number of acks."""
    window = threading.Semaphore(IN_FLIGHT)

    def gen() -> Iterator[pb.StreamMetricsRequest]:
        for r in reqs:
            window.acquire()
            yield r

    acks = 0
    for _ in stub.StreamMetrics(gen()):
        acks += 1
        window.release()
    return acks


def ingest(stub, experiment: str, streams: int, points: int, steps_per_batch: int) -> float:
    runs = [stub.CreateRun(pb.CreateRunRequest(experiment=experiment)).run_id for _ in range(streams)]
    per_stream = points // streams
    prepared = [list(batches(r, "rank0", per_stream, steps_per_batch)) for r in runs]
    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(stub, p)) for p in prepared]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return per_stream * streams / elapsed


def history(stub, experiment: str, points: int) -> float:
    run = stub.CreateRun(pb.CreateRunRequest(experiment=experiment)).run_id
    stamps = np.full(10_000, 1_700_000_000_000, dtype=np.int64)
    reqs = [
        pb.StreamMetricsRequest(
            run_id=run,
            writer_id="w",
            seq=i,
            series=[wire.series("train/loss", np.arange(lo, lo + 10_000), np.random.random(10_000), stamps)],
        )
        for i, lo in enumerate(range(0, points, 10_000))
    ]
    stream(stub, reqs)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        n = 0
        for chunk in stub.GetMetricHistory(pb.GetMetricHistoryRequest(run_id=run, key="train/loss")):
            n += wire.arrays(chunk)[0].shape[0]
        best = min(best, time.perf_counter() - start)
        assert n == points, n
    return best


def sqlite_row_per_point(points: int, tmp: Path) -> float:
    con = sqlite3.connect(tmp / "baseline.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE m (run TEXT, key TEXT, step INTEGER, value REAL, ts INTEGER)")
    con.execute("CREATE INDEX ix ON m (run, key, step)")
    rows = [("r", KEYS[i % 4], i // 4, 0.5, 1_700_000_000_000) for i in range(points)]
    start = time.perf_counter()
    for lo in range(0, points, 10_000):
        with con:
            con.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?)", rows[lo : lo + 10_000])
    elapsed = time.perf_counter() - start
    con.close()
    return points / elapsed


def message_per_point(points: int) -> float:
    start = time.perf_counter()
    for i in range(points):
        tracking_pb2.MetricSeries(key=KEYS[i % 4], steps=[i // 4], values=[0.5], timestamps_ms=[1]).SerializeToString()
    return points / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=300_000)
    ap.add_argument("--history-points", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, runledger_server(Path(d) / "data") as (address, pid):
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(address, options=opts) as ch:
            stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name="bench")).name
            one = ingest(stub, exp, 1, args.points, 250)
            sixteen = ingest(stub, exp, 16, args.points, 250)
            big = ingest(stub, exp, 1, args.points * 4, 4_000)
            hist = history(stub, exp, args.history_points)
        rss = peak_rss_mib(pid)
        sqlite_rate = sqlite_row_per_point(args.points, Path(d))
    per_point = message_per_point(min(args.points, 200_000))
    print(f"ingest, 1 stream, 1,000-point batches:   {one:>12,.0f} points/s")
    print(f"ingest, 16 streams, 1,000-point batches: {sixteen:>12,.0f} points/s")
    print(f"ingest, 1 stream, 16,000-point batches:  {big:>12,.0f} points/s")
    print(f"history of {args.history_points:,} points:          {hist:>12.3f} s")
    print(f"server peak RSS:                         {rss:>12.0f} MiB")
    print("baselines measured in this run:")
    print(f"  sqlite3 executemany, one row per point:  {sqlite_rate:>10,.0f} rows/s   (x{one / sqlite_rate:.2f})")
    print(f"  one protobuf message per point (build): {per_point:>10,.0f} points/s (x{one / per_point:.2f})")


if __name__ == "__main__":
    main()
