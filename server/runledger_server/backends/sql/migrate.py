"""Bring the schema to the latest migration; replicas starting together on PostgreSQL take turns."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import text

from runledger_server.backends.sql.database import Database

_LOGGER = logging.getLogger(__name__)
_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x72756E6C  # "runl": the advisory lock replicas hold while migrating


class DatabaseTooNew(Exception):
    """The database was migrated by a newer runledger, whose schema this server does not know."""


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def upgrade(db: Database) -> None:
    with _sqlite_migration_lock(db):
        _upgrade(db)


@contextlib.contextmanager
def _sqlite_migration_lock(db: Database) -> Iterator[None]:
    """Servers started together on one SQLite file take turns, as on PostgreSQL: alembic's first statements
    there were refused as `database is locked` by the other's migration, and that server died."""
    path = db.url.database if db.is_sqlite else None
    if not path or path == ":memory:":
        yield
        return
    # Named after the file itself: two servers that reach it by other paths (a symlink) still take turns.
    with open(f"{os.path.realpath(path)}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _upgrade(db: Database) -> None:
    cfg = alembic_config()
    with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, "heads")
            except CommandError as exc:
                if "Can't locate revision" not in str(exc):
                    raise
                raise DatabaseTooNew(
                    f"the metadata database {db.url.render_as_string(hide_password=True)} was migrated by a newer "
                    f"runledger ({exc}); run that version or a later one against it"
                ) from exc
            conn.commit()
        finally:
            if db.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
                conn.commit()
