"""The migrations and the table models describe the same schema, on SQLite and PostgreSQL: a migration written
from the models (Alembic's autogenerate) would otherwise add or drop what the other side lacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from runledger_server.backends.sql import migrate, schema
from runledger_server.backends.sql.database import Database


@pytest.fixture(params=["sqlite", "postgres"])
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'meta.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database_url")
    )
    db = Database(url)
    migrate.upgrade(db)
    yield db
    db.dispose()


def test_the_migrated_database_matches_the_table_models(migrated: Database) -> None:
    with migrated.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, schema.Base.metadata)
    assert diffs == []


def test_every_migrated_table_has_a_model(migrated: Database) -> None:
    with migrated.engine.connect() as conn:
        tables = set(conn.dialect.get_table_names(conn)) - {"alembic_version"}
    assert tables == set(schema.Base.metadata.tables)
