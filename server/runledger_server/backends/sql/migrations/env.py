"""Alembic environment: runs on the connection handed over by runledger_server.backends.sql.migrate."""

from __future__ import annotations

from alembic import context

from runledger_server.backends.sql import schema

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=schema.Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
