"""`Database.statements()`, `Database.query()` and `Database.own_query()`, the plain SQL of the hot paths, on
SQLite and PostgreSQL: commit on success, nothing kept on failure, driver errors turned into domain errors."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from runledger_server.backends.sql.database import Database
from runledger_server.domain.errors import AlreadyExists, Unavailable


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meta.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    database = Database(url)
    with database.statements(write=True) as q:
        q.run("CREATE TABLE things (id INTEGER PRIMARY KEY, label TEXT NOT NULL)")
    yield database
    database.dispose()


def labels(db: Database) -> list[str]:
    with db.statements(write=False) as q:
        return [r[0] for r in q.all("SELECT label FROM things ORDER BY id")]


def test_commits_and_reads_back_with_placeholders(db: Database) -> None:
    with db.statements(write=True) as q:
        assert q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "a")) == 1
        assert q.run("INSERT INTO things (id, label) VALUES (?, ?)", (2, "b?")) == 1
        assert q.one("SELECT label FROM things WHERE id = ?", (2,)) == ("b?",)
        assert q.one("SELECT label FROM things WHERE id = ?", (3,)) is None
    assert labels(db) == ["a", "b?"]


def test_query_reads_one_statement_outside_a_transaction(db: Database) -> None:
    with db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "a"))
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (2, "b?"))
    assert db.query("SELECT id, label FROM things WHERE id >= ? ORDER BY id", (1,)) == [(1, "a"), (2, "b?")]
    assert db.query("SELECT label FROM things WHERE label = ?", ("none",)) == []
    with db.statements(write=True) as q:  # nothing of the read stays open: the table can be written at once
        q.run("DELETE FROM things WHERE id = ?", (1,))
    assert db.query("SELECT label FROM things", ()) == [("b?",)]


def test_duplicate_key_is_already_exists_and_nothing_of_the_transaction_is_kept(db: Database) -> None:
    with db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "kept"))
    with pytest.raises(AlreadyExists) as err, db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (2, "dropped"))
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "duplicate"))
    assert err.value.reason == "CONFLICT"
    assert labels(db) == ["kept"]


def test_an_exception_in_the_block_rolls_back(db: Database) -> None:
    with pytest.raises(RuntimeError), db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "dropped"))
        raise RuntimeError("refused after the write")
    assert labels(db) == []
    with db.statements(write=True) as q:  # the pooled connection is usable afterwards
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "after"))
    assert labels(db) == ["after"]


def test_own_query_reads_the_last_commit_on_a_connection_of_the_threads_own(db: Database) -> None:
    """Each thread keeps one connection (SQLite), every read sees what was committed before it, a failed statement
    retires its connection, and dispose() closes them all."""
    with db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "a"))
    assert db.own_query("SELECT label FROM things WHERE id = ?", (1,)) == [("a",)]
    with db.statements(write=True) as q:  # the kept connection holds no snapshot or lock: writes go ahead
        q.run("UPDATE things SET label = ? WHERE id = ?", ("b", 1))
    assert db.own_query("SELECT label FROM things WHERE id = ?", (1,)) == [("b",)]
    if not db.is_sqlite:  # there it is query(), tested above
        return
    with pytest.raises(Unavailable):  # SQLite reports a missing table as an operational error
        db.own_query("SELECT nothing FROM nowhere", ())
    assert db.own_query("SELECT label FROM things", ()) == [("b",)]  # a fresh connection after the failure
    mine = db.own_query("PRAGMA data_version", ())
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(db.own_query("SELECT COUNT(*) FROM things", ())))
    thread.start()
    thread.join()
    assert other == [[(1,)]]
    assert len(db._own_conns) == 2 and mine == db.own_query("PRAGMA data_version", ())  # this thread's one again
    kept = list(db._own_conns)
    db.dispose()
    for conn in kept:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    unreachable = [
        Database(f"sqlite:///{tmp_path / 'a-directory'}"),  # a directory cannot be opened as a database
        Database("postgresql+psycopg://postgres@127.0.0.1:9/postgres?connect_timeout=2"),  # nothing listens
    ]
    for db in unreachable:
        with pytest.raises(Unavailable) as err, db.statements(write=False) as q:
            q.all("SELECT 1")
        assert err.value.reason == "DATABASE_UNAVAILABLE"
        assert "metadata database is unavailable" in str(err.value)
        with pytest.raises(Unavailable) as err:  # the serving lookup's read, too (it was INTERNAL)
            db.query("SELECT 1", ())
        assert err.value.reason == "DATABASE_UNAVAILABLE"


def test_no_free_connection_within_the_pool_timeout_is_unavailable(tmp_path: Path) -> None:
    """Every pooled connection busy (a slow or unreachable database holds them): the next call is UNAVAILABLE after
    the pool timeout on every path, not INTERNAL."""
    db = Database(f"sqlite:///{tmp_path / 'meta.db'}", pool_timeout=0.2)
    held = [db.engine.raw_connection() for _ in range(32)]  # pool_size + max_overflow
    try:

        def plain(write: bool) -> None:
            with db.statements(write=write) as q:
                q.all("SELECT 1")

        def orm(write: bool) -> None:
            with db.write() if write else db.read() as s:
                s.connection().exec_driver_sql("SELECT 1")

        for call in (lambda: db.query("SELECT 1", ()), lambda: plain(False), lambda: orm(False), lambda: orm(True)):
            with pytest.raises(Unavailable) as err:
                call()
            assert err.value.reason == "DATABASE_UNAVAILABLE" and "no connection free within 0.2 s" in str(err.value)
    finally:
        for conn in held:
            conn.close()
    assert db.query("SELECT 1", ()) == [(1,)]
    db.dispose()


@pytest.mark.postgres
def test_a_read_only_postgresql_is_unavailable_for_writes_and_the_pool_reconnects(pg_database_url: str) -> None:
    """A failover in progress (the database a standby, or read-only): writes are UNAVAILABLE, not INTERNAL, on
    both write paths, and the pooled connections are replaced, so writes succeed once it is writable again."""
    db = Database(pg_database_url)
    with db.statements(write=True) as q:
        q.run("CREATE TABLE things (id INTEGER PRIMARY KEY, label TEXT NOT NULL)")
    name = db.url.database
    admin = psycopg.connect(db.url.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True)
    try:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        db.engine.dispose()  # new sessions take the setting (an existing session keeps its own)
        assert db.query("SELECT COUNT(*) FROM things", ()) == [(0,)]  # reads go on
        with pytest.raises(Unavailable) as err, db.statements(write=True) as q:
            q.run("INSERT INTO things (id, label) VALUES (?, ?)", (1, "a"))
        assert err.value.reason == "DATABASE_UNAVAILABLE" and "read-only" in str(err.value)
        with pytest.raises(Unavailable), db.write() as s:
            s.connection().exec_driver_sql("INSERT INTO things (id, label) VALUES (2, 'b')")
    finally:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        admin.close()
    with db.write() as s:  # connections that met the read-only database were dropped: new ones are writable
        s.connection().exec_driver_sql("INSERT INTO things (id, label) VALUES (3, 'c')")
    with db.statements(write=True) as q:
        q.run("INSERT INTO things (id, label) VALUES (?, ?)", (4, "d"))
    assert db.query("SELECT id FROM things ORDER BY id", ()) == [(3,), (4,)]
    db.dispose()


def test_a_postgresql_host_that_never_answers_is_unavailable_within_the_connect_timeout() -> None:
    """A host that accepts the TCP connection and then says nothing (a partition, a hung host): UNAVAILABLE after
    libpq's connect timeout, which the server sets unless the URL does."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        port = silent.getsockname()[1]
        db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pg_connect={"connect_timeout": 2})
        start = time.monotonic()
        with pytest.raises(Unavailable) as err:
            db.query("SELECT 1", ())
        assert err.value.reason == "DATABASE_UNAVAILABLE"
        assert time.monotonic() - start < 15
        db.dispose()
