"""The registry's serving lookup latency, idle and under training load, and its write rates, with a same-run baseline.

Against a `runledger serve` subprocess (SQLite under a temp dir) on loopback, one client thread:
- `GetModelVersionByAlias` p50/p99 over N calls (default 5,000) with the server otherwise idle, and again
  while 8 trainer processes stream metrics into it (StreamMetrics, batches of 1,000 points, up to 32 in
  flight each): flat out with the trainers niced (as if they ran on their own machines, which they do in
  practice), flat out at the server's priority (all ten processes share this machine's cores), and paced
  at --trainer-rate points/s each; the trainers' own points/s during each window is printed too;
- the same with 8 processes that only spin on the CPU and send nothing: what sharing the cores costs a lookup
  through the scheduler alone, whatever the server does;
- the baseline, measured in the same run and interleaved call by call: the gRPC health check (no database,
  no work) p50/p99, i.e. the floor of a unary call here, so a lookup prints as a multiple of it;
- `CreateModelVersion`/s (each from its own run with a recorded artifact, created beforehand, not timed),
  against its floor measured in the same run: a health check plus one durable commit on the same disk;
- `SetAlias` decisions/s: promotions (each candidate beats the last), refusals (ties, committed to the
  history too), and promotions from 8 client threads at once.

Run: .venv/bin/python bench/bench_registry.py [--calls 5000] [--versions 300] [--trainers 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from _floor import durable_commit_ms, round_trip_ms
from _server import peak_rss_mib, runledger_server

from runledger import wire
from runledger.v1 import (
    artifact_service_pb2 as apb,
    artifact_service_pb2_grpc,
    common_pb2,
    registry_service_pb2 as rpb,
    registry_service_pb2_grpc,
    tracking_service_pb2 as tpb,
    tracking_service_pb2_grpc,
)

MODEL = "bench-model"
GATE = "frozen-eval"
KEYS = ("train/loss", "train/reward", "train/kl", "train/entropy")
IN_FLIGHT = 32
LINEAGE = common_pb2.Lineage(
    data_version="sft-mix-v3", code_commit="a1b2c3d", config='{"lr": 2e-5}', base_model="Qwen/Qwen3-8B", seed=0
)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds."""
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.max())


def timed_pair(
    n: int, first: Callable[[], object], second: Callable[[], object], warmup: int = 200
) -> tuple[list[float], list[float]]:
    """Time n calls of each, alternating, so that both see the same conditions."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return a, b


def prepare_runs(address: str, experiment: str, n: int) -> list[str]:
    """n runs with complete lineage and one small recorded artifact each."""
    with grpc.insecure_channel(address) as ch:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        runs = []
        for i in range(n):
            lineage = common_pb2.Lineage()
            lineage.CopyFrom(LINEAGE)
            lineage.seed = i
            run_id = tracking.CreateRun(tpb.CreateRunRequest(experiment=experiment, lineage=lineage)).run_id
            data = f"adapter weights {i}".encode() * 64
            artifacts.UploadArtifact(
                iter(
                    [
                        apb.UploadArtifactRequest(header=apb.UploadArtifactHeader(run_id=run_id, path="adapter.bin")),
                        apb.UploadArtifactRequest(chunk=data),
                    ]
                )
            )
            runs.append(run_id)
        return runs


def trainer(address: str, run_id: str, writer: str, stop: Any, counter: Any, nice: int, rate: int) -> None:
    """Stream 1,000-point batches (4 keys x 250 steps) until told to stop, as fast as acks allow or at `rate`
    points/s; count acknowledged points."""
    os.nice(nice)
    rng = np.random.default_rng(abs(hash(writer)) % 2**32)
    stamps = np.full(250, 1_700_000_000_000, dtype=np.int64)
    window = threading.Semaphore(IN_FLIGHT)

    def gen() -> Iterator[tpb.StreamMetricsRequest]:
        seq = 0
        start = time.perf_counter()
        while not stop.is_set():
            if rate:
                time.sleep(max(0.0, start + seq * 1000 / rate - time.perf_counter()))
            window.acquire()
            steps = np.arange(seq * 250, seq * 250 + 250, dtype=np.int64)
            yield tpb.StreamMetricsRequest(
                run_id=run_id,
                writer_id=writer,
                seq=seq,
                series=[wire.series(k, steps, rng.random(250), stamps) for k in KEYS],
            )
            seq += 1

    with grpc.insecure_channel(address) as ch:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        for _ in stub.StreamMetrics(gen()):
            window.release()
            with counter.get_lock():
                counter.value += 1000


def burner(stop: Any, nice: int) -> None:
    """Spin on the CPU and never talk to the server: what 8 busy processes cost a lookup through the scheduler
    alone, to read the loaded rows against."""
    os.nice(nice)
    while not stop.is_set():
        for _ in range(100_000):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5_000, help="lookups per measurement (default 5,000)")
    ap.add_argument("--versions", type=int, default=300, help="versions to register (default 300)")
    ap.add_argument("--trainers", type=int, default=8, help="metric-streaming trainer processes (default 8)")
    ap.add_argument(
        "--trainer-rate", type=int, default=10_000, help="points/s per trainer in the paced run (default 10,000)"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d, runledger_server(Path(d) / "data") as (address, pid):
        ch = grpc.insecure_channel(address)
        reg = registry_service_pb2_grpc.RegistryServiceStub(ch)
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        experiment = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="bench")).name
        reg.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(model_id=MODEL))
        reg.CreateGate(
            rpb.CreateGateRequest(
                model=MODEL,
                gate_id=GATE,
                suite_fingerprint="mmlu@abcd",
                metric="mmlu",
                direction=common_pb2.DIRECTION_MAXIMIZE,
                threshold=0.0,
            )
        )

        # CreateModelVersion/s, one client.
        runs = prepare_runs(address, experiment, args.versions)
        t0 = time.perf_counter()
        versions = [
            reg.CreateModelVersion(rpb.CreateModelVersionRequest(model=MODEL, run_id=r, artifact_path="adapter.bin"))
            for r in runs
        ]
        create_rate = len(versions) / (time.perf_counter() - t0)
        rtt_ms, commit_ms = round_trip_ms(ch), durable_commit_ms(Path(d))
        for i, v in enumerate(versions):
            reg.RecordGateResult(rpb.RecordGateResultRequest(model=MODEL, gate_id=GATE, version=v.version, score=i))

        # SetAlias decisions/s: ascending scores, so every call promotes; then ties, so every call is refused.
        half = len(versions) // 2
        t0 = time.perf_counter()
        for v in versions[:half]:
            reg.SetAlias(rpb.SetAliasRequest(model=MODEL, alias="production", version=v.version, gate_id=GATE))
        promote_rate = half / (time.perf_counter() - t0)
        champion = versions[half - 1].version
        t0 = time.perf_counter()
        for _ in range(half):
            try:
                reg.SetAlias(rpb.SetAliasRequest(model=MODEL, alias="production", version=champion, gate_id=GATE))
                raise AssertionError("a tie must be refused")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        refuse_rate = half / (time.perf_counter() - t0)

        # 8 threads promoting at once on one alias (each its own channel); every call is one decision.
        rest = versions[half:]
        chans = [grpc.insecure_channel(address) for _ in range(8)]

        def decide(i: int) -> None:
            stub = registry_service_pb2_grpc.RegistryServiceStub(chans[i % 8])
            try:
                stub.SetAlias(rpb.SetAliasRequest(model=MODEL, alias="staging", version=rest[i].version, gate_id=GATE))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(decide, range(len(rest))))
        concurrent_rate = len(rest) / (time.perf_counter() - t0)
        for c in chans:
            c.close()

        served_version = reg.GetModelVersionByAlias(
            rpb.GetModelVersionByAliasRequest(model=MODEL, alias="production")
        ).model_version.version
        assert served_version == champion
        lookup_req = rpb.GetModelVersionByAliasRequest(model=MODEL, alias="production")
        health_req = health_pb2.HealthCheckRequest(service="")

        idle_health, idle_lookup = timed_pair(
            args.calls, lambda: health.Check(health_req), lambda: reg.GetModelVersionByAlias(lookup_req)
        )

        def under_load(nice: int, rate: int) -> tuple[list[float], list[float], float]:
            """The same while trainer processes stream metrics (at `nice` priority relative to the server); a
            negative rate starts CPU burners instead of trainers."""
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            points = ctx.Value("q", 0)
            if rate < 0:
                procs = [ctx.Process(target=burner, args=(stop, nice), daemon=True) for _ in range(args.trainers)]
            else:
                runs = [
                    tracking.CreateRun(tpb.CreateRunRequest(experiment=experiment)).run_id for _ in range(args.trainers)
                ]
                procs = [
                    ctx.Process(target=trainer, args=(address, r, f"rank{i}", stop, points, nice, rate), daemon=True)
                    for i, r in enumerate(runs)
                ]
            for p in procs:
                p.start()
            if rate < 0:
                time.sleep(2)  # every burner is spinning
            while rate >= 0 and points.value < args.trainers * 5_000:  # every trainer is streaming before we measure
                time.sleep(0.05)
            p0, t0 = points.value, time.perf_counter()
            base, lookups = timed_pair(
                args.calls, lambda: health.Check(health_req), lambda: reg.GetModelVersionByAlias(lookup_req), 50
            )
            rate = (points.value - p0) / (time.perf_counter() - t0)
            stop.set()
            for p in procs:
                p.join(timeout=60)
            return base, lookups, rate

        scenarios = {
            f"{args.trainers} trainers, flat out, niced (as on their own machines)": (10, 0),
            f"{args.trainers} trainers, flat out, same priority as the server": (0, 0),
            f"{args.trainers} trainers at {args.trainer_rate:,} points/s each, niced": (10, args.trainer_rate),
            f"{args.trainers} CPU burners, no RPCs, niced (the scheduler alone)": (10, -1),
            f"{args.trainers} CPU burners, no RPCs, same priority as the server": (0, -1),
        }
        loads = {name: under_load(nice, rate) for name, (nice, rate) in scenarios.items()}
        ch.close()
        rss = peak_rss_mib(pid)

    def row(name: str, samples: list[float], base: list[float]) -> str:
        p50, p99, worst = percentiles(samples)
        b50, b99, _ = percentiles(base)
        return (
            f"{name:<72} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  max {worst:7.3f} ms"
            f"   (x{p50 / b50:.2f} / x{p99 / b99:.2f} the health check)"
        )

    print(f"GetModelVersionByAlias, {args.calls:,} calls, one client on loopback (2 cores shared by everything):")
    print(row("  idle", idle_lookup, idle_health))
    for name, (base, lookups, rate) in loads.items():
        print(row(f"  {name}", lookups, base))
        if "burners" not in name:
            print(f"      trainers meanwhile: {rate:,.0f} points/s acknowledged")
    print("baseline measured in this run, interleaved call by call: the gRPC health check (no database)")
    for name, base in (("idle", idle_health), *((n, v[0]) for n, v in loads.items())):
        b50, b99, _ = percentiles(base)
        print(f"  {name:<70} p50 {b50:.3f} ms  p99 {b99:.3f} ms")
    floor = 1e3 / (rtt_ms + commit_ms)
    print(f"CreateModelVersion, one client:               {create_rate:8,.0f} versions/s")
    print(
        f"  floor measured in this run:                 {floor:8,.0f} versions/s (health check {rtt_ms:.3f} ms + one"
        f" durable one-row SQLite commit {commit_ms:.3f} ms on the same disk); reached {create_rate / floor:.0%}"
    )
    print(f"SetAlias decisions, one client, promotions:   {promote_rate:8,.0f} /s")
    print(f"SetAlias decisions, one client, refusals:     {refuse_rate:8,.0f} /s")
    print(f"SetAlias decisions, 8 threads, one alias:     {concurrent_rate:8,.0f} /s")
    print(f"server peak RSS:                              {rss:8.0f} MiB")
    print(f"(lookup mean idle {statistics.mean(idle_lookup) * 1000:.3f} ms)")


if __name__ == "__main__":
    main()
