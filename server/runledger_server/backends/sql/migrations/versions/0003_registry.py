"""registry: models, versions, gates, gate results, aliases, alias history

Revision ID: 0003_registry
Revises: 0001_tracking
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_registry"
down_revision = "0001_tracking"
branch_labels = None
depends_on = None

ID = 128


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.String(length=ID), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("latest_version", sa.BigInteger(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.Column("update_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_models")),
    )
    op.create_table(
        "registered_model_tags",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["registered_models.id"], name=op.f("fk_registered_model_tags_model_id_registered_models")
        ),
        sa.PrimaryKeyConstraint("model_id", "key", name=op.f("pk_registered_model_tags")),
    )
    op.create_table(
        "model_versions",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_size", sa.BigInteger(), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("lineage_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("data_version", sa.String(length=1024), nullable=False),
        sa.Column("code_commit", sa.String(length=1024), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(length=1024), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["registered_models.id"], name=op.f("fk_model_versions_model_id_registered_models")
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_model_versions_run_id_runs")),
        sa.PrimaryKeyConstraint("model_id", "version", name=op.f("pk_model_versions")),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index("ix_model_versions_run", ["run_id"], unique=False)

    op.create_table(
        "gates",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("gate_id", sa.String(length=ID), nullable=False),
        sa.Column("suite_fingerprint", sa.String(length=256), nullable=False),
        sa.Column("metric", sa.String(length=250), nullable=False),
        sa.Column("direction", sa.String(length=16), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["registered_models.id"], name=op.f("fk_gates_model_id_registered_models")
        ),
        sa.PrimaryKeyConstraint("model_id", "gate_id", name=op.f("pk_gates")),
    )
    op.create_table(
        "gate_results",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("gate_id", sa.String(length=ID), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id", "gate_id"], ["gates.model_id", "gates.gate_id"], name=op.f("fk_gate_results_model_id_gates")
        ),
        sa.ForeignKeyConstraint(
            ["model_id", "version"],
            ["model_versions.model_id", "model_versions.version"],
            name=op.f("fk_gate_results_model_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("model_id", "gate_id", "version", name=op.f("pk_gate_results")),
    )
    op.create_table(
        "aliases",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("alias", sa.String(length=ID), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("gate_id", sa.String(length=ID), nullable=False),
        sa.Column("history_seq", sa.BigInteger(), nullable=False),
        sa.Column("update_time_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["registered_models.id"], name=op.f("fk_aliases_model_id_registered_models")
        ),
        sa.PrimaryKeyConstraint("model_id", "alias", name=op.f("pk_aliases")),
    )
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.create_index("ix_aliases_model_version", ["model_id", "version"], unique=False)

    op.create_table(
        "alias_history",
        sa.Column("model_id", sa.String(length=ID), nullable=False),
        sa.Column("alias", sa.String(length=ID), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("from_version", sa.BigInteger(), nullable=False),
        sa.Column("to_version", sa.BigInteger(), nullable=False),
        sa.Column("gate_id", sa.String(length=ID), nullable=False),
        sa.Column("candidate_score", sa.Float(), nullable=True),
        sa.Column("incumbent_score", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("create_time_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id", "alias"], ["aliases.model_id", "aliases.alias"], name=op.f("fk_alias_history_model_id_aliases")
        ),
        sa.PrimaryKeyConstraint("model_id", "alias", "sequence", name=op.f("pk_alias_history")),
    )


def downgrade() -> None:
    op.drop_table("alias_history")
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.drop_index("ix_aliases_model_version")
    op.drop_table("aliases")
    op.drop_table("gate_results")
    op.drop_table("gates")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_model_versions_run")
    op.drop_table("model_versions")
    op.drop_table("registered_model_tags")
    op.drop_table("registered_models")
