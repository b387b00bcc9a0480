"""Tables of the registry store: models, versions, gates, gate results, aliases and their history."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, ForeignKeyConstraint, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from runledger_server.backends.sql.base import Base

ID = 128  # model, gate and alias IDs (domain.names.slug)


class RegisteredModelRow(Base):
    """A model, and the counter its version numbers come from (`latest_version`, bumped under a row lock)."""

    __tablename__ = "registered_models"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    latest_version: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time_us: Mapped[int] = mapped_column(BigInteger)
    update_time_us: Mapped[int] = mapped_column(BigInteger)


class RegisteredModelTagRow(Base):
    __tablename__ = "registered_model_tags"

    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ModelVersionRow(Base):
    """An immutable version: the run, the artifact's content address, and the run's lineage at registration."""

    __tablename__ = "model_versions"
    __table_args__ = (Index("ix_model_versions_run", "run_id"),)

    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    artifact_path: Mapped[str] = mapped_column(Text)
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    artifact_size: Mapped[int] = mapped_column(BigInteger)
    artifact_uri: Mapped[str] = mapped_column(Text)
    lineage_fingerprint: Mapped[str] = mapped_column(String(64))
    data_version: Mapped[str] = mapped_column(String(1024))
    code_commit: Mapped[str] = mapped_column(String(1024))
    config: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(String(1024))
    seed: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class GateRow(Base):
    """A frozen eval gate; never updated."""

    __tablename__ = "gates"

    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), primary_key=True)
    gate_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    suite_fingerprint: Mapped[str] = mapped_column(String(256))
    metric: Mapped[str] = mapped_column(String(250))
    direction: Mapped[str] = mapped_column(String(16))  # MAXIMIZE | MINIMIZE
    threshold: Mapped[float] = mapped_column(Float)
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class GateResultRow(Base):
    """The gate's own score for a version: one per (gate, version), never updated."""

    __tablename__ = "gate_results"
    __table_args__ = (
        ForeignKeyConstraint(["model_id", "gate_id"], ["gates.model_id", "gates.gate_id"]),
        ForeignKeyConstraint(["model_id", "version"], ["model_versions.model_id", "model_versions.version"]),
    )

    model_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    gate_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(256))
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class AliasRow(Base):
    """The alias pointer and the lock every change of it takes.

    The row is created (revision 0, version 0) by the first decision about the alias, refused or not, so
    that concurrent first promotions contend on one row. `version` 0 means it points at nothing;
    `history_seq` numbers the alias's history entries.
    """

    __tablename__ = "aliases"
    __table_args__ = (Index("ix_aliases_model_version", "model_id", "version"),)

    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(ID), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    gate_id: Mapped[str] = mapped_column(String(ID), default="")
    history_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    update_time_us: Mapped[int] = mapped_column(BigInteger)


class AliasHistoryRow(Base):
    """One decision or change of an alias, appended in the transaction that made it."""

    __tablename__ = "alias_history"
    __table_args__ = (ForeignKeyConstraint(["model_id", "alias"], ["aliases.model_id", "aliases.alias"]),)

    model_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    alias: Mapped[str] = mapped_column(String(ID), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    revision: Mapped[int] = mapped_column(BigInteger)
    from_version: Mapped[int] = mapped_column(BigInteger)
    to_version: Mapped[int] = mapped_column(BigInteger)
    gate_id: Mapped[str] = mapped_column(String(ID))
    candidate_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    incumbent_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(256))
    create_time_us: Mapped[int] = mapped_column(BigInteger)
