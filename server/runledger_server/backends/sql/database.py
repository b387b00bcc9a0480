"""Engine and transactions: SQLite tuned for one embedded writer, PostgreSQL for shared replicas.

A store method is one transaction. `write()` takes SQLite's write lock up front (BEGIN IMMEDIATE)
so read-then-write sequences cannot deadlock or interleave; on PostgreSQL row locks do that job.
IntegrityError is turned into a domain error here, the one place that knows SQL failure modes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from runledger_server.domain.errors import AlreadyExists, Unavailable

_LOGGER = logging.getLogger(__name__)


class Database:
    """Owns the engine; hands out sessions for read and write transactions."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 60},
                pool_size=16,
                max_overflow=16,
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.engine = create_engine(self.url, pool_size=16, max_overflow=16, pool_pre_ping=True)
        self._write_engine = self.engine.execution_options(runledger_write=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with _translate(), Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with _translate(), Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def run_write(self, fn: Callable[[Session], Any]) -> Any:
        with self.write() as session:
            return fn(session)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (pysqlite's implicit BEGIN is deferred).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("runledger_write") else "BEGIN")


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        _LOGGER.debug("integrity error: %s", exc)
        raise AlreadyExists("the resource was created concurrently or already exists", reason="CONFLICT") from exc
    except OperationalError as exc:
        _LOGGER.warning("database unavailable: %s", exc.orig)
        raise Unavailable(f"the metadata database is unavailable: {exc.orig}", reason="DATABASE_UNAVAILABLE") from exc
