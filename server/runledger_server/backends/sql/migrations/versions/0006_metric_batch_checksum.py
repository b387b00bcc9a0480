"""metric batch checksum: a batch under a stored (run, writer, seq) is a re-send only if its points are the same

Without it, two writers sharing a writer_id lost points silently when one re-sent a batch after a dropped
connection: the other's batch held that seq, so the re-send was acknowledged as already stored.

Revision ID: 0006_metric_batch_checksum
Revises: 0005_creation_clock
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_metric_batch_checksum"
down_revision = "0005_creation_clock"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ALTER TABLE on both databases: the ledger can be large, and batch mode could copy it on SQLite.
    op.add_column("metric_batches", sa.Column("content_crc", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metric_batches") as batch:
        batch.drop_column("content_crc")
