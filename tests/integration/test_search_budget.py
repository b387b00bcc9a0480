"""A search whose filter makes the database work too long is stopped after the store's query budget, with
RESOURCE_EXHAUSTED naming the filter, on SQLite and PostgreSQL; the same store answers cheap searches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from runledger.v1 import common_pb2, tracking_service_pb2 as tpb, tracking_service_pb2_grpc
from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.config import Settings
from runledger_server.domain import filters, ids
from runledger_server.domain.errors import ResourceExhausted, Unavailable
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.sweeps import Direction
from runledger_server.embedded import EmbeddedServer
from runledger_server.services.metric_ingest import MetricIngest
from runledger_server.services.tracking import TrackingService

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


def _slow_sql(db: Database) -> str:
    """One statement that takes a few hundred milliseconds of database work on either database."""
    if db.is_sqlite:
        return (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c"
        )
    return "SELECT pg_sleep(0.3)"


def test_the_budget_is_for_the_whole_read_not_each_statement(database: Database) -> None:
    with pytest.raises(ResourceExhausted) as info, database.bounded_read(0.1, "filter") as s:
        time.sleep(0.2)  # spent between statements (a page's details are fetched after its rows)
        s.execute(text("SELECT 1"))
    assert info.value.reason == "QUERY_TOO_EXPENSIVE"
    start = time.monotonic()
    with pytest.raises(ResourceExhausted), database.bounded_read(0.5, "filter") as s:
        for _ in range(10):  # each statement alone is within the budget
            s.execute(text(_slow_sql(database)))
    assert time.monotonic() - start < 2.0
    with database.read() as s:  # the pooled connections carry no budget afterwards
        s.execute(text(_slow_sql(database)))


def test_a_statement_on_the_drivers_own_cursor_is_stopped_as_too_expensive_not_unavailable(
    database: Database,
) -> None:
    """A page's details are read on the driver's cursor, whose errors the store translates itself."""
    store = SqlTrackingStore(database)
    with pytest.raises(ResourceExhausted) as info, database.bounded_read(0.1, "filter") as s:
        store._fetcher(s)(_slow_sql(database), ())
    assert info.value.reason == "QUERY_TOO_EXPENSIVE" and info.value.field == "filter"


def test_a_database_used_again_after_dispose_still_bounds_its_reads(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'again.db'}")
    migrate.upgrade(db)
    try:
        with db.bounded_read(5.0, "filter") as s:
            s.execute(text("SELECT 1"))
        db.dispose()  # its deadline thread stops; a test or a tool may still use the engine afterwards
        start = time.monotonic()
        with pytest.raises(ResourceExhausted), db.bounded_read(0.1, "filter") as s:
            s.execute(text(_slow_sql(db) + " -- again"))
        assert time.monotonic() - start < 0.25  # interrupted mid-statement, not refused after it
    finally:
        db.dispose()


def test_costly_searches_hold_at_most_four_workers_even_when_their_callers_give_up(tmp_path: Path) -> None:
    """20 costly searches, each abandoned by its caller after 0.2 s: the server's 16 workers must not all be
    left running them (each until its budget stops it) while other calls wait."""
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", search_budget_seconds=2)
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
        exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="busy")).name
        for i in range(12):
            tracking.CreateRun(tpb.CreateRunRequest(experiment=exp, params={"template": "a" * (1 << 20), "i": str(i)}))
        costly = "params.template LIKE '%" + "a_" * 127 + "b'"
        calls = [
            tracking.SearchRuns.future(tpb.SearchRunsRequest(experiments=[exp], filter=costly), timeout=0.2)
            for _ in range(10)
        ] + [
            tracking.SelectWinner.future(
                tpb.SelectWinnerRequest(
                    experiment=exp, filter=costly, metric="m", direction=common_pb2.DIRECTION_MAXIMIZE
                ),
                timeout=0.2,
            )
            for _ in range(10)
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        start = time.monotonic()
        tracking.GetExperiment(tpb.GetExperimentRequest(name=exp), timeout=30)
        waited = time.monotonic() - start
        assert waited < 1.0, f"GetExperiment waited {waited:.2f} s for a worker"


@pytest.mark.postgres
def test_a_connection_lost_during_a_search_is_unavailable_not_internal(pg_database_url: str) -> None:
    database = Database(pg_database_url)
    try:
        with pytest.raises(Unavailable), database.bounded_read(5.0, "filter") as s:
            s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))  # a failover, an admin's kill
        with database.bounded_read(5.0, "filter") as s:  # the pool connects again
            assert s.execute(text("SELECT 1")).scalar() == 1
    finally:
        database.dispose()


def test_waiting_for_a_pooled_connection_is_not_charged_to_the_budget(database: Database) -> None:
    """Under load a search may wait for a connection; that is no database work, and no reason to refuse it."""
    release = threading.Event()
    held = threading.Barrier(33)

    def hold_one() -> None:
        with database.read() as s:
            s.execute(text("SELECT 1"))
            held.wait()
            release.wait()

    threads = [threading.Thread(target=hold_one) for _ in range(32)]  # the whole pool: 16 plus 16 overflow
    for t in threads:
        t.start()
    held.wait()
    threading.Timer(0.6, release.set).start()
    with database.bounded_read(0.3, "filter") as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
    for t in threads:
        t.join()


def test_the_pages_of_one_select_winner_share_one_budget(tmp_path: Path) -> None:
    """SelectWinner reads an experiment's runs page by page; with a budget per page it could hold a worker for
    ten budgets. Calibrated here: one page's cost is measured, and the budget set above it and below the
    three pages' together."""
    db = Database(f"sqlite:///{tmp_path / 'meta.db'}")
    migrate.upgrade(db)
    store = SqlTrackingStore(db, query_budget=600.0)
    ingest = MetricIngest(store)
    try:
        service = TrackingService(store, ingest)
        experiment = store.create_experiment("pages", "", {}).experiment_id
        for i in range(2_500):  # pages of 1,000 candidates: 3 pages
            store.create_run(ids.new_id(), experiment, f"r{i}", {}, {"t": "a" * 3_000 + "b"}, Lineage(), None)
        costly = "params.t LIKE '%" + "a_" * 120 + "b'"  # every run matches, after trying ~2,800 places
        start = time.monotonic()
        first = service.search_runs([f"experiments/{experiment}"], costly, "create_time", 1_000, "")
        store.query_budget = 1.6 * (time.monotonic() - start)
        assert len(first.items) == 1_000 and first.next_page_token
        with pytest.raises(ResourceExhausted) as info:
            service.select_winner(
                run_ids=[],
                experiment=f"experiments/{experiment}",
                filter_text=costly,
                metric="m",
                direction=Direction.MAXIMIZE,
                suite_fingerprint=None,
            )
        assert info.value.reason == "QUERY_TOO_EXPENSIVE"
        again = service.search_runs([f"experiments/{experiment}"], costly, "create_time", 1_000, "")
        assert len(again.items) == 1_000  # one page alone still fits its budget
    finally:
        ingest.close()
        db.dispose()


@pytest.mark.postgres
def test_an_operators_cancel_with_time_left_is_not_blamed_on_the_filter(pg_database_url: str) -> None:
    database = Database(pg_database_url)
    try:
        with pytest.raises(Unavailable), database.bounded_read(30.0, "filter") as s:
            s.execute(text("SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(2)"))
    finally:
        database.dispose()
