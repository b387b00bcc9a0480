"""runledger and MLflow side by side: the same workloads against both servers in one run, with the ratio.

Workloads (runledger through its Python client, its fixtures through raw gRPC stubs; MLflow through
`MlflowClient`, see mlflow_workloads.py):
  ingest1    one trainer logs 300,000 points (4 keys per step); timed from the first log call until the
             points are durably stored (runledger: `run.log_metrics` per step, then `run.flush()`; MLflow:
             `log_batch` of 1,000), and again with `run.log_series` of 1,000 points per call. Also the
             training thread's time per step of 4 keys. runledger's figures: median of 3 runs.
  ingest16   16 trainer processes at once log 1,200,000 points together (75,000 each, on both systems),
             connected before the clock starts; aggregate points/s, per step and with `log_series` of 1,000
             points per call.
  history    read back one key of 1,000,000 points (runledger: `client.metric_history`, median of 3 reads;
             MLflow: `get_metric_history`, its rows written straight into its SQLite tables beforehand).
  lookup     GetModelVersionByAlias / get_model_version_by_alias, p50 and p99 over 5,000 calls, idle and
             while 8 trainer processes stream metrics as fast as they can.
  registry   version creation per second and SetAlias / set_registered_model_alias per second (runledger:
             each version has a gate result scoring higher than the one before, so every move is admitted;
             recorded beforehand, and for a quarter of the versions again inside the timing, in the JSON).
  artifacts  upload and download of a 256 MiB file (runledger: its default local artifact store through
             `runledger.artifacts`, which hashes and verifies; MLflow: proxied local artifacts). Before each
             system's run, 1 GiB is written and deleted, so that both fill memory the kernel has used before
             (see recycle_memory).

MLflow 3.17.2 is installed into its own virtual environment (bench/.venv-mlflow, created on first use) and
run at its best on this kind of machine: `mlflow server --workers 1` with a SQLite store, without its job
runner, on each of its two web servers (uvicorn, its default, and gunicorn); each MLflow figure is the
better of the two. Each workload gets a fresh server of each kind. Results go to
bench/results/comparison.{md,json,png}; the table is also printed. The ratio column says how many times
better runledger is (above 1: runledger is ahead). Other work on the machine skews the figures: the report
says how much CPU it took during the measurements.

Run:  .venv/bin/python bench/compare_mlflow.py              (full run, ~40 minutes plus the first install)
      .venv/bin/python bench/compare_mlflow.py --quick      (smoke run with scaled-down sizes, ~8 minutes)
      .venv/bin/python bench/compare_mlflow.py --only ingest1,history --mlflow-servers uvicorn
      .venv/bin/python bench/compare_mlflow.py --replot     (draw the plot again from the last JSON)
The plot needs matplotlib: .venv/bin/pip install -e '.[bench]'
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _floor import durable_commit_ms, round_trip_ms
from _latency import summarize
from _server import free_port, runledger_server

import runledger
from runledger import Client, artifacts as client_artifacts, wire
from runledger.v1 import (
    artifact_service_pb2 as apb,
    artifact_service_pb2_grpc,
    common_pb2,
    registry_service_pb2 as rpb,
    registry_service_pb2_grpc,
    tracking_service_pb2 as tpb,
    tracking_service_pb2_grpc,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
MLFLOW_VENV = BENCH / ".venv-mlflow"
MLFLOW_VERSION = "3.17.2"
KEYS = ("train/loss", "train/reward", "train/kl", "train/entropy")
WARM_UP_VERSIONS = 20  # created before the clock starts, on both systems
WORKLOADS = ("ingest1", "ingest16", "history", "lookup", "registry", "artifacts")
LINEAGE = common_pb2.Lineage(
    data_version="bench-mix-v1",
    code_commit="0000000",
    config='{"lr": 2e-05, "batch_size": 64}',
    base_model="bench/base-1b",
    seed=0,
)
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
# MLflow 3.x also starts a job runner with seven huey consumer processes (GenAI jobs, unused here) whose start-up
# takes ~35 CPU-seconds on this kind of machine, competing with the workload: the server runs without it.
SERVER_ENV = {**QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# Both of MLflow's web servers with one worker; each MLflow figure is the better of the two. gunicorn's default
# 30 s worker timeout would kill the long history read.
MLFLOW_SERVERS: dict[str, list[str]] = {"uvicorn": [], "gunicorn": ["--gunicorn-opts", "--timeout 900"]}


@dataclass(frozen=True)
class Sizes:
    points: int  # ingest, one trainer
    multi_points: int  # ingest, all trainers together
    trainers: int
    history_points: int
    calls: int
    load_trainers: int
    load_rate: int  # points/s of each trainer in the paced lookup variant (0: no paced variant)
    versions: int
    artifact_mib: int
    lookup_max_seconds: float


FULL = Sizes(300_000, 1_200_000, 16, 1_000_000, 5_000, 8, 250, 300, 256, 120.0)
QUICK = Sizes(40_000, 160_000, 16, 100_000, 500, 8, 250, 30, 32, 30.0)


@dataclass
class Row:
    """One line of the table: a figure of each system, and whether higher is better."""

    workload: str
    unit: str
    higher_is_better: bool
    runledger: float | None = None
    mlflow: float | None = None
    runledger_note: str = ""
    mlflow_note: str = ""
    mlflow_server: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better runledger is than MLflow."""
        if not self.runledger or not self.mlflow:
            return None
        return self.runledger / self.mlflow if self.higher_is_better else self.mlflow / self.runledger


# ---- MLflow: its virtual environment, its server, its workloads ------------------------------------------
def mlflow_python() -> Path:
    return MLFLOW_VENV / "bin" / "python"


def ensure_mlflow() -> str:
    """Create bench/.venv-mlflow with the pinned MLflow unless it is already there; return its version."""
    py = mlflow_python()
    probe = [str(py), "-c", "import mlflow; print(mlflow.__version__)"]
    if py.exists():
        found = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, **QUIET_ENV})
        if found.returncode == 0 and found.stdout.strip() == MLFLOW_VERSION:
            return MLFLOW_VERSION
    print(f"installing mlflow=={MLFLOW_VERSION} into {MLFLOW_VENV.relative_to(BENCH.parent)} (a few minutes)...")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"mlflow=={MLFLOW_VERSION}"], check=True)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def mlflow_server(data: Path, kind: str) -> Iterator[tuple[str, Path]]:
    """Yield (tracking URI, SQLite file) of `mlflow server --workers 1` on uvicorn (its default) or gunicorn;
    its process group is killed after."""
    data.mkdir(parents=True, exist_ok=True)
    db = data / "mlflow.db"
    port = free_port()
    log = (data / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(MLFLOW_VENV / "bin" / "mlflow"),
            "server",
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(data / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *MLFLOW_SERVERS[kind],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **SERVER_ENV},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {(data / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer /health within 180 s")
            time.sleep(0.25)
        settle(proc.pid)
        yield uri, db
    finally:
        stop_group(proc)
        log.close()


def _group_members(pgid: int) -> list[int]:
    """Living (not zombie) processes of a process group other than its leader."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the process group led by `proc`: SIGTERM the leader's workers first, so that the leader reaps them
    (their CPU time then reaches this process's accounts), then the leader; SIGKILL the group after 20 s."""
    deadline = time.monotonic() + 20
    for pid in _group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process and its living children, in clock ticks."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def settle(pid: int, timeout: float = 30.0) -> None:
    """Wait until a freshly started server is idle (below 5% of a core over half a second)."""
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    before = _cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _cpu_ticks(pid)
        if (now - before) / hz < 0.025:
            return
        before = now


def recycle_memory(directory: Path, mib: int) -> None:
    """Write `mib` MiB to a file and delete it, so that the transfer measured next fills pages the kernel has
    handed out before. On this kind of virtual machine, memory the guest has never touched costs several times
    more the first time (a fresh process writes its first 256 MiB file at ~0.8 GB/s, the next ones at ~5 GB/s),
    and without this the system measured first would pay for it alone (runledger's files, deleted, warmed
    MLflow's run)."""
    block = bytes(1 << 20)
    path = directory / "recycled-pages.tmp"
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(block)
    path.unlink()


def run_mlflow(workload: str, uri: str, *args: str) -> dict[str, Any]:
    cmd = [str(mlflow_python()), str(BENCH / "mlflow_workloads.py"), workload, "--uri", uri, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **QUIET_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"mlflow {workload} failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---- runledger workloads ---------------------------------------------------------------------------------
def _log_steps(run: runledger.Run, steps: int) -> float:
    """One trainer's loop: log_metrics of 4 keys per step; returns the seconds spent in the loop."""
    vals = [math.sin(i / 50) for i in range(steps)]
    k0, k1, k2, k3 = KEYS
    start = time.perf_counter()
    for i in range(steps):
        v = vals[i]
        run.log_metrics({k0: v, k1: -v, k2: 0.01 * v, k3: 1.0 + v}, step=i)
    return time.perf_counter() - start


def _log_series(run: runledger.Run, steps: int, per_call: int) -> None:
    """The same points as _log_steps, `per_call` steps of 4 keys per log_series call (as arrays)."""
    vals = np.sin(np.arange(steps) / 50)
    columns = (vals, -vals, 0.01 * vals, 1.0 + vals)
    for lo in range(0, steps, per_call):
        hi = min(steps, lo + per_call)
        run.log_series({k: c[lo:hi] for k, c in zip(KEYS, columns, strict=True)}, steps=np.arange(lo, hi))


def rl_ingest_one(address: str, points: int, repeats: int = 3) -> dict[str, Any]:
    """Per-step and `log_series` ingest of one trainer, each `repeats` times alternately; medians are reported
    (a run takes well under a second here, where one sample moves by tens of percent with the machine)."""
    client = Client(address)
    steps = points // len(KEYS)
    per_step: list[float] = []
    loops: list[float] = []
    series: list[float] = []
    for _ in range(repeats):
        run = client.start_run(experiment="bench-ingest", name="one-trainer")
        start = time.perf_counter()
        loops.append(_log_steps(run, steps))
        run.flush()
        per_step.append(time.perf_counter() - start)
        run.finish()
        # MLflow's client sends 1,000 points per log_batch call; runledger's log_series with 250 steps of 4 keys
        # is the same call shape.
        run = client.start_run(experiment="bench-ingest", name="one-trainer-arrays")
        start = time.perf_counter()
        _log_series(run, steps, 1_000 // len(KEYS))
        run.flush()
        series.append(time.perf_counter() - start)
        run.finish()
    client.close()
    elapsed, series_elapsed = statistics.median(per_step), statistics.median(series)
    return {
        "points": steps * len(KEYS),
        "seconds": elapsed,
        "points_per_s": steps * len(KEYS) / elapsed,
        "us_per_step": 1e6 * statistics.median(loops) / steps,
        "series_seconds": series_elapsed,
        "series_points_per_s": steps * len(KEYS) / series_elapsed,
        "all_seconds": per_step,
        "all_series_seconds": series,
    }


def _rl_trainer(address: str, experiment: str, points: int, per_call: int, ready: Any, go: Any, out: Any) -> None:
    """One trainer process: `log_metrics` per step (per_call 0), or `log_series` of `per_call` steps."""
    client = Client(address)
    run = client.start_run(experiment=experiment)
    ready.put(1)
    go.wait()
    if per_call:
        _log_series(run, points // len(KEYS), per_call)
    else:
        _log_steps(run, points // len(KEYS))
    run.flush()
    out.put(time.time())
    run.finish()
    client.close()


def rl_ingest_many(address: str, points: int, trainers: int) -> dict[str, Any]:
    per_step = _rl_ingest_many(address, points, trainers, 0)
    series = _rl_ingest_many(address, points, trainers, 1_000 // len(KEYS))
    return {**per_step, "series_seconds": series["seconds"], "series_points_per_s": series["points_per_s"]}


def _rl_ingest_many(address: str, points: int, trainers: int, per_call: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a clean gRPC runtime in each trainer
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    per = points // trainers
    procs = [
        ctx.Process(target=_rl_trainer, args=(address, "bench-ingest-many", per, per_call, ready, go, out))
        for _ in range(trainers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start = time.time()
    go.set()
    ends = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    total = per // len(KEYS) * len(KEYS) * trainers
    elapsed = max(ends) - start
    return {"points": total, "seconds": elapsed, "points_per_s": total / elapsed}


def _ack_all(stub: tracking_service_pb2_grpc.TrackingServiceStub, reqs: list[tpb.StreamMetricsRequest]) -> None:
    window = threading.Semaphore(32)

    def gen() -> Iterator[tpb.StreamMetricsRequest]:
        for r in reqs:
            window.acquire()
            yield r

    for _ in stub.StreamMetrics(gen()):
        window.release()


def rl_history(address: str, points: int) -> dict[str, Any]:
    client = Client(address)
    run = client.start_run(experiment="bench-history")
    per = 10_000
    stamps = np.full(per, 1_700_000_000_000, dtype=np.int64)
    reqs = [
        tpb.StreamMetricsRequest(
            run_id=run.run_id,
            writer_id="loader",
            seq=seq,
            series=[wire.series("train/loss", np.arange(lo, lo + per), np.sin(np.arange(lo, lo + per) / 50), stamps)],
        )
        for seq, lo in enumerate(range(0, points, per))
    ]
    with grpc.insecure_channel(address) as ch:
        _ack_all(tracking_service_pb2_grpc.TrackingServiceStub(ch), reqs)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        got = client.metric_history(run.run_id, "train/loss")
        times.append(time.perf_counter() - start)
        assert got.steps.shape[0] == points, got.steps.shape
    run.finish()
    client.close()
    return {"points": points, "seconds": statistics.median(times), "all_seconds": times}


class RlRegistry:
    """Raw-stub shortcuts for a registry fixture: a run with complete lineage and an uploaded artifact."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self.artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)

    def run_with_artifact(self, path: str = "model.safetensors") -> str:
        exp = self.tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name=f"reg-{time.time_ns()}"))
        run_id = self.tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name, lineage=LINEAGE)).run_id
        data = b"weights " * 1024
        header = apb.UploadArtifactHeader(
            run_id=run_id, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        self.artifacts.UploadArtifact(
            iter([apb.UploadArtifactRequest(header=header), apb.UploadArtifactRequest(chunk=data)])
        )
        return run_id

    def model(self, model_id: str) -> str:
        self.registry.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(model_id=model_id))
        self.registry.CreateGate(
            rpb.CreateGateRequest(
                model=f"models/{model_id}",
                gate_id="eval",
                suite_fingerprint="bench-suite@1",
                metric="score",
                direction=common_pb2.DIRECTION_MAXIMIZE,
                threshold=0.0,
            )
        )
        return f"models/{model_id}"

    def version(self, model: str, run_id: str) -> int:
        req = rpb.CreateModelVersionRequest(model=model, run_id=run_id, artifact_path="model.safetensors")
        return int(self.registry.CreateModelVersion(req).version)

    def score(self, model: str, version: int, score: float) -> None:
        self.registry.RecordGateResult(
            rpb.RecordGateResultRequest(model=model, gate_id="eval", version=version, score=score)
        )

    def set_alias(self, model: str, version: int) -> None:
        resp = self.registry.SetAlias(
            rpb.SetAliasRequest(model=model, alias="production", version=version, gate_id="eval")
        )
        assert resp.alias.version == version, resp


def rl_registry(address: str, versions: int, scratch: Path) -> dict[str, Any]:
    """Timed through the Python client, as MLflow's side is through MlflowClient; the fixture through stubs.

    Also the floor of one version creation at a time on this machine, measured in the same run: a gRPC round
    trip that does nothing, plus one durable commit on the same disk."""
    with grpc.insecure_channel(address) as ch, Client(address) as client:
        reg = RlRegistry(ch)
        run_id = reg.run_with_artifact()
        model = reg.model(f"bench-{time.time_ns()}")
        for _ in range(WARM_UP_VERSIONS):  # the connection and first calls, untimed (as on MLflow's side)
            client.register(run_id, model=model, artifact_path="model.safetensors")
        start = time.perf_counter()
        made = [
            client.register(run_id, model=model, artifact_path="model.safetensors").version for _ in range(versions)
        ]
        create_s = time.perf_counter() - start
        rtt_ms = round_trip_ms(client.channel)
        commit_ms = durable_commit_ms(scratch)
        for v in made:  # the gate's scores, recorded by the eval job beforehand (MLflow's move has no gate)
            reg.score(model, v, float(v))
        start = time.perf_counter()
        for v in made:
            moved = client.registry.set_alias(model, "production", v, gate="eval")
            assert moved.alias.version == v, moved
        alias_s = time.perf_counter() - start
        more = [reg.version(model, run_id) for _ in range(versions // 4)]  # not scored yet
        start = time.perf_counter()
        for v in more:  # moves with their scores recorded inside the timing
            client.registry.record_gate_result(model, "eval", v, float(v))
            moved = client.registry.set_alias(model, "candidate", v, gate="eval")
            assert moved.alias.version == v, moved
        scored_s = time.perf_counter() - start
    return {
        "versions": versions,
        "versions_per_s": versions / create_s,
        "set_alias_per_s": versions / alias_s,
        "scored_set_alias_per_s": len(more) / scored_s,
        "round_trip_ms": rtt_ms,
        "durable_commit_ms": commit_ms,
        "floor_versions_per_s": 1e3 / (rtt_ms + commit_ms),
    }


def _rl_stream_until(address: str, rate: int, ready: Any, stop: Any, out: Any) -> None:
    """A trainer logging 4 keys per step until told to stop: as fast as it can (rate 0) or `rate` points/s."""
    client = Client(address)
    run = client.start_run(experiment="bench-load")
    ready.put(1)
    k0, k1, k2, k3 = KEYS
    step = 0
    burst = 1_000 if rate == 0 else 1
    start = time.perf_counter()
    while not stop.is_set():
        for _ in range(burst):
            run.log_metrics({k0: 0.5, k1: 0.25, k2: 0.01, k3: 1.5}, step=step)
            step += 1
        if rate:
            ahead = start + step * len(KEYS) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    run.flush()
    out.put((step * len(KEYS), time.perf_counter() - start))
    run.finish()
    client.close()


def rl_lookup(address: str, calls: int, trainers: int, rate: int, max_seconds: float) -> dict[str, Any]:
    with grpc.insecure_channel(address) as ch:
        reg = RlRegistry(ch)
        model = reg.model(f"lookup-{time.time_ns()}")
        version = reg.version(model, reg.run_with_artifact())
        reg.score(model, version, 1.0)
        reg.set_alias(model, version)
        ctx = mp.get_context("spawn")
        ready, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_rl_stream_until, args=(address, rate, ready, stop, out)) for _ in range(trainers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        if procs:
            time.sleep(2)  # let the trainers reach a steady state
        client = Client(address)
        lookup = functools.partial(client.registry.lookup, model, "production")
        for _ in range(50):
            lookup()
        lat: list[float] = []
        deadline = time.perf_counter() + max_seconds
        for _ in range(calls):
            t = time.perf_counter()
            got = lookup()
            lat.append(time.perf_counter() - t)
            if t > deadline:
                break
        assert got.model_version.version == version
        client.close()
        stop.set()
        load = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    return summarize(lat, load)


def rl_artifacts(address: str, size_mib: int, tmp: Path) -> dict[str, Any]:
    src = tmp / "model.safetensors"
    with src.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    with grpc.insecure_channel(address) as ch:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="bench-artifacts"))
        run_id = tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name)).run_id
        start = time.perf_counter()
        client_artifacts.upload_file(ch, run_id, src, progress=False)
        up = time.perf_counter() - start
        dest = tmp / "down"
        dest.mkdir()
        start = time.perf_counter()
        got = client_artifacts.download(ch, run_id, "model.safetensors", dest, progress=False)
        down = time.perf_counter() - start
        assert got.stat().st_size == size_mib << 20
    src.unlink()
    got.unlink()
    return {"size_mib": size_mib, "upload_mib_s": size_mib / up, "download_mib_s": size_mib / down}


# ---- orchestration ---------------------------------------------------------------------------------------
OTHERS: list[float] = []  # cores used by other processes during each measurement


def _busy_and_own() -> tuple[float, float]:
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process and its waited-for children).

    Servers and trainers are children of this process (the MLflow server's workers are its children), so once
    they have exited, the difference over a measurement is the CPU other work on the machine took meanwhile.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # user nice system irq softirq
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy / os.sysconf("SC_CLK_TCK"), own


def measure(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    """Run one side of a workload; a failure becomes the reason shown in the table instead of a figure."""
    print(f"  {label} ...", end="", flush=True)
    busy0, own0 = _busy_and_own()
    start = time.perf_counter()
    try:
        result = fn()
        busy1, own1 = _busy_and_own()
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (time.perf_counter() - start)
        OTHERS.append(others)
        result["other_cores"] = round(others, 3)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "error"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        reason = f"{code}: {details}"[:120]
        print(f" failed ({reason})")
        return reason
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:120]
        print(f" failed ({reason})")
        return reason
    print(f" {time.perf_counter() - start:.1f} s  {json.dumps(result)}")
    return result


def on_runledger(tmp: Path, label: str, fn: Callable[[str, Path], dict[str, Any]]) -> dict[str, Any] | str:
    def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=tmp) as d, runledger_server(Path(d) / "data") as (address, pid):
            settle(pid)
            return fn(address, Path(d))

    return measure(f"runledger {label}", go)


def on_mlflow(
    tmp: Path, label: str, fn: Callable[[str, Path], dict[str, Any]], kinds: list[str]
) -> dict[str, dict[str, Any] | str]:
    """The workload against each kind of MLflow server, a fresh one each time."""

    def go(kind: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=tmp) as d, mlflow_server(Path(d) / "mlflow", kind) as (uri, db):
            return fn(uri, db)

    return {kind: measure(f"mlflow/{kind:8s} {label}", functools.partial(go, kind)) for kind in kinds}


def fill(
    row: Row, rl: dict[str, Any] | str, mf: dict[str, dict[str, Any] | str] | str, key: str, mf_key: str = ""
) -> Row:
    """Put the figures in the row; MLflow's is the better of its servers' (which one is kept in the row).

    `mf_key` names MLflow's figure when it differs from runledger's (the same measurement for both rows)."""
    mf_key = mf_key or key
    if isinstance(rl, str):
        row.runledger_note = f"n/a ({rl})"
    else:
        row.runledger = float(rl[key])
    if isinstance(mf, str):
        row.mlflow_note = f"n/a ({mf})"
        return row
    measured = {kind: float(r[mf_key]) for kind, r in mf.items() if not isinstance(r, str)}
    if not measured:
        row.mlflow_note = f"n/a ({next(iter(mf.values()))})"
        return row
    pick = max if row.higher_is_better else min
    row.mlflow_server = pick(measured, key=lambda kind: measured[kind])
    row.mlflow = measured[row.mlflow_server]
    return row


def run_workloads(
    selected: list[str], s: Sizes, tmp: Path, systems: set[str], kinds: list[str], raw: dict[str, Any]
) -> list[Row]:
    rows: list[Row] = []

    def both(
        name: str, rl_fn: Callable[[str, Path], dict[str, Any]], mf_fn: Callable[[str, Path], dict[str, Any]]
    ) -> tuple[dict[str, Any] | str, dict[str, dict[str, Any] | str] | str]:
        rl = on_runledger(tmp, name, rl_fn) if "runledger" in systems else "not run"
        mf = on_mlflow(tmp, name, mf_fn, kinds) if "mlflow" in systems else "not run"
        raw[name] = {"runledger": rl, "mlflow": mf}
        return rl, mf

    pts = f"{s.points:,}"
    if "ingest1" in selected:
        print(f"ingest, one trainer, {pts} points")
        rl, mf = both(
            "ingest1",
            lambda a, _d: rl_ingest_one(a, s.points),
            lambda u, _db: run_mlflow("ingest", u, "--points", str(s.points)),
        )
        rows.append(fill(Row(f"ingest, 1 trainer, {pts} points", "points/s", True), rl, mf, "points_per_s"))
        label = f"ingest, 1 trainer, {pts} points, 1,000 per call (runledger log_series, MLflow log_batch)"
        rows.append(fill(Row(label, "points/s", True), rl, mf, "series_points_per_s", "points_per_s"))
        rows.append(fill(Row("training-thread time per step of 4 keys", "µs", False), rl, mf, "us_per_step"))
    if "ingest16" in selected:
        print(f"ingest, {s.trainers} trainers")
        rl, mf = both(
            "ingest16",
            lambda a, _d: rl_ingest_many(a, s.multi_points, s.trainers),
            lambda u, _db: run_mlflow("ingest", u, "--points", str(s.multi_points), "--trainers", str(s.trainers)),
        )
        label = f"ingest, {s.trainers} trainers, {s.multi_points:,} points"
        rows.append(fill(Row(label, "points/s", True), rl, mf, "points_per_s"))
        label = f"ingest, {s.trainers} trainers, 1,000 per call (runledger log_series, MLflow log_batch)"
        rows.append(fill(Row(label, "points/s", True), rl, mf, "series_points_per_s", "points_per_s"))
    if "history" in selected:
        hp = s.history_points
        print(f"history, {hp:,} points")
        rl, mf = both(
            "history",
            lambda a, _d: rl_history(a, hp),
            lambda u, db: run_mlflow("history", u, "--db", str(db), "--points", str(hp)),
        )
        rows.append(fill(Row(f"history read, 1 key, {hp:,} points", "s", False), rl, mf, "seconds"))
    if "lookup" in selected:
        n = s.load_trainers
        variants = [(0, 0, "idle"), (n, 0, f"{n} trainers streaming flat out")]
        if s.load_rate:
            variants.append((n, s.load_rate, f"{n} trainers streaming {s.load_rate:,} points/s each"))
        for trainers, rate, what in variants:
            print(f"alias lookup, {what}")

            def rl_side(address: str, _tmp: Path, t: int = trainers, r: int = rate) -> dict[str, Any]:
                return rl_lookup(address, s.calls, t, r, s.lookup_max_seconds)

            def mf_side(uri: str, _db: Path, t: int = trainers, r: int = rate) -> dict[str, Any]:
                args = ("--calls", str(s.calls), "--trainers", str(t), "--rate", str(r))
                return run_mlflow("lookup", uri, *args, "--max-seconds", str(s.lookup_max_seconds))

            rl, mf = both(f"lookup_{trainers}_{rate}", rl_side, mf_side)
            rows.append(fill(Row(f"alias lookup p50, {what}", "ms", False), rl, mf, "p50_ms"))
            rows.append(fill(Row(f"alias lookup p99, {what}", "ms", False), rl, mf, "p99_ms"))
    if "registry" in selected:
        print(f"registry, {s.versions} versions")
        rl, mf = both(
            "registry",
            lambda a, d: rl_registry(a, s.versions, d),
            lambda u, _db: run_mlflow("registry", u, "--versions", str(s.versions), "--warm-up", str(WARM_UP_VERSIONS)),
        )
        rows.append(fill(Row("version creation", "versions/s", True), rl, mf, "versions_per_s"))
        rows.append(fill(Row("SetAlias / set_registered_model_alias", "calls/s", True), rl, mf, "set_alias_per_s"))
    if "artifacts" in selected:
        mib = s.artifact_mib
        print(f"artifacts, {mib} MiB")

        def rl_transfers(address: str, scratch: Path) -> dict[str, Any]:
            recycle_memory(scratch, 4 * mib)
            return rl_artifacts(address, mib, scratch)

        def mf_transfers(uri: str, db: Path) -> dict[str, Any]:
            recycle_memory(db.parent, 4 * mib)
            return run_mlflow("artifacts", uri, "--size-mib", str(mib))

        rl, mf = both("artifacts", rl_transfers, mf_transfers)
        rows.append(fill(Row(f"artifact upload, {mib} MiB", "MiB/s", True), rl, mf, "upload_mib_s"))
        rows.append(fill(Row(f"artifact download, {mib} MiB", "MiB/s", True), rl, mf, "download_mib_s"))
    return rows


# ---- report ----------------------------------------------------------------------------------------------
def fmt(value: float | None, note: str) -> str:
    if value is None:
        return note or "n/a"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def machine() -> dict[str, str]:
    mem = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpus": str(os.cpu_count()),
        "memory": f"{mem / (1 << 20):.0f} GiB",
        "os": os_name,
        "python": platform.python_version(),
    }


def versions(mlflow_version: str) -> dict[str, str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH.parent
    ).stdout.strip()
    return {
        "runledger": f"{runledger.__version__} ({commit or 'unknown commit'})",
        "mlflow": mlflow_version,
        "grpcio": grpc.__version__,
    }


def table(rows: list[Row]) -> str:
    lines = ["| workload | runledger | MLflow | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.ratio:,.1f}x" if r.ratio is not None else "n/a"
        name = f"{r.workload} ({r.unit}, {'higher' if r.higher_is_better else 'lower'} is better)"
        mlflow = fmt(r.mlflow, r.mlflow_note) + (f" ({r.mlflow_server[0]})" if r.mlflow_server else "")
        lines.append(f"| {name} | {fmt(r.runledger, r.runledger_note)} | {mlflow} | {ratio} |")
    return "\n".join(lines)


def version_creation_floor(raw: dict[str, Any], rows: list[Row]) -> dict[str, float] | None:
    """The floor measured beside runledger's version creation, and the rates to set against it."""
    rl = raw.get("registry", {}).get("runledger")
    row = next((r for r in rows if r.workload == "version creation"), None)
    if not isinstance(rl, dict) or "floor_versions_per_s" not in rl or row is None:
        return None
    floor = {k: float(rl[k]) for k in ("round_trip_ms", "durable_commit_ms", "floor_versions_per_s")}
    floor["reached"] = float(rl["versions_per_s"]) / floor["floor_versions_per_s"]
    if row.mlflow is not None:
        floor["ten_times_mlflow"] = 10 * row.mlflow
    return floor


def floor_note(floor: dict[str, float] | None) -> list[str]:
    if floor is None:
        return []
    ten = floor.get("ten_times_mlflow")
    return [
        "- Version creation is one call at a time, each committed durably before it returns. Measured in the "
        f"same run, its floor here is {floor['floor_versions_per_s']:,.0f} versions/s: a gRPC round trip that "
        f"does no work ({floor['round_trip_ms']:.3f} ms, a health check on the client's channel) plus one "
        f"durable commit ({floor['durable_commit_ms']:.3f} ms, a one-row SQLite commit in WAL mode with "
        f"synchronous=FULL, i.e. one fsync, on the same disk). runledger reaches {floor['reached']:.0%} of it"
        + (f"; ten times MLflow's rate would be {ten:,.0f}/s." if ten is not None else "."),
    ]


def report(rows: list[Row], meta: dict[str, Any]) -> str:
    m, v = meta["machine"], meta["versions"]
    load = meta["load_average"]
    others = meta["other_cores"]
    return "\n".join(
        [
            "# runledger vs MLflow",
            "",
            f"Measured {meta['date']} on {m['cpus']} cores, {m['memory']}, {m['os']}, Python {m['python']}; "
            f"client and server on the same machine. The 1-minute load average was {load['start']:.2f} at the start; "
            f"other work on the machine took {min(others, default=0):.2f}-{max(others, default=0):.2f} of the "
            f"{m['cpus']} cores during the measurements (mean {statistics.fmean(others) if others else 0:.2f}; "
            "`/proc/stat` minus this benchmark's own processes)"
            f"{'; quick run: scaled-down sizes' if meta['quick'] else ''}.",
            f"Versions: runledger {v['runledger']}, MLflow {v['mlflow']} (`mlflow server --workers 1`, SQLite "
            f"store, proxied local artifacts), grpcio {v['grpcio']}.",
            "",
            "Each MLflow figure is the better of its two web servers, each with one worker: (u) uvicorn, its "
            "default, and (g) gunicorn (`--gunicorn-opts '--timeout 900'`); the JSON has both.",
            "",
            "The ratio is how many times better runledger is (above 1: runledger is ahead).",
            "",
            table(rows),
            "",
            "How each figure is taken (details in `bench/compare_mlflow.py`):",
            "",
            "- Ingest is timed from the first log call until the points are durably stored: runledger's `flush()` "
            "returns once the server has acknowledged its commit; MLflow's last `log_batch` (1,000 points) returns. "
            "runledger's one-trainer figures are the median of 3 runs (each under a second), MLflow's are one run "
            "per web server (over a minute each).",
            '- "1,000 per call": runledger\'s `log_series` with 250 steps of 4 keys as arrays per call, the call '
            "shape of MLflow's `log_batch`; the MLflow figure is the same measurement as in the row above.",
            "- Training-thread time: runledger's `log_metrics` buffers and returns; MLflow's `log_batch` is "
            "synchronous, so its figure is the loop's time per step (one call per 250 steps of 4 keys).",
            "- History: runledger's figure is the median of 3 reads; MLflow's is one read of rows written "
            "straight into its SQLite tables.",
            '- Alias lookups run on one connection, one call at a time. "Flat out": each trainer is a process '
            'logging as fast as it can (trainers, server and the caller share the 2 cores); "paced": each trainer '
            "logs a fixed number of points per second. A loaded MLflow run stops after "
            f"{meta['sizes']['lookup_max_seconds']:.0f} s of calls (the count is in the JSON).",
            "- runledger's SetAlias checks the gate result against the threshold and the incumbent's score and "
            "records the alias history in the same transaction; MLflow's alias move has no check.",
            *floor_note(meta.get("version_creation_floor")),
            f"- Version creation and SetAlias are timed after {WARM_UP_VERSIONS} versions created untimed on "
            "each system (the connection and first calls).",
            "- Artifacts: runledger's client hashes the file (sha256) before the upload and verifies it after "
            "the download, both inside the timing; MLflow's checks neither. Before each system's run, 1 GiB is "
            "written and deleted, so that both fill memory the kernel has used before (on this kind of virtual "
            "machine, memory touched for the first time costs several times more, and it went to whichever ran "
            "first).",
            "- MLflow runs without its job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`: seven huey "
            "processes for GenAI jobs, unused here, whose start-up would compete with the workload).",
            "",
            f"Rerun: `.venv/bin/python bench/compare_mlflow.py` (raw figures: `bench/results/{meta['stem']}.json`).",
            "",
        ]
    )


def plot(rows: list[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing, so no plot was drawn: .venv/bin/pip install -e '.[bench]'")
        return False
    shown = [r for r in rows if r.ratio is not None]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(shown) + 1.5))
    names = [r.workload for r in shown][::-1]
    ratios = [r.ratio or 1.0 for r in shown][::-1]
    colors = ["#2a7ab0" if x >= 1 else "#c0504d" for x in ratios]
    ax.barh(names, ratios, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, x in enumerate(ratios):
        ax.text(x, y, f" {x:,.1f}x", va="center", fontsize=8)
    ax.set_xlabel("how many times better runledger is than MLflow (log scale)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    lo, hi = min(*ratios, 1.0), max(*ratios, 1.0)
    ax.set_xlim(lo / 2, hi * 6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def title_of(meta: dict[str, Any]) -> str:
    return f"runledger vs MLflow {meta['versions']['mlflow']}, {meta['date']}, {meta['machine']['cpus']} cores"


def replot(stem: str) -> None:
    """Draw the plot of an earlier run from its JSON (a run without matplotlib wrote no plot)."""
    saved = json.loads((RESULTS / f"{stem}.json").read_text())
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in names}) for r in saved["rows"]]
    if plot(rows, RESULTS / f"{stem}.png", title_of(saved["meta"])):
        print(f"wrote bench/results/{stem}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--replot", action="store_true", help="only draw the plot again from bench/results/<out>.json (no run)"
    )
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes for a smoke run of a few minutes")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(WORKLOADS)} ('ingest': both)")
    ap.add_argument("--out", default="comparison", help="file stem under bench/results/ (default: comparison)")
    ap.add_argument("--systems", default="runledger,mlflow", help="measure only some systems (default: both)")
    ap.add_argument(
        "--mlflow-servers", default="uvicorn,gunicorn", help="MLflow web servers to try (default: both; best is kept)"
    )
    args = ap.parse_args()
    if args.replot:
        replot(args.out)
        return
    kinds = [k.strip() for k in args.mlflow_servers.split(",") if k.strip()]
    if not kinds or set(kinds) - set(MLFLOW_SERVERS):
        ap.error(f"--mlflow-servers takes {' and/or '.join(MLFLOW_SERVERS)}")
    systems = {x.strip() for x in args.systems.split(",") if x.strip()}
    if not systems or systems - {"runledger", "mlflow"}:
        ap.error("--systems takes runledger, mlflow or both")
    selected = list(WORKLOADS)
    if args.only:
        asked = [w.strip() for w in args.only.split(",") if w.strip()]
        asked = [x for w in asked for x in (("ingest1", "ingest16") if w == "ingest" else (w,))]
        unknown = sorted(set(asked) - set(WORKLOADS))
        if unknown:
            ap.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
        selected = [w for w in WORKLOADS if w in asked]
    sizes = QUICK if args.quick else FULL
    mlflow_version = ensure_mlflow() if "mlflow" in systems else "not run"
    meta: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "versions": versions(mlflow_version),
        "quick": args.quick,
        "sizes": asdict(sizes),
        "load_average": {"start": os.getloadavg()[0]},
        "stem": args.out,
    }
    print(f"load average {os.getloadavg()}; workloads: {', '.join(selected)}")
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="runledger-vs-mlflow-") as tmp:
        rows = run_workloads(selected, sizes, Path(tmp), systems, kinds, raw)
    meta["load_average"]["end"] = os.getloadavg()[0]
    meta["version_creation_floor"] = version_creation_floor(raw, rows)
    meta["other_cores"] = OTHERS
    text = report(rows, meta)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"meta": meta, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows], "raw": raw}, indent=2) + "\n"
    )
    drew = plot(rows, RESULTS / f"{args.out}.png", title_of(meta))
    print()
    print(text)
    written = [f"{args.out}.md", f"{args.out}.json"] + ([f"{args.out}.png"] if drew else [])
    print(f"wrote {', '.join('bench/results/' + w for w in written)}")


if __name__ == "__main__":
    main()
