"""Declarative base and column conventions shared by every table module."""

from __future__ import annotations

import time

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """All runledger tables. Times are stored as integer microseconds since the Unix epoch (UTC):
    exact, portable between SQLite and PostgreSQL, and usable as keyset-paging cursors."""

    metadata = MetaData(naming_convention=NAMING)


def now_us() -> int:
    return time.time_ns() // 1000
