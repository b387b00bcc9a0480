"""Table of the artifact index: which content (by sha256) each run path holds."""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from runledger_server.backends.sql.base import Base

# Paths sort by code point on both databases (SQLite's default BINARY collation; "C" on PostgreSQL), so
# keyset paging, prefix ranges and manifests agree with Python's sorted().
PATH_TYPE = String(1024).with_variant(String(1024, collation="C"), "postgresql")


class ArtifactRow(Base):
    """One immutable file of a run: (run_id, path) -> sha256, size, and where the bytes live."""

    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_sha256", "sha256"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    path: Mapped[str] = mapped_column(PATH_TYPE, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(String(2048))
    create_time_us: Mapped[int] = mapped_column(BigInteger)


class ManifestRow(Base):
    """A directory manifest the server published (for a registration or GetArtifactManifest), by its digest.

    Its bytes are kept here as well as in the blob store: a model version of a directory stands for exactly
    this list of files, and nothing else could rebuild it once the run's directory has grown; and a download
    by digest serves only content the index knows (a file's record, or one of these)."""

    __tablename__ = "artifact_manifests"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    create_time_us: Mapped[int] = mapped_column(BigInteger)
