"""Alembic migrations of the metadata schema; applied at server start (under a lock on PostgreSQL)."""
