"""Group commit of metric batches: more batches than one SQL statement takes, callers that go away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.domain import ids
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import Batch, Series, joined
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
