"""The comparison workloads through MLflow's own Python client; runs in MLflow's virtual environment.

Each subcommand prints one JSON object on its last stdout line. Invoked by compare_mlflow.py, which starts
the MLflow server (`mlflow server --workers 1`, SQLite store, local proxied artifacts) and passes its URI.
Trainer processes are forked and connected before the clock starts, so process start-up is never timed.

Run by hand: bench/.venv-mlflow/bin/python bench/mlflow_workloads.py ingest --uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import sqlite3
import tempfile
import time
from typing import Any

import mlflow
from _latency import summarize  # this directory is on sys.path when the script runs
from mlflow import MlflowClient
from mlflow.entities import Metric

KEYS = ("train/loss", "train/reward", "train/kl", "train/entropy")
BATCH = 1_000  # points per log_batch call


def _values(steps: int) -> list[float]:
    return [math.sin(i / 50) for i in range(steps)]


def _log_points(client: MlflowClient, run_id: str, points: int) -> float:
    """log_batch of BATCH points at a time, 4 keys per step; returns the seconds spent."""
    steps = points // len(KEYS)
    vals = _values(steps)
    ts = int(time.time() * 1000)
    start = time.perf_counter()
    pending: list[Metric] = []
    for step in range(steps):
        v = vals[step]
        for key in KEYS:
            pending.append(Metric(key, v, ts, step))
        if len(pending) >= BATCH:
            client.log_batch(run_id, metrics=pending)
            pending = []
    if pending:
        client.log_batch(run_id, metrics=pending)
    return time.perf_counter() - start


def _trainer(uri: str, experiment_id: str, points: int, ready: Any, go: Any, out: Any) -> None:
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(experiment_id).info.run_id
        ready.put(1)
        go.wait()
        _log_points(client, run_id, points)
        out.put(time.time())
        client.set_terminated(run_id)
    except Exception as exc:  # reported, so the parent fails this workload instead of waiting for its result
        out.put(f"{type(exc).__name__}: {exc}"[:500])
        ready.put(1)  # in case it failed before saying it was ready
        raise


def ingest(uri: str, points: int, trainers: int) -> dict[str, Any]:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"ingest-{trainers}-{time.time_ns()}")
    if trainers == 1:
        run_id = client.create_run(exp).info.run_id
        elapsed = _log_points(client, run_id, points)
        client.set_terminated(run_id)
        steps = points // len(KEYS)
        return {
            "points": points,
            "seconds": elapsed,
            "points_per_s": points / elapsed,
            "us_per_step": 1e6 * elapsed / steps,
        }
    ready: mp.Queue[int] = mp.Queue()
    out: mp.Queue[float | str] = mp.Queue()  # a trainer that failed puts its error
    go = mp.Event()
    per = points // trainers
    procs = [mp.Process(target=_trainer, args=(uri, exp, per, ready, go, out)) for _ in range(trainers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start = time.time()
    go.set()
    ends = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    failed = [e for e in ends if isinstance(e, str)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {trainers} MLflow trainers failed; first: {failed[0]}")
    elapsed = max(e for e in ends if isinstance(e, float)) - start
    return {"points": per * trainers, "seconds": elapsed, "points_per_s": per * trainers / elapsed}


def history(uri: str, db_path: str, points: int) -> dict[str, Any]:
    """Load the points straight into MLflow's own tables (its fastest path), then time its read API."""
    client = MlflowClient(uri)
    exp = client.create_experiment(f"history-{time.time_ns()}")
    run_id = client.create_run(exp).info.run_id
    client.log_metric(run_id, "train/loss", 0.0, step=0)  # creates latest_metrics and the run's row shape
    con = sqlite3.connect(db_path, timeout=60)
    ts = int(time.time() * 1000)
    rows = (("train/loss", math.sin(i / 50), ts, run_id, i, 0) for i in range(1, points))
    with con:
        con.executemany(
            "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
    con.close()
    start = time.perf_counter()
    got = client.get_metric_history(run_id, "train/loss")
    elapsed = time.perf_counter() - start
    assert len(got) == points, len(got)
    return {"points": points, "seconds": elapsed}


def _stream_until(uri: str, experiment_id: str, rate: int, ready: Any, stop: Any, out: Any) -> None:
    """A trainer logging 1,000 points per log_batch until told to stop: flat out (rate 0) or `rate` points/s."""
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    ts = int(time.time() * 1000)
    ready.put(1)
    step = 0
    per_batch = BATCH // len(KEYS)
    start = time.perf_counter()
    while not stop.is_set():
        batch = [Metric(k, 0.5, ts, step + i) for i in range(per_batch) for k in KEYS]
        client.log_batch(run_id, metrics=batch)
        step += per_batch
        if rate:
            ahead = start + step * len(KEYS) / rate - time.perf_counter()
            if ahead > 0:
                stop.wait(ahead)
    out.put((step * len(KEYS), time.perf_counter() - start))


def _registered_model(client: MlflowClient, name: str) -> str:
    exp = client.create_experiment(f"reg-{time.time_ns()}")
    run = client.create_run(exp)
    client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "production", mv.version)
    return run.info.run_id


def lookup(uri: str, calls: int, trainers: int, rate: int, max_seconds: float) -> dict[str, Any]:
    """p50/p99 of get_model_version_by_alias over `calls` calls (or as many as fit in `max_seconds`)."""
    client = MlflowClient(uri)
    name = f"lookup-{time.time_ns()}"
    _registered_model(client, name)
    procs: list[mp.Process] = []
    stop = mp.Event()
    ready: mp.Queue[int] = mp.Queue()
    out: mp.Queue[tuple[int, float]] = mp.Queue()
    if trainers:
        exp = client.create_experiment(f"load-{time.time_ns()}")
        procs = [mp.Process(target=_stream_until, args=(uri, exp, rate, ready, stop, out)) for _ in range(trainers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        time.sleep(2)  # let the trainers reach a steady state
    for _ in range(50):
        client.get_model_version_by_alias(name, "production")
    lat: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(calls):
        t = time.perf_counter()
        client.get_model_version_by_alias(name, "production")
        lat.append(time.perf_counter() - t)
        if t > deadline:
            break
    stop.set()
    load = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return summarize(lat, load)


def registry(uri: str, versions: int, warm_up: int) -> dict[str, Any]:
    client = MlflowClient(uri)
    name = f"reg-{time.time_ns()}"
    exp = client.create_experiment(f"regexp-{time.time_ns()}")
    run = client.create_run(exp)
    client.create_registered_model(name)
    for _ in range(warm_up):  # the connection and first calls, untimed (as on runledger's side)
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    start = time.perf_counter()
    for _ in range(versions):
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    create_s = time.perf_counter() - start
    start = time.perf_counter()
    for v in range(warm_up + 1, warm_up + versions + 1):
        client.set_registered_model_alias(name, "production", str(v))
    alias_s = time.perf_counter() - start
    return {"versions": versions, "versions_per_s": versions / create_s, "set_alias_per_s": versions / alias_s}


def artifacts(uri: str, size_mib: int) -> dict[str, Any]:
    client = MlflowClient(uri)
    exp = client.create_experiment(f"art-{time.time_ns()}")
    run = client.create_run(exp)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "model.safetensors")
        with open(src, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        start = time.perf_counter()
        client.log_artifact(run.info.run_id, src)
        up = time.perf_counter() - start
        dest = os.path.join(d, "down")
        os.mkdir(dest)
        start = time.perf_counter()
        got = client.download_artifacts(run.info.run_id, "model.safetensors", dest)
        down = time.perf_counter() - start
        assert os.path.getsize(got) == size_mib << 20
    return {"size_mib": size_mib, "upload_mib_s": size_mib / up, "download_mib_s": size_mib / down}


def main() -> None:
    logging.disable(logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=["version", "ingest", "history", "lookup", "registry", "artifacts"])
    ap.add_argument("--uri", default="")
    ap.add_argument("--db", default="", help="the server's SQLite file (history loads rows into it)")
    ap.add_argument("--points", type=int, default=300_000)
    ap.add_argument("--trainers", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5_000)
    ap.add_argument("--rate", type=int, default=0, help="points/s of each load trainer (0: flat out)")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--versions", type=int, default=300)
    ap.add_argument("--warm-up", type=int, default=20, help="versions created before the clock starts")
    ap.add_argument("--size-mib", type=int, default=256)
    a = ap.parse_args()
    out: dict[str, Any]
    if a.workload == "version":
        out = {"mlflow": mlflow.__version__}
    elif a.workload == "ingest":
        out = ingest(a.uri, a.points, a.trainers)
    elif a.workload == "history":
        out = history(a.uri, a.db, a.points)
    elif a.workload == "lookup":
        out = lookup(a.uri, a.calls, a.trainers, a.rate, a.max_seconds)
    elif a.workload == "registry":
        out = registry(a.uri, a.versions, a.warm_up)
    else:
        out = artifacts(a.uri, a.size_mib)
    print()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
