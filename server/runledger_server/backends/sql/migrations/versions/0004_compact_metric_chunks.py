"""compact metric chunks: regular steps and timestamps stored compactly (backends/sql/chunk_format.py)

No table changes. The revision marks a database whose metric chunks may hold the compact forms, so a
server from before them refuses it (unknown revision) instead of misreading those chunks.

Revision ID: 0004_compact_metric_chunks
Revises: 0001_tracking
"""

from __future__ import annotations

revision = "0004_compact_metric_chunks"
down_revision = "0001_tracking"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    raise NotImplementedError("compact metric chunks cannot be read by older servers; restore a backup instead")
