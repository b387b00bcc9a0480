"""Creation times follow commit order, so paging by creation time (and polling for runs created since a time)
never skips a run that another replica, or another worker thread, was creating at the same moment."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runledger_server.backends.sql import migrate, tracking_store
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.domain.filters import OrderBy
from runledger_server.domain.lineage import Lineage

CREATED = OrderBy("attribute", "create_time", False)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'meta.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    )
    database = Database(url)
    migrate.upgrade(database)
    yield database
    database.dispose()


def _paged(store: SqlTrackingStore, experiment_id: str) -> list[str]:
    names, token = [], ""
    while True:
        page = store.search_runs([experiment_id], (), CREATED, 1, token)
        names += [r.display_name for r in page.items]
        token = page.next_page_token
        if not token:
            return names


def test_a_clock_stepping_back_does_not_reorder_creations(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqlTrackingStore(db)
    exp = store.create_experiment("clock", "", {})
    first = store.create_run("r-first", exp.experiment_id, "first", {}, {}, Lineage(), None)
    monkeypatch.setattr(tracking_store, "now_us", lambda: first.create_time_us - 60_000_000)  # a minute back
    second = store.create_run("r-second", exp.experiment_id, "second", {}, {}, Lineage(), None)
    later_exp = store.create_experiment("clock-later", "", {})
    assert first.create_time_us < second.create_time_us < later_exp.create_time_us
    assert _paged(store, exp.experiment_id) == ["first", "second"]


def test_a_creation_waits_for_one_under_way_and_takes_a_later_time(pg_database_url: str) -> None:
    """Another replica is between taking its creation time and committing: a creation here waits for it, and
    takes a later time, so a page read after both never lands between them."""
    import psycopg
    from sqlalchemy.engine import make_url

    db = Database(pg_database_url)
    migrate.upgrade(db)
    store = SqlTrackingStore(db)
    exp = store.create_experiment("replicas", "", {})
    url = make_url(pg_database_url)
    other = psycopg.connect(f"host={url.host} port={url.port} user={url.username} dbname={url.database}")
    try:
        held = other.execute(
            "UPDATE creation_clock SET last_us = GREATEST(last_us + 1, %s) WHERE id = 1 RETURNING last_us",
            (time.time_ns() // 1000,),
        ).fetchone()
        assert held is not None
        made: list[int] = []
        here = threading.Thread(
            target=lambda: made.append(
                store.create_run("r-here", exp.experiment_id, "here", {}, {}, Lineage(), None).create_time_us
            )
        )
        here.start()
        here.join(0.5)
        assert here.is_alive()  # waiting for the other creation to commit
        other.execute(
            "INSERT INTO runs (id, experiment_id, display_name, status, create_time_us, update_time_us, "
            "start_time_us) VALUES ('r-other', %s, 'other', 'RUNNING', %s, %s, %s)",
            (exp.experiment_id, held[0], held[0], held[0]),
        )
        other.commit()
        here.join(30)
        assert made and made[0] > held[0]
        assert _paged(store, exp.experiment_id) == ["other", "here"]
    finally:
        other.close()
        db.dispose()
