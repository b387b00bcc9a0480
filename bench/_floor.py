"""What one durable write costs on this machine whatever the server does: a no-op gRPC round trip and one
durable SQLite commit on the same disk. A rate measured one call at a time is set against the sum of the two."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def durable_commit_ms(directory: Path, commits: int = 500) -> float:
    """Mean time of a one-row SQLite commit as the server makes them (WAL, synchronous=FULL: one fsync each),
    in a scratch database under `directory`, which should be on the server's disk."""
    path = directory / "commit-floor.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for _ in range(20):
            conn.execute("INSERT INTO t (v) VALUES ('warm-up')")
        start = time.perf_counter()
        for i in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
            conn.execute("COMMIT")
        return (time.perf_counter() - start) / commits * 1e3
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def round_trip_ms(channel: grpc.Channel, calls: int = 1_000) -> float:
    """Mean time of a gRPC health check (no database, no work) on `channel`: the floor of any unary call."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    for _ in range(50):
        stub.Check(request)
    start = time.perf_counter()
    for _ in range(calls):
        stub.Check(request)
    return (time.perf_counter() - start) / calls * 1e3
