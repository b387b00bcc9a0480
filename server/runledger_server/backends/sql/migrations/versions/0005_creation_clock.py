"""creation clock: one row that hands out the creation times of experiments and runs in commit order

Listing pages by creation time; a time taken before commit, by several replicas (or worker threads) at once,
let a run created earlier commit after a page had passed its time, and paging (or a poller asking for runs
created since) never saw it. The row is locked by each creation until its commit, and its time only grows.

Revision ID: 0005_creation_clock
Revises: 0004_compact_metric_chunks
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_creation_clock"
down_revision = "0004_compact_metric_chunks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "creation_clock",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_creation_clock")),
    )
    op.execute(
        "INSERT INTO creation_clock (id, last_us) SELECT 1, COALESCE(MAX(t), 0) FROM ("
        "SELECT MAX(create_time_us) AS t FROM runs UNION ALL SELECT MAX(create_time_us) FROM experiments) AS times"
    )


def downgrade() -> None:
    op.drop_table("creation_clock")
