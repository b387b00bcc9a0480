"""SQLAlchemy implementation of the registry store.

Every alias change runs in one transaction that first locks the alias row (PostgreSQL: `SELECT ... FOR
UPDATE`, the row inserted first if missing; SQLite: the write transaction's BEGIN IMMEDIATE lock), then reads
the gate and both scores, decides with the pure `domain.gates.decide`, and writes the alias and its history
entry. So concurrent calls, from any number of replicas, behave as if run one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from runledger_server.backends.sql.base import now_us
from runledger_server.backends.sql.database import Database, Statements
from runledger_server.backends.sql.registry_tables import (
    AliasHistoryRow,
    AliasRow,
    GateRow,
    ModelVersionRow,
    RegisteredModelRow,
    RegisteredModelTagRow,
)
from runledger_server.backends.sql.tracking_tables import LINEAGE_COLUMNS
from runledger_server.bounded_cache import BoundedCache
from runledger_server.domain import gates, paging
from runledger_server.domain.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from runledger_server.domain.gates import Action, AliasChange, Decision, GateSpec
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.sweeps import Direction
from runledger_server.store.entities import Page
from runledger_server.store.registry_entities import (
    Alias,
    AliasHistoryEntry,
    AliasOutcome,
    ArtifactRef,
    Gate,
    GateResult,
    ModelVersion,
    RegisteredModel,
    ServingTarget,
)

_LOGGER = logging.getLogger(__name__)

VERSION_CACHE_SIZE = 4096
VERSION_CACHE_BYTES = 16 << 20  # versions may hold megabytes of lineage config each
SERVING_CACHE_SIZE = 4096  # aliases whose last answer is kept; beyond that the cache starts over
SERVING_CACHE_BYTES = 16 << 20
REVISION_BATCH = 500
# The alias and every alias on the same version (served by the primary key and ix_aliases_model_version).
_SERVING_SQL = (
    "SELECT alias, version, revision, gate_id, update_time_us FROM aliases WHERE model_id = ? AND (alias = ? OR "
    "version = (SELECT version FROM aliases WHERE model_id = ? AND alias = ? AND version != 0))"
)


# The changes (not refusals) of an alias between two revisions, for a watcher that fell behind.
MAX_WATCH_CHANGES = 10_000
_CHANGES_SQL = (
    "SELECT revision, to_version, gate_id, create_time_us FROM alias_history WHERE model_id = ? AND alias = ? "
    f"AND revision > ? AND revision < ? AND action IN (?, ?, ?) ORDER BY sequence LIMIT {MAX_WATCH_CHANGES}"
)
_VERSION_SQL = (
    "SELECT model_id, version, run_id, artifact_path, artifact_sha256, artifact_size, artifact_uri, "
    "lineage_fingerprint, data_version, code_commit, config, base_model, seed, description, create_time_us "
    "FROM model_versions WHERE model_id = ? AND version = ?"
)


_INSERT_VERSION_SQL = (
    "INSERT INTO model_versions (model_id, version, run_id, artifact_path, artifact_sha256, artifact_size, "
    "artifact_uri, lineage_fingerprint, data_version, code_commit, config, base_model, seed, description, "
    "create_time_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# What a registration of a file needs: the model, the run's lineage, and the file recorded at the path (a
# directory has no row of its own). The same rows SqlTrackingStore.run_lineage and SqlArtifactIndex.get read.
_RUN_FILE_SQL = (
    f"SELECT {', '.join('r.' + c for c in LINEAGE_COLUMNS)}, a.sha256, a.size, a.uri "
    "FROM runs r JOIN artifacts a ON a.run_id = r.id WHERE r.id = ? AND a.path = ? "
    "AND EXISTS (SELECT 1 FROM registered_models m WHERE m.id = ?)"
)


class SqlRegistryStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.local_reads = db.is_sqlite
        # SQLite's write transaction already holds the database lock (and has no FOR UPDATE).
        self._for_update = "" if db.is_sqlite else " FOR UPDATE"
        self._versions: OrderedDict[tuple[str, int], ModelVersion] = OrderedDict()
        self._versions_bytes = 0
        self._versions_lock = threading.Lock()
        # The last answer per alias, with the rows it was built from: reused while the rows read are the same.
        self._serving: BoundedCache[tuple[str, str], tuple[list[tuple[Any, ...]], ServingTarget]] = BoundedCache(
            SERVING_CACHE_SIZE, SERVING_CACHE_BYTES
        )

    # ---- models ------------------------------------------------------------------------------
    def create_model(self, model_id: str, description: str, tags: dict[str, str]) -> RegisteredModel:
        with self.db.write() as s:
            now = now_us()
            # Inserted unless present, in one statement: two replicas creating the same model concurrently get
            # one row and one clear refusal (a check-then-insert race would surface as a generic conflict).
            created = s.execute(
                self.db.insert(RegisteredModelRow)
                .values(id=model_id, description=description, latest_version=0, create_time_us=now, update_time_us=now)
                .on_conflict_do_nothing()
                .returning(RegisteredModelRow.id)
            ).scalar_one_or_none()
            if created is None:
                raise AlreadyExists(f"models/{model_id} already exists", field="model_id")
            s.add_all(RegisteredModelTagRow(model_id=model_id, key=k, value=v) for k, v in tags.items())
            s.flush()
            return RegisteredModel(model_id, description, dict(tags), 0, now, now)

    def get_model(self, model_id: str) -> RegisteredModel:
        with self.db.statements(write=False) as q:
            row = q.one(
                "SELECT id, description, latest_version, create_time_us, update_time_us FROM registered_models "
                "WHERE id = ?",
                (model_id,),
            )
            if row is None:
                raise _model_not_found(model_id)
            tags = dict(q.all("SELECT key, value FROM registered_model_tags WHERE model_id = ?", (model_id,)))
        return RegisteredModel(row[0], row[1], tags, row[2], row[3], row[4])

    def list_models(self, page_size: int, page_token: str) -> Page[RegisteredModel]:
        query = {"list": "models"}
        cursor = paging.decode(page_token, query)
        stmt = select(RegisteredModelRow)
        if cursor:
            stmt = stmt.where(RegisteredModelRow.id > paging.fields(cursor, str)[0])
        stmt = stmt.order_by(RegisteredModelRow.id).limit(page_size + 1)
        with self.db.read() as s:
            rows = list(s.scalars(stmt))
            more = len(rows) > page_size
            rows = rows[:page_size]
            tags = _model_tags(s, [r.id for r in rows])
        token = paging.encode([rows[-1].id], query) if more else ""
        return Page([_model(r, tags.get(r.id, {})) for r in rows], token)

    # ---- versions ----------------------------------------------------------------------------
    def create_version(
        self,
        model_id: str,
        run_id: str,
        artifact: ArtifactRef,
        lineage: Lineage,
        lineage_fingerprint: str,
        description: str,
    ) -> ModelVersion:
        assert lineage.is_complete(), "the service refuses incomplete lineage before it gets here"
        with self.db.statements(write=True) as q:
            now = now_us()
            number = _next_version(q, model_id, now)
            if number is None:
                raise _model_not_found(model_id)
            version = ModelVersion(
                model_id, number, run_id, artifact, lineage, lineage_fingerprint, description, (), now
            )
            _insert_version(q, version)
            return version

    def create_version_of_file(self, model_id: str, run_id: str, path: str, description: str) -> ModelVersion | None:
        """The common registration in two transactions: a read of the run's lineage and the file recorded at
        `path` (one join), then the counter and the version. The service's checked path takes three for the same.

        The read takes no write lock (on SQLite, a refusal must not wait for other writers, nor hold up metric
        commits); reading it outside the write is safe because a complete lineage is immutable, a recorded
        file's row never changes and models are never deleted.
        """
        with self.db.statements(write=False) as q:
            found = q.one(_RUN_FILE_SQL, (run_id, path, model_id))
        if found is None:  # no such model or run, or no file at the path (a directory, or nothing)
            return None
        n = len(LINEAGE_COLUMNS)
        lineage = Lineage(*found[:n])
        fingerprint = lineage.fingerprint()
        if fingerprint is None:
            return None
        sha256, size, uri = found[n:]
        with self.db.statements(write=True) as q:
            now = now_us()
            number = _next_version(q, model_id, now)
            if number is None:
                return None
            artifact = ArtifactRef(path, sha256, int(size), uri)
            version = ModelVersion(model_id, number, run_id, artifact, lineage, fingerprint, description, (), now)
            _insert_version(q, version)
            return version

    def get_version(self, model_id: str, version: int) -> ModelVersion:
        # Plain SQL, not the ORM: a version is read often (clients, VerifyLineage), and the ORM's session and
        # statement handling cost several times the two queries themselves.
        with self.db.statements(write=False) as q:
            row = q.one(_VERSION_SQL, (model_id, version))
            if row is None:
                _require_model(q, model_id)
                raise NotFound(f"models/{model_id}/versions/{version} not found", field="version")
            aliases = q.all("SELECT alias FROM aliases WHERE model_id = ? AND version = ?", (model_id, version))
        # Sorted here by code point, as everywhere (the database's collation could differ).
        return replace(_version_from_values(row), aliases=tuple(sorted(a for (a,) in aliases)))

    def list_versions(self, model_id: str, page_size: int, page_token: str) -> Page[ModelVersion]:
        query = {"list": "versions", "model": model_id}
        cursor = paging.decode(page_token, query)
        stmt = select(ModelVersionRow).where(ModelVersionRow.model_id == model_id)
        if cursor:
            stmt = stmt.where(ModelVersionRow.version < paging.fields(cursor, int)[0])
        stmt = stmt.order_by(ModelVersionRow.version.desc()).limit(page_size + 1)
        with self.db.read() as s:
            _orm_require_model(s, model_id)
            rows = list(s.scalars(stmt))
            more = len(rows) > page_size
            rows = rows[:page_size]
            aliases = _aliases_of(s, model_id, [r.version for r in rows])
        token = paging.encode([rows[-1].version], query) if more else ""
        return Page([_version(r, aliases.get(r.version, ())) for r in rows], token)

    # ---- gates -------------------------------------------------------------------------------
    def create_gate(self, model_id: str, spec: GateSpec) -> Gate:
        with self.db.write() as s:
            _orm_require_model(s, model_id)
            s.execute(
                self.db.insert(GateRow)
                .values(
                    model_id=model_id,
                    gate_id=spec.gate_id,
                    suite_fingerprint=spec.suite_fingerprint,
                    metric=spec.metric,
                    direction=spec.direction.value,
                    threshold=spec.threshold,
                    create_time_us=now_us(),
                )
                .on_conflict_do_nothing()
            )
            gate = _gate(_require_gate(s, model_id, spec.gate_id))
        for field in ("suite_fingerprint", "metric", "direction", "threshold"):
            have, asked = getattr(gate.spec, field), getattr(spec, field)
            if have != asked:
                shown = (lambda v: v.name if isinstance(v, Direction) else repr(v))(have)
                raise AlreadyExists(
                    f"gate models/{model_id}/gates/{spec.gate_id} is frozen with {field} {shown}; "
                    "create a new gate instead",
                    reason="GATE_IMMUTABLE",
                    field=field,
                )
        return gate

    def get_gate(self, model_id: str, gate_id: str) -> Gate:
        with self.db.read() as s:
            return _gate(_require_gate(s, model_id, gate_id))

    def record_gate_result(self, model_id: str, gate_id: str, version: int, score: float, actor: str) -> GateResult:
        with self.db.statements(write=True) as q:
            _gate_spec(q, model_id, gate_id)
            _require_version(q, model_id, version)
            q.run(
                "INSERT INTO gate_results (model_id, gate_id, version, score, actor, create_time_us) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (model_id, gate_id, version, score, actor, now_us()),
            )
            row = q.one(
                "SELECT score, actor, create_time_us FROM gate_results "
                "WHERE model_id = ? AND gate_id = ? AND version = ?",
                (model_id, gate_id, version),
            )
            assert row is not None
            result = GateResult(model_id, gate_id, version, row[0], row[1], row[2])
        if result.score != score:
            raise AlreadyExists(
                f"gate {gate_id!r} already recorded score {result.score} for version {version}; results are immutable",
                reason="GATE_RESULT_IMMUTABLE",
                field="score",
                metadata={"recordedScore": repr(result.score)},
            )
        return result

    # ---- aliases -----------------------------------------------------------------------------
    def evaluate_promotion(
        self, model_id: str, alias: str, version: int, gate_id: str, expected_revision: int | None
    ) -> Decision:
        with self.db.statements(write=False) as q:
            spec = _gate_spec(q, model_id, gate_id)
            _require_version(q, model_id, version)
            state = _read_alias(q, model_id, alias, "")
            current, revision = (state.version, state.revision) if state is not None else (0, 0)
            return _decide(q, model_id, spec, version, current, revision, expected_revision)

    def set_alias(
        self, model_id: str, alias: str, version: int, gate_id: str, expected_revision: int | None, actor: str
    ) -> AliasOutcome:
        with self.db.statements(write=True) as q:
            spec = _gate_spec(q, model_id, gate_id)
            _require_version(q, model_id, version)
            state = self._lock_alias(q, model_id, alias, create=True)
            assert state is not None
            decision = _decide(q, model_id, spec, version, state.version, state.revision, expected_revision)
            previous = state.version
            if decision.promoted:
                state.move(version, gate_id)
            entry = _record(
                q,
                state,
                Action.PROMOTED if decision.promoted else Action.REFUSED,
                previous,
                version,
                gate_id,
                decision.candidate_score,
                decision.incumbent_score,
                decision.reason,
                actor,
            )
            return AliasOutcome(state.alias(), entry, decision)

    def rollback_alias(
        self, model_id: str, alias: str, actor: str, expected_revision: int | None = None
    ) -> AliasOutcome:
        with self.db.statements(write=True) as q:
            state = self._lock_alias(q, model_id, alias, create=False)
            if state is None or state.revision == 0:
                raise NotFound(f"models/{model_id}/aliases/{alias} has never been set", field="alias")
            if not gates.revision_matches(expected_revision, state.revision, state.version != 0):
                raise _stale(expected_revision, state.revision)
            changes = [
                AliasChange(*r)
                for r in q.all(
                    "SELECT action, from_version, to_version, gate_id FROM alias_history "
                    "WHERE model_id = ? AND alias = ? AND action != ? ORDER BY sequence",
                    (model_id, alias, Action.REFUSED),
                )
            ]
            target = gates.rollback_target(changes)
            if target is None:
                raise FailedPrecondition(
                    f"models/{model_id}/aliases/{alias} has no previous version to roll back to",
                    reason=gates.NO_PREVIOUS_VERSION,
                    field="alias",
                    metadata={"currentVersion": str(state.version), "revision": str(state.revision)},
                )
            previous = state.version
            # Both versions' scores on the gate the restored version was admitted by, for the audit trail (the
            # move itself is not a gate decision: it restores what a decision admitted before).
            scores: dict[int, float] = dict(
                q.all(
                    "SELECT version, score FROM gate_results WHERE model_id = ? AND gate_id = ? AND version IN (?, ?)",
                    (model_id, target.gate_id, target.version, previous),
                )
            )
            state.move(target.version, target.gate_id)
            entry = _record(
                q,
                state,
                Action.ROLLED_BACK,
                previous,
                target.version,
                target.gate_id,
                scores.get(target.version),
                scores.get(previous) if previous else None,
                gates.ROLLED_BACK,
                actor,
            )
            return AliasOutcome(state.alias(), entry)

    def delete_alias(self, model_id: str, alias: str, expected_revision: int | None, actor: str) -> AliasOutcome:
        with self.db.statements(write=True) as q:
            state = self._lock_alias(q, model_id, alias, create=False)
            if state is None or state.version == 0:
                raise NotFound(f"models/{model_id}/aliases/{alias} is not set", field="alias")
            if not gates.revision_matches(expected_revision, state.revision, True):
                raise _stale(expected_revision, state.revision)
            previous = state.version
            state.move(0, "")
            entry = _record(q, state, Action.DELETED, previous, 0, "", None, None, gates.DELETED, actor)
            return AliasOutcome(state.alias(), entry)

    def alias_history(self, model_id: str, alias: str, page_size: int, page_token: str) -> Page[AliasHistoryEntry]:
        query = {"list": "alias_history", "model": model_id, "alias": alias}
        cursor = paging.decode(page_token, query)
        stmt = select(AliasHistoryRow).where(AliasHistoryRow.model_id == model_id, AliasHistoryRow.alias == alias)
        if cursor:
            stmt = stmt.where(AliasHistoryRow.sequence > paging.fields(cursor, int)[0])
        stmt = stmt.order_by(AliasHistoryRow.sequence).limit(page_size + 1)
        with self.db.read() as s:
            _orm_require_model(s, model_id)
            rows = list(s.scalars(stmt))
            if not rows and not cursor and s.get(AliasRow, (model_id, alias)) is None:
                # No decision was ever made about it (a refused one would have left its row and an entry): most
                # likely a misspelt alias, which an empty history would hide.
                raise NotFound(f"models/{model_id}/aliases/{alias} has never been set", field="alias")
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = paging.encode([rows[-1].sequence], query) if more else ""
        return Page([_entry(r) for r in rows], token)

    def get_alias(self, model_id: str, alias: str) -> Alias | None:
        with self.db.read() as s:
            row = s.get(AliasRow, (model_id, alias))
            return None if row is None else _alias(row)

    def serving_target(self, model_id: str, alias: str) -> ServingTarget:
        """The serving lookup, on its fast path: one indexed statement on a connection of this thread's own.

        The statement returns the alias row and every alias row pointing at the same version, so the answer
        (revision, version, the version's aliases) is always read from the database, which keeps replicas
        correct. What is kept in process is derived from what was read: versions (they never change), and the
        last answer per alias, reused only when the rows just read are the ones it was built from.
        """
        rows = self._alias_and_siblings(model_id, alias)
        key = (model_id, alias)
        last = self._serving.get(key)
        if last is not None and last[0] == rows:
            return last[1]
        own = next((r for r in rows if r[0] == alias), None)
        if own is None:
            # Every read of this path uses the own connection: on the event loop, a pool checkout could wait
            # up to the pool timeout and stall every call of the replica meanwhile.
            if not self.db.own_query("SELECT 1 FROM registered_models WHERE id = ?", (model_id,)):
                raise _model_not_found(model_id)
            return ServingTarget(Alias(model_id, alias, 0, 0, "", 0), None)
        current = Alias(model_id, alias, own[1], own[2], own[3], own[4])
        if current.version == 0:
            return ServingTarget(current, None)
        version = self._cached_version(model_id, current.version)
        aliases = tuple(sorted(r[0] for r in rows if r[1] == current.version))
        target = ServingTarget(current, replace(version, aliases=aliases))
        self._serving.put(key, (rows, target), version.footprint)
        return target

    def alias_changes(
        self, model_id: str, alias: str, after_revision: int, before_revision: int
    ) -> list[ServingTarget]:
        rows = self.db.own_query(_CHANGES_SQL, (model_id, alias, after_revision, before_revision, *Action.CHANGES))
        out = []
        for revision, to_version, gate_id, stamp in rows:
            state = Alias(model_id, alias, to_version, revision, gate_id, stamp)
            version = replace(self._cached_version(model_id, to_version), aliases=(alias,)) if to_version else None
            out.append(ServingTarget(state, version))
        return out

    def _alias_and_siblings(self, model_id: str, alias: str) -> list[tuple[Any, ...]]:
        return self.db.own_query(_SERVING_SQL, (model_id, alias, model_id, alias))

    def _cached_version(self, model_id: str, version: int) -> ModelVersion:
        key = (model_id, version)
        with self._versions_lock:
            found = self._versions.get(key)
            if found is not None:
                self._versions.move_to_end(key)
                return found
        found_rows = self.db.own_query(_VERSION_SQL, key)  # the own connection, as serving_target's reads
        if not found_rows:  # the alias row was read first; a version is never deleted, so this cannot happen
            raise NotFound(f"models/{model_id}/versions/{version} not found", field="version")
        loaded = _version_from_values(found_rows[0])
        size = loaded.footprint
        if size > VERSION_CACHE_BYTES // 8:  # read again each time rather than push out everything else
            return loaded
        with self._versions_lock:
            if key not in self._versions:
                self._versions[key] = loaded
                self._versions_bytes += size
            while len(self._versions) > VERSION_CACHE_SIZE or self._versions_bytes > VERSION_CACHE_BYTES:
                _, dropped = self._versions.popitem(last=False)
                self._versions_bytes -= dropped.footprint
        return loaded

    def alias_revisions(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        keys = list(keys)
        with self.db.read() as s:
            for lo in range(0, len(keys), REVISION_BATCH):  # stay far below the databases' parameter limits
                stmt = select(AliasRow.model_id, AliasRow.alias, AliasRow.revision).where(
                    tuple_(AliasRow.model_id, AliasRow.alias).in_(keys[lo : lo + REVISION_BATCH])
                )
                out.update(((m, a), r) for m, a, r in s.execute(stmt))
        return out

    # ---- helpers -----------------------------------------------------------------------------
    def _lock_alias(self, q: Statements, model_id: str, alias: str, *, create: bool) -> _AliasState | None:
        """The alias row, locked for this transaction; created (revision 0, pointing nowhere) if asked."""
        state = _read_alias(q, model_id, alias, self._for_update)
        if state is not None or not create:
            if state is None:
                _require_model(q, model_id)
            return state
        _require_model(q, model_id)
        q.run(
            "INSERT INTO aliases (model_id, alias, version, revision, gate_id, history_seq, update_time_us) "
            "VALUES (?, ?, 0, 0, '', 0, 0) ON CONFLICT DO NOTHING",
            (model_id, alias),
        )
        state = _read_alias(q, model_id, alias, self._for_update)
        assert state is not None
        return state


class _AliasState:
    """An alias row as read under its lock, changed in memory, then written back by `_record`."""

    __slots__ = ("gate_id", "history_seq", "model_id", "name", "revision", "update_time_us", "version")

    def __init__(self, model_id: str, name: str, row: tuple[Any, ...]) -> None:
        self.model_id, self.name = model_id, name
        self.version, self.revision, self.gate_id, self.history_seq, self.update_time_us = row

    def move(self, version: int, gate_id: str) -> None:
        self.version, self.gate_id = version, gate_id
        self.revision += 1
        self.update_time_us = now_us()

    def alias(self) -> Alias:
        return Alias(self.model_id, self.name, self.version, self.revision, self.gate_id, self.update_time_us)


def _read_alias(q: Statements, model_id: str, alias: str, lock: str) -> _AliasState | None:
    row = q.one(
        "SELECT version, revision, gate_id, history_seq, update_time_us FROM aliases WHERE model_id = ? AND alias = ?"
        + lock,
        (model_id, alias),
    )
    return None if row is None else _AliasState(model_id, alias, row)


def _decide(
    q: Statements,
    model_id: str,
    spec: GateSpec,
    version: int,
    current_version: int,
    revision: int,
    expected_revision: int | None,
) -> Decision:
    scores: dict[int, float] = dict(
        q.all(
            "SELECT version, score FROM gate_results WHERE model_id = ? AND gate_id = ? AND version IN (?, ?)",
            (model_id, spec.gate_id, version, current_version),
        )
    )
    return gates.decide(
        spec,
        candidate_version=version,
        candidate_score=scores.get(version),
        incumbent_version=current_version or None,
        incumbent_score=scores.get(current_version) if current_version else None,
        current_revision=revision,
        expected_revision=expected_revision,
    )


def _record(
    q: Statements,
    state: _AliasState,
    action: str,
    from_version: int,
    to_version: int,
    gate_id: str,
    candidate_score: float | None,
    incumbent_score: float | None,
    reason: str,
    actor: str,
) -> AliasHistoryEntry:
    """Write the alias row back and append its history entry (every decision, refused ones too)."""
    state.history_seq += 1
    entry = AliasHistoryEntry(
        model_id=state.model_id,
        alias=state.name,
        sequence=state.history_seq,
        action=action,
        revision=state.revision,
        from_version=from_version,
        to_version=to_version,
        gate_id=gate_id,
        candidate_score=candidate_score,
        incumbent_score=incumbent_score,
        reason=reason,
        actor=actor,
        create_time_us=now_us(),
    )
    q.run(
        "UPDATE aliases SET version = ?, revision = ?, gate_id = ?, history_seq = ?, update_time_us = ? "
        "WHERE model_id = ? AND alias = ?",
        (
            state.version,
            state.revision,
            state.gate_id,
            state.history_seq,
            state.update_time_us,
            state.model_id,
            state.name,
        ),
    )
    q.run(
        "INSERT INTO alias_history (model_id, alias, sequence, action, revision, from_version, to_version, gate_id, "
        "candidate_score, incumbent_score, reason, actor, create_time_us) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.model_id,
            entry.alias,
            entry.sequence,
            entry.action,
            entry.revision,
            entry.from_version,
            entry.to_version,
            entry.gate_id,
            entry.candidate_score,
            entry.incumbent_score,
            entry.reason,
            entry.actor,
            entry.create_time_us,
        ),
    )
    return entry


def _next_version(q: Statements, model_id: str, now: int) -> int | None:
    """Bump the model's counter and return the new number; None when there is no such model.

    The counter row is the lock: concurrent registrations of one model queue on this UPDATE (PostgreSQL row
    lock; SQLite holds the database write lock already), so numbers never repeat.
    """
    got = q.one(
        "UPDATE registered_models SET latest_version = latest_version + 1, update_time_us = ? WHERE id = ? "
        "RETURNING latest_version",
        (now, model_id),
    )
    return None if got is None else int(got[0])


def _insert_version(q: Statements, v: ModelVersion) -> None:
    q.run(
        _INSERT_VERSION_SQL,
        (
            v.model_id,
            v.version,
            v.run_id,
            v.artifact.path,
            v.artifact.sha256,
            v.artifact.size,
            v.artifact.uri,
            v.lineage_fingerprint,
            v.lineage.data_version,
            v.lineage.code_commit,
            v.lineage.config,
            v.lineage.base_model,
            v.lineage.seed,
            v.description,
            v.create_time_us,
        ),
    )


def _model_not_found(model_id: str) -> NotFound:
    return NotFound(f"models/{model_id} not found", field="model")


def _require_model(q: Statements, model_id: str) -> None:
    if q.one("SELECT 1 FROM registered_models WHERE id = ?", (model_id,)) is None:
        raise _model_not_found(model_id)


def _gate_spec(q: Statements, model_id: str, gate_id: str) -> GateSpec:
    row = q.one(
        "SELECT suite_fingerprint, metric, direction, threshold FROM gates WHERE model_id = ? AND gate_id = ?",
        (model_id, gate_id),
    )
    if row is None:
        _require_model(q, model_id)
        raise NotFound(f"gate models/{model_id}/gates/{gate_id} not found", field="gate_id")
    return GateSpec(gate_id, row[0], row[1], Direction(row[2]), row[3])


def _require_version(q: Statements, model_id: str, version: int) -> None:
    if q.one("SELECT 1 FROM model_versions WHERE model_id = ? AND version = ?", (model_id, version)) is None:
        _require_model(q, model_id)
        raise NotFound(f"models/{model_id}/versions/{version} not found", field="version")


def _orm_require_model(s: Session, model_id: str) -> RegisteredModelRow:
    row = s.get(RegisteredModelRow, model_id)
    if row is None:
        raise _model_not_found(model_id)
    return row


def _require_gate(s: Session, model_id: str, gate_id: str) -> GateRow:
    row = s.get(GateRow, (model_id, gate_id))
    if row is None:
        _orm_require_model(s, model_id)
        raise NotFound(f"gate models/{model_id}/gates/{gate_id} not found", field="gate_id")
    return row


def _model_tags(s: Session, model_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    if model_ids:
        for mid, k, v in s.execute(
            select(RegisteredModelTagRow.model_id, RegisteredModelTagRow.key, RegisteredModelTagRow.value).where(
                RegisteredModelTagRow.model_id.in_(model_ids)
            )
        ):
            out[mid][k] = v
    return out


def _stale(expected_revision: int | None, revision: int) -> Aborted:
    return Aborted(
        f"expected_revision {expected_revision} is stale: the alias is at revision {revision}",
        reason=gates.STALE_REVISION,
        field="expected_revision",
        metadata={"revision": str(revision)},
    )


def _aliases_of(s: Session, model_id: str, versions: list[int]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = defaultdict(list)
    if versions:
        for version, alias in s.execute(
            select(AliasRow.version, AliasRow.alias).where(
                AliasRow.model_id == model_id, AliasRow.version.in_(versions)
            )
        ):
            out[version].append(alias)
    # Sorted here by code point, as the serving lookup sorts them: the database's collation could differ.
    return defaultdict(tuple, {v: tuple(sorted(a)) for v, a in out.items()})


def _model(row: RegisteredModelRow, tags: dict[str, str]) -> RegisteredModel:
    return RegisteredModel(row.id, row.description, tags, row.latest_version, row.create_time_us, row.update_time_us)


def _version(row: ModelVersionRow, aliases: tuple[str, ...]) -> ModelVersion:
    return ModelVersion(
        model_id=row.model_id,
        version=row.version,
        run_id=row.run_id,
        artifact=ArtifactRef(row.artifact_path, row.artifact_sha256, row.artifact_size, row.artifact_uri),
        lineage=Lineage(row.data_version, row.code_commit, row.config, row.base_model, row.seed),
        lineage_fingerprint=row.lineage_fingerprint,
        description=row.description,
        aliases=aliases,
        create_time_us=row.create_time_us,
    )


def _version_from_values(v: Sequence[Any]) -> ModelVersion:
    """A version from a row of `_VERSION_SQL`."""
    return ModelVersion(
        model_id=v[0],
        version=int(v[1]),
        run_id=v[2],
        artifact=ArtifactRef(v[3], v[4], int(v[5]), v[6]),
        lineage=Lineage(v[8], v[9], v[10], v[11], v[12]),
        lineage_fingerprint=v[7],
        description=v[13],
        aliases=(),
        create_time_us=int(v[14]),
    )


def _gate(row: GateRow) -> Gate:
    spec = GateSpec(row.gate_id, row.suite_fingerprint, row.metric, Direction(row.direction), row.threshold)
    return Gate(row.model_id, spec, row.create_time_us)


def _alias(row: AliasRow) -> Alias:
    return Alias(row.model_id, row.alias, row.version, row.revision, row.gate_id, row.update_time_us)


def _entry(row: AliasHistoryRow) -> AliasHistoryEntry:
    return AliasHistoryEntry(
        model_id=row.model_id,
        alias=row.alias,
        sequence=row.sequence,
        action=row.action,
        revision=row.revision,
        from_version=row.from_version,
        to_version=row.to_version,
        gate_id=row.gate_id,
        candidate_score=row.candidate_score,
        incumbent_score=row.incumbent_score,
        reason=row.reason,
        actor=row.actor,
        create_time_us=row.create_time_us,
    )
