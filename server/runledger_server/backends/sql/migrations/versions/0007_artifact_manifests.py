"""artifact manifests: the bytes of each published directory manifest, kept in the database

A model version of a directory is addressed by its manifest's digest. The manifest's blob was its only copy:
damaged in place, nothing could rebuild it once the run's directory had grown. Manifests published before
this revision are recorded when they are first downloaded by digest and their stored bytes check out.

Revision ID: 0007_artifact_manifests
Revises: 0006_metric_batch_checksum
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_artifact_manifests"
down_revision = "0006_metric_batch_checksum"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifact_manifests",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("artifact_manifests")
