"""Engine and transactions: SQLite tuned for one embedded writer, PostgreSQL for shared replicas.

A store method is one transaction, either through an ORM session or, on the hot paths (registry
writes, metric commits), through `statements()`: plain SQL on a pooled DB-API connection, several
times cheaper per statement than the ORM. `write()` takes SQLite's write lock up front (BEGIN IMMEDIATE)
so read-then-write sequences cannot deadlock or interleave; on PostgreSQL row locks do that job.
IntegrityError is turned into a domain error here, the one place that knows SQL failure modes.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from runledger_server.backends.sql import query_budget
from runledger_server.backends.sql.interrupter import Interrupter
from runledger_server.domain.errors import AlreadyExists, ResourceExhausted, Unavailable

_LOGGER = logging.getLogger(__name__)

SQLITE_CACHE_KIB = 4 * 1024  # per pooled connection, allocated as pages are used
SQLITE_FULL = 13  # "database or disk is full": the disk, or the database's max_page_count
PG_DISK_FULL = "53100"
PG_READ_ONLY = "25006"  # a standby, or a primary being switched over: writes fail until the failover ends
POOL_TIMEOUT_S = 10.0  # waiting for a free connection longer than this is UNAVAILABLE, not an endless queue
# A PostgreSQL host that goes silent (a partition, a dead host) fails calls within about a minute instead of
# TCP's quarter of an hour: libpq's connect timeout, keepalives and TCP user timeout, unless the URL sets them.
PG_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


class Database:
    """Owns the engine; hands out sessions for read and write transactions."""

    def __init__(
        self, url: str, *, pool_timeout: float = POOL_TIMEOUT_S, pg_connect: dict[str, int] | None = None
    ) -> None:
        self.url = make_url(url)
        self.pool_timeout = pool_timeout
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 60},
                pool_size=16,
                max_overflow=16,
                pool_timeout=pool_timeout,
                # The most recently used connection goes out first, so its page cache is warm.
                pool_use_lifo=True,
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            given = {**PG_CONNECT_DEFAULTS, **(pg_connect or {})}
            self.engine = create_engine(
                self.url,
                connect_args={k: v for k, v in given.items() if k not in self.url.query},
                pool_size=16,
                max_overflow=16,
                pool_timeout=pool_timeout,
                pool_pre_ping=True,
            )
            event.listen(self.engine, "handle_error", _pg_on_error)
        postgres = not self.is_sqlite

        @event.listens_for(self.engine, "before_cursor_execute")
        def _budget(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            query_budget.before_statement(conn.info, cursor, postgres)

        self._write_engine = self.engine.execution_options(runledger_write=True)
        self._own = threading.local()  # a thread's own SQLite connection, for own_query()
        self._own_conns: list[Any] = []
        self._own_lock = threading.Lock()
        self._interrupter = Interrupter()  # SQLite's bounded reads (its thread starts with the first one)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def insert(self) -> Any:
        """The dialect's INSERT construct, which has ON CONFLICT on both SQLite and PostgreSQL."""
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with _translate(self.pool_timeout), Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def bounded_read(self, seconds: float, field: str, *, until: float | None = None) -> Iterator[Session]:
        """A read transaction refused as RESOURCE_EXHAUSTED `QUERY_TOO_EXPENSIVE` naming `field` once its
        statements have taken `seconds` in all, or at `until` (time.monotonic()) when that comes first
        (query_budget.py): a search that would scan long values with a costly pattern must not hold a worker
        and a connection without end."""
        with self.read() as session:
            conn = session.connection()
            # Read now: once SQLAlchemy drops a lost connection, reaching its info raises and would hide the error.
            info = conn.info
            driver: Any = conn.connection.dbapi_connection
            budget = query_budget.Budget.starting_now(seconds, field, until)  # after the pool's wait: no work
            armed = None
            try:
                query_budget.hold(info, budget)
                armed = self._interrupter.arm(driver, max(0.0, budget.left())) if self.is_sqlite else None
                yield session
            except Exception as exc:
                interrupted = armed is not None and self._interrupter.disarm(armed)
                # A cancel with time left is someone else's (an operator's pg_cancel_backend): not the budget.
                timed_out = query_budget.canceled_by_timeout(exc) and budget.left() < query_budget.TIMER_SLACK_S
                if interrupted or timed_out:
                    raise budget.exceeded() from exc
                raise
            finally:
                if armed is not None:
                    self._interrupter.disarm(armed)
                query_budget.release(info)

    def before_statement(self, info: dict[Any, Any], cursor: Any) -> None:
        """For statements run on the driver's own cursors inside a transaction (they bypass SQLAlchemy's
        events): what a bounded read asks of each statement."""
        query_budget.before_statement(info, cursor, postgres=not self.is_sqlite)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        with (
            _translate(self.pool_timeout),
            Session(self._write_engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement (`?` placeholders) outside a transaction, for hot reads.

        On PostgreSQL the connection is switched to autocommit for it, which saves the BEGIN and ROLLBACK
        round trips (SQLite connections are in autocommit mode already). Errors are translated like
        `statements()`: a database that is down is UNAVAILABLE, and a broken connection leaves the pool.
        """
        dbapi: Any = self.engine.dialect.loaded_dbapi
        conn = self._checkout(dbapi)
        driver: Any = conn.driver_connection
        autocommit = not self.is_sqlite and not driver.autocommit
        try:
            if autocommit:
                driver.autocommit = True
            try:
                cur = conn.cursor()
                try:
                    cur.execute(sql if self._placeholder == "?" else sql.replace("?", self._placeholder), params)
                    return [tuple(r) for r in cur.fetchall()]
                finally:
                    cur.close()
            finally:
                if autocommit:
                    driver.autocommit = False  # pooled connections run transactions
        except dbapi.OperationalError as exc:
            conn.invalidate()  # a broken connection must not go back to the pool
            raise database_error(exc) from exc
        finally:
            conn.close()  # back to the pool (a no-op after invalidate)

    def own_query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """`query()` on a connection the calling thread keeps (SQLite; elsewhere it is `query()`).

        For the serving lookup, which runs on the event loop: the pool's checkout and return cost three times
        the indexed read itself. The connection is in autocommit mode, so every read sees the last commit.
        """
        if not self.is_sqlite:
            return self.query(sql, params)
        conn = getattr(self._own, "conn", None)
        if conn is None:
            conn = self._own_connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            self._own.conn = None  # a broken connection is not used again
            with self._own_lock, contextlib.suppress(sqlite3.Error):
                self._own_conns.remove(conn)
                conn.close()
            raise database_error(exc) from exc

    def _own_connection(self) -> Any:
        """A connection of its own, set up like the pool's (the same pragmas). Opened directly, not taken from
        the pool: on the event loop, waiting for a free pooled connection would stall every call."""
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        connect: Any = sqlite3.connect
        try:
            conn = connect(*cargs, **{**cparams, "check_same_thread": False})
            _sqlite_on_connect(conn, None)
        except sqlite3.Error as exc:
            raise database_error(exc) from exc
        with self._own_lock:
            self._own_conns.append(conn)
        self._own.conn = conn
        return conn

    def _checkout(self, dbapi: Any) -> Any:
        try:
            return self.engine.raw_connection()
        except (OperationalError, dbapi.OperationalError) as exc:  # the pool passes driver errors through
            raise database_error(exc.orig if isinstance(exc, OperationalError) else exc) from exc
        except PoolTimeout as exc:
            raise pool_exhausted(self.pool_timeout) from exc

    @contextlib.contextmanager
    def statements(self, *, write: bool) -> Iterator[Statements]:
        """One transaction of plain SQL (`?` placeholders) on a pooled driver connection.

        Writes on SQLite take the write lock up front (BEGIN IMMEDIATE), like `write()`; PostgreSQL's driver
        opens its transaction at the first statement. Driver errors are translated like SQLAlchemy's.
        """
        dbapi: Any = self.engine.dialect.loaded_dbapi
        conn = self._checkout(dbapi)
        try:
            cur = conn.cursor()
            try:
                if self.is_sqlite:
                    cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield Statements(cur, self._placeholder)
                conn.commit()
            except dbapi.IntegrityError as exc:
                conn.rollback()
                _LOGGER.debug("integrity error: %s", exc)
                raise AlreadyExists(
                    "the resource was created concurrently or already exists", reason="CONFLICT"
                ) from exc
            except dbapi.Error as exc:
                if not isinstance(exc, dbapi.OperationalError) and not _read_only(exc):
                    _rollback_quietly(conn)
                    raise
                conn.invalidate()  # a broken (or read-only) connection must not go back to the pool
                if _read_only(exc):  # the others reach the same standby: connect afresh, as the ORM path does
                    self.engine.dispose()
                raise database_error(exc) from exc
            except BaseException:
                _rollback_quietly(conn)
                raise
            finally:
                # After invalidate() the connection is closed, and SQLite's cursor then refuses to close: that
                # error would replace the translated one (a full or locked database answered INTERNAL).
                with contextlib.suppress(dbapi.Error):
                    cur.close()
        finally:
            conn.close()  # back to the pool

    def driver_sql(self, sql: str) -> str:
        """`?` placeholders in the driver's own style, for SQL passed to the driver as it is."""
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)

    @property
    def _placeholder(self) -> str:
        return "?" if self.engine.dialect.paramstyle == "qmark" else "%s"

    def run_write(self, fn: Callable[[Session], Any]) -> Any:
        with self.write() as session:
            return fn(session)

    def dispose(self) -> None:
        with self._own_lock:
            for conn in self._own_conns:
                with contextlib.suppress(Exception):
                    conn.close()
            self._own_conns.clear()
        self._interrupter.close()
        self.engine.dispose()


class Statements:
    """A cursor inside one transaction; SQL is written with `?` and adapted to the driver's paramstyle."""

    def __init__(self, cursor: Any, placeholder: str) -> None:
        self._cur = cursor
        self._placeholder = placeholder

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; return the number of rows changed."""
        self._cur.execute(self._sql(sql), params)
        return int(self._cur.rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Execute once per row (the drivers batch these: one prepared statement, no per-row parsing)."""
        self._cur.executemany(self._sql(sql), rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cur.execute(self._sql(sql), params)
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self._sql(sql), params)
        return [tuple(r) for r in self._cur.fetchall()]

    def _sql(self, sql: str) -> str:
        return sql if self._placeholder == "?" else sql.replace("?", self._placeholder)


def _rollback_quietly(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection is broken; the pool discards it on the next checkout
        _LOGGER.debug("rollback failed", exc_info=True)


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN itself (pysqlite's implicit BEGIN is deferred).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    # LIKE in run and experiment filters is case-sensitive, as on PostgreSQL (ILIKE is the case-insensitive form).
    # The pragma is deprecated and a build may leave it out, silently: such a build would match other runs.
    cur.execute("PRAGMA case_sensitive_like=ON")
    if cur.execute("SELECT 'a' LIKE 'A'").fetchone()[0]:
        raise RuntimeError("this SQLite build ignores PRAGMA case_sensitive_like, which LIKE filters need")
    # Each page not in the connection's cache costs a read() from the OS. Long metric histories are served from
    # the chunk cache (chunk_cache.py), so a modest page cache per pooled connection is enough for the rest.
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("runledger_write") else "BEGIN")


@contextlib.contextmanager
def _translate(pool_timeout: float) -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        _LOGGER.debug("integrity error: %s", exc)
        raise AlreadyExists("the resource was created concurrently or already exists", reason="CONFLICT") from exc
    except OperationalError as exc:
        raise database_error(exc.orig) from exc
    except DBAPIError as exc:
        if not _read_only(exc.orig):
            raise
        raise database_error(exc.orig) from exc
    except PoolTimeout as exc:
        raise pool_exhausted(pool_timeout) from exc


def _pg_on_error(context: Any) -> None:
    """A read-only refusal means this connection (and the pool's others) reach a standby: they are replaced, so
    that the next calls connect again and find the promoted primary."""
    if _read_only(context.original_exception):
        context.is_disconnect = True


def _read_only(exc: BaseException | None) -> bool:
    """PostgreSQL refusing a write because it is (for now) a standby: a failover in progress, not a wrong
    statement (psycopg files it under InternalError)."""
    return getattr(exc, "sqlstate", None) == PG_READ_ONLY


def pool_exhausted(timeout: float) -> Unavailable:
    _LOGGER.warning("no database connection free within %g s", timeout)
    return Unavailable(
        f"the metadata database is unavailable: no connection free within {timeout:g} s (it is slow or unreachable)",
        reason="DATABASE_UNAVAILABLE",
    )


def database_error(cause: BaseException | None) -> Unavailable | ResourceExhausted:
    """A driver's operational failure as a refusal: a database out of room is RESOURCE_EXHAUSTED (retrying
    helps only once an operator makes room), anything else (down, unreachable, locked too long) UNAVAILABLE."""
    sqlite_code = getattr(cause, "sqlite_errorcode", None)
    full = isinstance(sqlite_code, int) and sqlite_code & 0xFF == SQLITE_FULL  # the primary code of an extended one
    if full or getattr(cause, "sqlstate", None) == PG_DISK_FULL:
        _LOGGER.error("metadata database full: %s", cause)
        return ResourceExhausted(
            f"the metadata database has no room: {cause}; nothing was written", reason="DATABASE_FULL"
        )
    _LOGGER.warning("database unavailable: %s", cause)
    return Unavailable(f"the metadata database is unavailable: {cause}", reason="DATABASE_UNAVAILABLE")
