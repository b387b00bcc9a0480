"""A metadata database with no room: RESOURCE_EXHAUSTED naming it, nothing half-written, and logged metric points
wait in the client until there is room again (then stored once each).

The database is made full the way SQLite itself allows: `PRAGMA max_page_count` at the size the file has, set
on every connection the server takes from its pool, and lifted again to make room.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.pool import Pool

import runledger
from runledger import RetryPolicy, errors
from runledger.v1 import tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer

UNLIMITED = 1 << 30  # pages; SQLite's own default is about this


class PageLimit:
    """The max_page_count every pooled connection of one database file gets when it is checked out."""

    def __init__(self, db_file: Path) -> None:
        self.db_file = db_file
        self.pages = UNLIMITED

    def fill(self) -> None:
        """No more pages than the file has now: the next write that needs a new page fails."""
        with sqlite3.connect(self.db_file) as conn:
            self.pages = int(conn.execute("PRAGMA page_count").fetchone()[0])

    def on_checkout(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            (path,) = [row[2] for row in dbapi_conn.execute("PRAGMA database_list") if row[1] == "main"]
            if Path(path) == self.db_file:
                dbapi_conn.execute(f"PRAGMA max_page_count = {self.pages}")


@pytest.fixture
def limit(tmp_path: Path) -> Iterator[PageLimit]:
    pages = PageLimit((tmp_path / "data" / "runledger.db").resolve())
    event.listen(Pool, "checkout", pages.on_checkout)
    try:
        yield pages
    finally:
        event.remove(Pool, "checkout", pages.on_checkout)


@pytest.fixture
def full_server(tmp_path: Path, limit: PageLimit) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")) as srv:
        yield srv


def test_a_full_database_is_resource_exhausted_and_changes_nothing(
    full_server: EmbeddedServer, limit: PageLimit
) -> None:
    with grpc.insecure_channel(full_server.address) as channel:
        stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        exp = stub.CreateExperiment(pb.CreateExperimentRequest(display_name="full"))
        limit.fill()
        big = {f"tag{i}": "x" * 4000 for i in range(64)}  # far more than the free pages a fresh file has
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateRun(pb.CreateRunRequest(experiment=exp.name, display_name="r", tags=big))
        err = errors.from_rpc_error(caught.value)
        assert isinstance(err, errors.ResourceExhausted)
        assert err.reason == "DATABASE_FULL" and "no room" in err.message
        listed = stub.SearchRuns(pb.SearchRunsRequest(experiments=[exp.name]))
        assert list(listed.runs) == []  # the refused create left nothing behind

        limit.pages = UNLIMITED
        run = stub.CreateRun(pb.CreateRunRequest(experiment=exp.name, display_name="r", tags=big))
        assert dict(run.tags) == big


def test_metric_points_wait_while_the_database_is_full_and_are_stored_once_there_is_room(
    full_server: EmbeddedServer, limit: PageLimit
) -> None:
    fast_retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
    with runledger.Client(full_server.address, retry=fast_retry) as client:
        run = client.start_run(experiment="full-metrics")
        steps = 20_000
        for step in range(steps // 2):
            run.log_metrics({"train/loss": step * 0.5}, step=step)
        run.flush(timeout=60)

        limit.fill()
        for step in range(steps // 2, steps):
            run.log_metrics({"train/loss": step * 0.5}, step=step)
        with pytest.raises(errors.DeadlineExceeded):
            run.flush(timeout=1.0)  # refused by a full database: not stored, not dropped either
        assert run.acked_points == steps // 2

        limit.pages = UNLIMITED
        run.flush(timeout=60)
        run.finish()
        history = client.metric_history(run.run_id, "train/loss")
        assert np.array_equal(history.steps, np.arange(steps))
        assert np.array_equal(history.values, np.arange(steps) * 0.5)
