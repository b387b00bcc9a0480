"""Tables of the tracking store: experiments, runs, params, tags, metric chunks, eval results."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from runledger_server.backends.sql.base import Base


class ExperimentRow(Base):
    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(256), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class ExperimentTagRow(Base):
    __tablename__ = "experiment_tags"

    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# A run's lineage columns in the order of Lineage's fields: plain-SQL reads select them as `Lineage(*row)`.
LINEAGE_COLUMNS = ("data_version", "code_commit", "config", "base_model", "seed")


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_experiment_create", "experiment_id", "create_time_us", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id"))
    display_name: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(16))
    create_time_us: Mapped[int] = mapped_column(BigInteger)
    update_time_us: Mapped[int] = mapped_column(BigInteger)
    start_time_us: Mapped[int] = mapped_column(BigInteger)
    end_time_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    data_version: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    code_commit: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    config: Mapped[str | None] = mapped_column(Text, nullable=True)
    base_model: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lineage_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RunParamRow(Base):
    __tablename__ = "run_params"
    __table_args__ = (Index("ix_run_params_key_value", "key", "value_prefix"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    # An indexable prefix of the value for equality filters on long values.
    value_prefix: Mapped[str] = mapped_column(String(200))


class RunTagRow(Base):
    __tablename__ = "run_tags"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class MetricBatchRow(Base):
    """One accepted batch per (run, writer, seq): the exactly-once ledger of metric ingest."""

    __tablename__ = "metric_batches"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    writer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    points: Mapped[int] = mapped_column(Integer)
    commit_time_us: Mapped[int] = mapped_column(BigInteger)
    # The batch's content checksum (Batch.checksum): a re-send must match it, another writer's batch does not.
    # NULL for batches stored before it was kept: any re-send of those counts as a re-send.
    content_crc: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class MetricChunkRow(Base):
    """The points of one key from one batch, as packed little-endian arrays (NaN/Inf bit-exact)."""

    __tablename__ = "metric_chunks"
    __table_args__ = (Index("ix_metric_chunks_run_key", "run_id", "key", "min_step"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(250))
    writer_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    min_step: Mapped[int] = mapped_column(BigInteger)
    max_step: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[bytes] = mapped_column(LargeBinary)
    values: Mapped[bytes] = mapped_column(LargeBinary)
    timestamps_ms: Mapped[bytes] = mapped_column(LargeBinary)


class LatestMetricRow(Base):
    """The highest-step point of each key: what SearchRuns filters and sorts on.

    `value` is NULL for NaN (SQL cannot compare NaN consistently across SQLite and PostgreSQL), so a
    NaN never satisfies a comparison; the point itself is kept exactly in metric_chunks.
    """

    __tablename__ = "latest_metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)


class EvalScoreRow(Base):
    """One immutable score of a run on an eval suite."""

    __tablename__ = "eval_scores"
    __table_args__ = (Index("ix_eval_scores_metric_suite", "metric", "suite_fingerprint"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    suite_fingerprint: Mapped[str] = mapped_column(String(256), primary_key=True)
    metric: Mapped[str] = mapped_column(String(250), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class CreationClockRow(Base):
    """The one row (id 1) that hands out creation times of experiments and runs in commit order: each creation
    locks it until its commit (migration 0005 says why). Modelled so that migrations compared against these
    tables keep it."""

    __tablename__ = "creation_clock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_us: Mapped[int] = mapped_column(BigInteger)
