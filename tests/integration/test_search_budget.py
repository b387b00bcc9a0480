"""A search whose filter makes the database work too long is stopped after the store's query budget, with
RESOURCE_EXHAUSTED naming the filter, on SQLite and PostgreSQL; the same store answers cheap searches."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.domain import filters, ids
from runledger_server.domain.errors import ResourceExhausted
from runledger_server.domain.lineage import Lineage

RUNS = 120
LONG_VALUE = "a" * 200_000  # a long param (a prompt template, a serialized config): legal, up to 1 MiB
# A `%` followed by many single-character wildcards: LIKE then costs (value length x pattern length) per row.
COSTLY = "params.template LIKE '%" + "a_" * 120 + "b'"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    sqlite = f"sqlite:///{tmp_path / 'meta.db'}"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    db = Database(url)
    migrate.upgrade(db)
    request.addfinalizer(db.dispose)
    return db


def _store_with_long_params(db: Database, budget: float, runs: int, value: str) -> tuple[SqlTrackingStore, str]:
    store = SqlTrackingStore(db, query_budget=budget)
    experiment = store.create_experiment(f"budget-{runs}", "", {}).experiment_id
    for i in range(runs):
        store.create_run(ids.new_id(), experiment, f"r{i}", {}, {"template": value, "i": str(i)}, Lineage(), None)
    return store, experiment


def _search(store: SqlTrackingStore, experiment: str, text: str) -> list[str]:
    page = store.search_runs([experiment], filters.parse_filter(text), filters.parse_order_by(""), 1000, "")
    return [r.display_name for r in page.items]


def test_a_costly_search_is_stopped_after_the_budget_and_a_cheap_one_still_answers(database: Database) -> None:
    store, experiment = _store_with_long_params(database, 0.2, RUNS, LONG_VALUE)
    start = time.monotonic()
    with pytest.raises(ResourceExhausted) as info:  # run to its end, it takes seconds on SQLite, minutes on PG
        _search(store, experiment, COSTLY)
    assert time.monotonic() - start < 3.0
    assert info.value.reason == "QUERY_TOO_EXPENSIVE" and info.value.field == "filter"
    assert "0.2 s" in str(info.value)
    assert _search(store, experiment, "params.i = '7'") == ["r7"]  # the connection and the store still work
    assert _search(store, experiment, "params.i = '8'") == ["r8"]  # ... also the next one from the pool


def test_a_costly_search_within_its_budget_answers(database: Database) -> None:
    store, experiment = _store_with_long_params(database, 60.0, 2, LONG_VALUE[:5_000])
    assert _search(store, experiment, COSTLY) == []  # no value holds a "b": every row is scanned to its end
    assert _search(store, experiment, "params.template LIKE 'aa%'") == ["r0", "r1"]
