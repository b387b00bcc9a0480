"""SQLAlchemy implementation of the artifact index: (run, path) -> digest, one transaction per call."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from runledger_server.backends.sql.artifact_tables import ArtifactRow, ManifestRow
from runledger_server.backends.sql.base import now_us
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_tables import RunRow
from runledger_server.domain import artifact_paths, paging
from runledger_server.domain.errors import AlreadyExists, FailedPrecondition, NotFound
from runledger_server.store.artifacts import ArtifactRecord
from runledger_server.store.entities import Page

_LOGGER = logging.getLogger(__name__)


class SqlArtifactIndex:
    def __init__(self, db: Database) -> None:
        self.db = db

    def check(self, run_id: str, path: str, sha256: str | None) -> ArtifactRecord | None:
        """Refuse early what `record` would refuse (missing run, immutable path, file/directory clash);
        return the existing record of the path, if any."""
        with self.db.read() as s:
            return _check(s, run_id, path, sha256)

    def record(self, run_id: str, path: str, sha256: str, size: int, uri: str) -> ArtifactRecord:
        """Idempotent for the same content; a path never changes content once recorded."""
        with self.db.write() as s:
            # Recordings of one run take turns: the file-vs-directory check below reads other paths of the run,
            # which a row lock on the new path alone would not protect. PostgreSQL: a lock on the run's row
            # that foreign-key checks (metric chunks, other artifacts) do not wait for; SQLite: BEGIN IMMEDIATE.
            s.execute(select(RunRow.id).where(RunRow.id == run_id).with_for_update(key_share=True))
            existing = _check(s, run_id, path, sha256)
            if existing is not None:
                return existing
            row = ArtifactRow(run_id=run_id, path=path, sha256=sha256, size=size, uri=uri, create_time_us=now_us())
            s.add(row)
            s.flush()
            return _record(row)

    def run_exists(self, run_id: str) -> bool:
        with self.db.read() as s:
            return s.get(RunRow, run_id) is not None

    def get(self, run_id: str, path: str) -> ArtifactRecord | None:
        with self.db.statements(write=False) as q:  # on the registration and download paths: plain SQL
            row = q.one(
                "SELECT sha256, size, uri, create_time_us FROM artifacts WHERE run_id = ? AND path = ?", (run_id, path)
            )
        return None if row is None else ArtifactRecord(run_id, path, *row)

    def by_digest(self, sha256: str) -> ArtifactRecord | None:
        with self.db.read() as s:
            row = s.scalars(
                select(ArtifactRow).where(ArtifactRow.sha256 == sha256).order_by(ArtifactRow.create_time_us).limit(1)
            ).first()
            return None if row is None else _record(row)

    def record_manifest(self, sha256: str, body: bytes) -> None:
        insert = self.db.insert(ManifestRow).values(sha256=sha256, body=body, create_time_us=now_us())
        with self.db.write() as s:
            s.execute(insert.on_conflict_do_nothing(index_elements=["sha256"]))

    def manifest_body(self, sha256: str) -> bytes | None:
        with self.db.statements(write=False) as q:
            row = q.one("SELECT body FROM artifact_manifests WHERE sha256 = ?", (sha256,))
        return None if row is None else bytes(row[0])

    def list(self, run_id: str, prefix: str, page_size: int, page_token: str) -> Page[ArtifactRecord]:
        query = {"run_id": run_id, "prefix": prefix}
        cursor = paging.decode(page_token, query)
        with self.db.read() as s:
            _require_run(s, run_id)
            stmt = _under_prefix(run_id, prefix)
            if cursor:
                stmt = stmt.where(ArtifactRow.path > paging.fields(cursor, str)[0])
            rows = list(s.scalars(stmt.order_by(ArtifactRow.path).limit(page_size + 1)))
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = paging.encode([rows[-1].path], query) if more and rows else ""
        return Page([_record(r) for r in rows], token)

    def under(self, run_id: str, directory: str) -> Sequence[ArtifactRecord]:
        with self.db.read() as s:
            _require_run(s, run_id)
            rows = s.scalars(_under_prefix(run_id, artifact_paths.within(directory)).order_by(ArtifactRow.path))
            return [_record(r) for r in rows]


def _under_prefix(run_id: str, prefix: str) -> Select[ArtifactRow]:
    stmt = select(ArtifactRow).where(ArtifactRow.run_id == run_id)
    if prefix:
        # A range the primary key serves, then an exact check (no LIKE: its wildcards would need escaping).
        stmt = stmt.where(ArtifactRow.path >= prefix, func.substr(ArtifactRow.path, 1, len(prefix)) == prefix)
    return stmt


def _require_run(s: Session, run_id: str) -> None:
    if s.get(RunRow, run_id) is None:
        raise NotFound(f"runs/{run_id} not found", field="run_id")


def _check(s: Session, run_id: str, path: str, sha256: str | None) -> ArtifactRecord | None:
    _require_run(s, run_id)
    row = s.get(ArtifactRow, (run_id, path))
    if row is not None:
        if sha256 is not None and row.sha256 != sha256:
            raise AlreadyExists(
                f"runs/{run_id}/artifacts/{path} already holds other content (sha256 {row.sha256}); "
                "artifacts of a run are immutable: upload to another path",
                field="path",
                reason="ARTIFACT_IMMUTABLE",
                metadata={"sha256": row.sha256},
            )
        return _record(row)
    parents = artifact_paths.ancestors(path)
    if parents:
        clash = s.scalar(
            select(ArtifactRow.path).where(ArtifactRow.run_id == run_id, ArtifactRow.path.in_(parents)).limit(1)
        )
        if clash is not None:
            raise FailedPrecondition(
                f"path {path!r} is below {clash!r}, which is a file of runs/{run_id}",
                field="path",
                reason="ARTIFACT_PATH_CONFLICT",
                metadata={"conflictingPath": clash},
            )
    below = s.scalars(_under_prefix(run_id, path + "/").with_only_columns(ArtifactRow.path).limit(1)).first()
    if below is not None:
        raise FailedPrecondition(
            f"path {path!r} is a directory of runs/{run_id} (it holds {below!r})",
            field="path",
            reason="ARTIFACT_PATH_CONFLICT",
            metadata={"conflictingPath": below},
        )
    return None


def _record(row: ArtifactRow) -> ArtifactRecord:
    return ArtifactRecord(
        run_id=row.run_id,
        path=row.path,
        sha256=row.sha256,
        size=row.size,
        uri=row.uri,
        create_time_us=row.create_time_us,
    )
