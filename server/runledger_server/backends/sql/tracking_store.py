"""SQLAlchemy implementation of the tracking store."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import string
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import ColumnElement, String, and_, exists, false, func, not_, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from runledger_server.backends.sql import chunk_format
from runledger_server.backends.sql.base import now_us
from runledger_server.backends.sql.chunk_cache import DEFAULT_MAX_BYTES, ChunkCache, ChunkKey
from runledger_server.backends.sql.database import Database, Statements, database_error
from runledger_server.backends.sql.tracking_tables import (
    LINEAGE_COLUMNS,
    EvalScoreRow,
    ExperimentRow,
    ExperimentTagRow,
    LatestMetricRow,
    RunParamRow,
    RunRow,
    RunTagRow,
)
from runledger_server.domain import ids, lineage as lineage_rules, metrics as metrics_rules, names, paging, run_status
from runledger_server.domain.errors import Aborted, AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from runledger_server.domain.filters import TIME_ATTRIBUTES, Clause, OrderBy
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import Batch, Series
from runledger_server.store.entities import EvalResult, Experiment, LatestMetric, Page, Run

_LOGGER = logging.getLogger(__name__)

_VAL = np.dtype("<f8")
T = TypeVar("T")
# Characters of params, tags, configs and latest metrics in one SearchRuns page: at most 32 MiB in UTF-8, under
# gRPC's 64 MiB.
PAGE_METADATA = 2 * names.MAX_RUN_METADATA
# What a latest metric adds to a page besides its key, counted like characters: step, value, time and framing.
LATEST_METRIC_CHARS = 40
HISTORY_READ_GROUP = 1_000_000  # points of chunks decoded at once when a history read is cut chunk by chunk
_IN_BATCH = 500  # values per IN list: far below the databases' parameter limits
KNOWN_RUNS_LIMIT = 100_000  # run IDs a server remembers as existing (metric commits skip looking them up)
# LIKE and ILIKE patterns escape with a backslash on both databases (PostgreSQL's default; SQLite has none).
_LIKE_ESCAPE = "\\"
# Database work one search may take before it is stopped (RESOURCE_EXHAUSTED), so that a costly filter cannot
# hold a worker and a connection without end; a search over 100,000 runs with simple clauses takes well under.
# The server passes its --search-budget-seconds.
QUERY_BUDGET_S = 10.0
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class SqlTrackingStore:
    def __init__(
        self, db: Database, chunk_cache_bytes: int = DEFAULT_MAX_BYTES, *, query_budget: float = QUERY_BUDGET_S
    ) -> None:
        self.db = db
        self.query_budget = query_budget
        self._known_runs: set[str] = set()  # runs are never deleted, so a positive cache is always valid
        self._chunks = ChunkCache(chunk_cache_bytes)

    # ---- experiments -------------------------------------------------------------------------
    def create_experiment(self, display_name: str, description: str, tags: dict[str, str]) -> Experiment:
        with self.db.write() as s:
            experiment_id, now = ids.new_id(), self._creation_time(s)
            # Inserted unless the name is taken, in one statement: of two callers racing on one name (two
            # replicas, or sweep trials calling get-or-create at once) one creates it and the other is told
            # which experiment holds the name, which is what get-or-create needs.
            created = s.execute(
                self.db.insert(ExperimentRow)
                .values(id=experiment_id, display_name=display_name, description=description, create_time_us=now)
                .on_conflict_do_nothing()
                .returning(ExperimentRow.id)
            ).scalar_one_or_none()
            if created is None:
                existing = s.scalar(select(ExperimentRow.id).where(ExperimentRow.display_name == display_name))
                raise AlreadyExists(
                    f"experiment display_name {display_name!r} is taken by experiments/{existing}",
                    field="display_name",
                    metadata={"experiment": f"experiments/{existing}"},
                )
            s.add_all(ExperimentTagRow(experiment_id=experiment_id, key=k, value=v) for k, v in tags.items())
            s.flush()
            return Experiment(experiment_id, display_name, description, dict(tags), now)

    def get_experiment(self, experiment_id: str) -> Experiment:
        with self.db.read() as s:
            row = s.get(ExperimentRow, experiment_id)
            if row is None:
                raise NotFound(f"experiments/{experiment_id} not found", field="name")
            return _experiment(row, _experiment_tags(s, [row.id]).get(row.id, {}))

    def list_experiments(self, clauses: Sequence[Clause], page_size: int, page_token: str) -> Page[Experiment]:
        query = {"filter": [c.__dict__ for c in clauses]}
        cursor = paging.decode(page_token, query)
        stmt = select(ExperimentRow)
        for c in clauses:
            stmt = stmt.where(_experiment_clause(c))
        if cursor:
            ct, eid = paging.fields(cursor, int, str)
            stmt = stmt.where(
                or_(ExperimentRow.create_time_us > ct, and_(ExperimentRow.create_time_us == ct, ExperimentRow.id > eid))
            )
        stmt = stmt.order_by(ExperimentRow.create_time_us, ExperimentRow.id).limit(page_size + 1)
        with self.db.bounded_read(self.query_budget, "filter") as s:
            rows = list(s.scalars(stmt))
            more = len(rows) > page_size
            rows = rows[:page_size]
            tags = _experiment_tags(s, [r.id for r in rows])
        token = paging.encode([rows[-1].create_time_us, rows[-1].id], query) if more else ""
        return Page([_experiment(r, tags.get(r.id, {})) for r in rows], token)

    # ---- runs --------------------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        experiment_id: str,
        display_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        lineage: Lineage,
        start_time_us: int | None,
    ) -> Run:
        merged = lineage_rules.merge(Lineage(), lineage)
        names.check_run_metadata(names.metadata_size(params) + names.metadata_size(tags), "params")
        with self.db.write() as s:
            if s.get(ExperimentRow, experiment_id) is None:
                raise NotFound(f"experiments/{experiment_id} not found", field="experiment")
            if s.get(RunRow, run_id) is not None:
                raise AlreadyExists(f"runs/{run_id} already exists", field="run_id")
            now = self._creation_time(s)
            row = RunRow(
                id=run_id,
                experiment_id=experiment_id,
                display_name=display_name,
                status="RUNNING",
                create_time_us=now,
                update_time_us=now,
                start_time_us=now if start_time_us is None else start_time_us,
                end_time_us=None,
            )
            _apply_lineage(row, merged)
            s.add(row)
            try:
                s.flush()
            except IntegrityError as exc:  # created since the check above, on another replica (a retry racing)
                raise AlreadyExists(f"runs/{run_id} already exists", field="run_id") from exc
            s.add_all(_param_row(run_id, k, v) for k, v in params.items())
            s.add_all(RunTagRow(run_id=run_id, key=k, value=v) for k, v in tags.items())
            s.flush()
            run = self._load(s, [row])[0]
        self._know_runs({run_id})
        return run

    def _know_runs(self, run_ids: set[str]) -> None:
        """Remember runs that exist; bounded, so a server that sees millions of runs over its life does not
        keep them all (a forgotten run is looked up again once)."""
        if len(self._known_runs) + len(run_ids) > KNOWN_RUNS_LIMIT:
            self._known_runs = set()
        self._known_runs |= set(itertools.islice(run_ids, KNOWN_RUNS_LIMIT))

    def _creation_time(self, s: Session) -> int:
        """Now, or just after the last creation time handed out: creation times follow commit order.

        The clock row stays locked until this transaction commits, so a creation that takes a later time also
        commits later, whichever replica or thread it runs on, and a clock stepping back cannot reorder them.
        Paging by creation time (and polling for runs created since a time) then never skips one.
        """
        greatest = "max" if self.db.is_sqlite else "GREATEST"
        return int(
            s.execute(
                text(
                    f"UPDATE creation_clock SET last_us = {greatest}(last_us + 1, :now) WHERE id = 1 RETURNING last_us"
                ),
                {"now": now_us()},
            ).scalar_one()
        )

    def get_run(self, run_id: str) -> Run:
        # Plain SQL in one read transaction: the ORM's per-statement work cost ~2 ms for these four reads.
        with self.db.statements(write=False) as q:
            row = q.one(f"{_RUN_SELECT} WHERE id = ?", (run_id,))
            if row is None:
                raise NotFound(f"runs/{run_id} not found", field="run_id")
            return _runs_with_details(q.all, [row])[0]

    def run_lineage(self, run_id: str) -> Lineage:
        with self.db.statements(write=False) as q:  # on the registration path: plain SQL
            row = q.one(f"SELECT {', '.join(LINEAGE_COLUMNS)} FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise NotFound(f"runs/{run_id} not found", field="run_id")
        return Lineage(*row)

    def update_run(self, run_id: str, status: str | None, end_time_us: int | None, display_name: str | None) -> Run:
        with self.db.write() as s:
            row = _require_run(s, run_id, lock=True)  # the new end time depends on the current state
            now = now_us()
            row.end_time_us = run_status.end_time_after_update(
                status=row.status,
                end_time_us=row.end_time_us,
                start_time_us=row.start_time_us,
                new_status=status,
                requested_end_us=end_time_us,
                now_us=now,
            )
            if status is not None:
                row.status = status
            if display_name is not None:
                row.display_name = display_name
            row.update_time_us = now
            s.flush()
            return self._load(s, [row])[0]

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        clauses: Sequence[Clause],
        order_by: OrderBy,
        page_size: int,
        page_token: str,
        *,
        until: float | None = None,
    ) -> Page[Run]:
        query = {
            "experiments": sorted(experiment_ids),
            "filter": [c.__dict__ for c in clauses],
            "order": order_by.__dict__,
        }
        cursor = paging.decode(page_token, query)
        sort = _sort_expr(order_by)
        stmt = select(*_RUN_COLUMNS, sort.label("sort_value"))
        if experiment_ids:
            stmt = stmt.where(RunRow.experiment_id.in_(experiment_ids))
        for c in clauses:
            stmt = stmt.where(_run_clause(c))
        stmt = stmt.order_by(
            sort.is_(None),
            sort.desc() if order_by.descending else sort.asc(),
            RunRow.create_time_us,
            RunRow.id,
        ).limit(page_size + 1)
        with self.db.bounded_read(self.query_budget, "filter", until=until) as s:
            _require_experiments(s, experiment_ids)
            if cursor is not None:
                digest = paging.reread_digest(cursor[0])
                if digest is not None:  # the last run's sort value was too long for a token: read it again
                    _, create_time, run_id = paging.fields(cursor, dict, int, str)  # checked before any query
                    value = s.execute(select(sort).where(RunRow.id == run_id)).scalar()
                    if value is not None and not isinstance(value, str):  # only text is ever carried this way
                        raise InvalidArgument("page_token is malformed", field="page_token")
                    if value is None or paging.text_digest(value) != digest:
                        # Changed since (a tag): where the page ended is lost, and going on from its new value
                        # would skip every run in between.
                        raise Aborted(
                            f"the sort value ({order_by.key!r}) of runs/{run_id}, where the last page ended, has "
                            "changed since; search again from the first page",
                            reason="PAGE_CURSOR_CHANGED",
                            field="page_token",
                        )
                    cursor = [value, create_time, run_id]
                stmt = stmt.where(_after(sort, order_by, cursor))
            result = [tuple(r) for r in s.execute(stmt)]
            more = len(result) > page_size
            result = result[:page_size]
            fetch = self._fetcher(s)
            kept = _fitting_a_page(fetch, result)
            if kept < len(result):  # runs with large params or tags: a shorter page (AIP-158 allows it)
                result, more = result[:kept], True
            runs = _runs_with_details(fetch, [r[:-1] for r in result])
        token = ""
        if more:
            last = result[-1]
            token = paging.encode([paging.long_value(last[-1]), last[_CREATE_TIME], last[_ID]], query)
        return Page(runs, token)

    def runs_in_creation_order(self, run_ids: Sequence[str]) -> list[str]:
        rows: list[tuple[int, str]] = []
        with self.db.read() as s:
            for some in _in_batches(list(run_ids)):
                found_rows = s.execute(select(RunRow.create_time_us, RunRow.id).where(RunRow.id.in_(some)))
                rows.extend((create_time, run_id) for create_time, run_id in found_rows)
        found = [run_id for _, run_id in sorted(rows)]
        missing = sorted(set(run_ids) - set(found))
        if missing:
            # A few of them by name: a status message that lists hundreds would exceed gRPC's header limit.
            named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise NotFound(f"{len(missing)} runs not found: {named}", field="run_ids")
        return found

    # ---- params, tags, lineage ---------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, str]) -> dict[str, str]:
        with self.db.write() as s:
            _require_run(s, run_id, lock=True)  # concurrent writers see each other's params
            existing = dict(
                s.execute(select(RunParamRow.key, RunParamRow.value).where(RunParamRow.run_id == run_id)).all()
            )
            for key in sorted(params):
                if key in existing and existing[key] != params[key]:
                    raise AlreadyExists(
                        f"param {key!r} of runs/{run_id} is already set to a different value "
                        f"({_clip(existing[key])!r}); params are immutable",
                        reason="PARAM_IMMUTABLE",
                        field=f"params[{key}]",
                        metadata={"key": key},
                    )
            new = {k: v for k, v in params.items() if k not in existing}
            if new:
                size = names.metadata_size(existing) + names.metadata_size(new) + _stored_size(s, RunTagRow, run_id)
                names.check_run_metadata(size, "params")
            s.add_all(_param_row(run_id, k, v) for k, v in new.items())
            if new:
                s.execute(update(RunRow).where(RunRow.id == run_id).values(update_time_us=now_us()))
            return {**existing, **new}

    def set_tags(self, run_id: str, tags: dict[str, str], remove_keys: Sequence[str]) -> dict[str, str]:
        with self.db.write() as s:
            _require_run(s, run_id, lock=True)  # two callers adding one new key: one inserts, the other updates
            rows = {r.key: r for r in s.scalars(select(RunTagRow).where(RunTagRow.run_id == run_id))}
            after = {k: r.value for k, r in rows.items() if k not in set(remove_keys)} | tags
            if names.metadata_size(after) > names.metadata_size({k: r.value for k, r in rows.items()}):
                names.check_run_metadata(names.metadata_size(after) + _stored_size(s, RunParamRow, run_id), "tags")
            for key in remove_keys:
                if key in rows:
                    s.delete(rows.pop(key))
            for key, value in tags.items():
                if key in rows:
                    rows[key].value = value
                else:
                    rows[key] = RunTagRow(run_id=run_id, key=key, value=value)
                    s.add(rows[key])
            s.execute(update(RunRow).where(RunRow.id == run_id).values(update_time_us=now_us()))
            return {k: r.value for k, r in rows.items()}

    def set_lineage(self, run_id: str, lineage: Lineage) -> Lineage:
        with self.db.write() as s:
            row = _require_run(s, run_id, lock=True)  # merged against what a concurrent writer just stored
            merged = lineage_rules.merge(_lineage(row), lineage)
            _apply_lineage(row, merged)
            row.update_time_us = now_us()
            return merged

    # ---- metrics -----------------------------------------------------------------------------
    def commit_metric_batches(self, batches: Sequence[Batch]) -> list[bool | Exception]:
        """Store each batch once; a batch already stored (same run, writer, seq) is reported as a duplicate.

        Another replica may be storing some of the same batches at the same moment (a writer that reconnected
        elsewhere while its batches were still queued here). PostgreSQL then fails our insert once the other
        transaction commits; the next attempt finds those batches stored and inserts the rest, so every
        attempt settles at least one batch and the whole group is retried rather than failed.
        """
        conflict: AlreadyExists | None = None
        checksums = [b.checksum() for b in batches]  # once, and before the write lock (SQLite's) is taken
        for _ in range(len(batches) + 1):
            try:
                return self._commit_group(batches, checksums)
            except AlreadyExists as exc:
                conflict = exc
        assert conflict is not None
        return [conflict] * len(batches)

    def _commit_group(self, batches: Sequence[Batch], checksums: Sequence[int]) -> list[bool | Exception]:
        """One transaction for a whole group, in plain SQL: the per-commit cost is what small batches pay."""
        results: list[bool | Exception] = [False] * len(batches)
        with self.db.statements(write=True) as q:
            named = {b.run_id for b in batches}
            known = self._known_runs
            present = named & known  # the runs of this group that exist, whatever the cache forgets meanwhile
            for run_ids in _in_batches(list(named - known)):
                found = q.all(f"SELECT id FROM runs WHERE id IN ({_marks(len(run_ids))})", run_ids)
                present.update(r[0] for r in found)
            self._know_runs(present - known)
            # The checksum of each stored batch of this group's (run, writer, seq): a batch found there is a
            # re-send only with the same checksum (None: stored before checksums were kept).
            seen: dict[tuple[str, str], dict[int, int | None]] = defaultdict(dict)
            wanted: dict[tuple[str, str], list[int]] = defaultdict(list)
            for b in batches:
                wanted[(b.run_id, b.writer_id)].append(b.seq)
            for (run_id, writer_id), seqs in wanted.items():
                if run_id in present:
                    for some in _in_batches(seqs):  # a group of tiny batches can hold many thousands
                        rows = q.all(
                            "SELECT seq, content_crc FROM metric_batches WHERE run_id = ? AND writer_id = ? "
                            f"AND seq IN ({_marks(len(some))})",
                            [run_id, writer_id, *some],
                        )
                        seen[(run_id, writer_id)].update((r[0], r[1]) for r in rows)
            now = now_us()
            batch_rows: list[tuple[Any, ...]] = []
            chunk_rows: list[tuple[Any, ...]] = []
            committed: list[tuple[ChunkKey, Series]] = []
            latest: dict[tuple[str, str], tuple[int, float, int]] = {}
            for i, b in enumerate(batches):
                if b.run_id not in present:
                    results[i] = NotFound(f"runs/{b.run_id} not found", field="run_id")
                    continue
                done = seen[(b.run_id, b.writer_id)]
                crc = checksums[i]
                if b.seq in done:
                    stored = done[b.seq]
                    if stored is None:  # stored before checksums were kept: its points are compared instead
                        same = metrics_rules.holds_same_points(b, _stored_batch(q, b.run_id, b.writer_id, b.seq))
                    else:
                        same = stored == crc
                    results[i] = True if same else metrics_rules.writer_id_reused(b)
                    continue
                done[b.seq] = crc
                batch_rows.append((b.run_id, b.writer_id, b.seq, b.points, now, crc))
                for series in b.series:
                    if len(series) == 0:
                        continue
                    steps = series.steps
                    chunk_rows.append(
                        (
                            b.run_id,
                            series.key,
                            b.writer_id,
                            b.seq,
                            len(series),
                            int(steps.min()),
                            int(steps.max()),
                            chunk_format.encode_steps(steps),
                            series.values.astype(_VAL, copy=False).tobytes(),
                            chunk_format.encode_timestamps(series.timestamps_ms),
                        )
                    )
                    committed.append(((b.run_id, series.key, b.writer_id, b.seq), _owned(series)))
                    j = int(np.argmax(steps[::-1]))  # the last occurrence of the highest step
                    j = len(steps) - 1 - j
                    point = (int(steps[j]), float(series.values[j]), int(series.timestamps_ms[j]))
                    prev = latest.get((b.run_id, series.key))
                    if prev is None or point[0] >= prev[0]:
                        latest[(b.run_id, series.key)] = point
            # Rows go in key order: two PostgreSQL replicas whose groups hold the same runs then take their
            # row locks (latest_metrics, a re-sent batch's key) in the same order and cannot deadlock.
            batch_rows.sort()
            if batch_rows:
                q.many(
                    "INSERT INTO metric_batches (run_id, writer_id, seq, points, commit_time_us, content_crc) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    batch_rows,
                )
            if chunk_rows:
                q.many(
                    'INSERT INTO metric_chunks (run_id, "key", writer_id, seq, "count", min_step, max_step, steps, '
                    '"values", timestamps_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                    chunk_rows,
                )
            if latest:
                # NaN is stored as NULL so that it never satisfies a filter (see LatestMetricRow).
                q.many(
                    'INSERT INTO latest_metrics (run_id, "key", step, value, timestamp_ms) VALUES (?, ?, ?, ?, ?) '
                    'ON CONFLICT (run_id, "key") DO UPDATE SET step = excluded.step, value = excluded.value, '
                    "timestamp_ms = excluded.timestamp_ms WHERE excluded.step >= latest_metrics.step",
                    [(r, k, st, None if math.isnan(v) else v, ts) for (r, k), (st, v, ts) in sorted(latest.items())],
                )
        for chunk_key, chunk in committed:  # only once the transaction has committed
            self._chunks.put(chunk_key, chunk)
        return results

    def highest_metric_seq(self, run_id: str, writer_id: str) -> int | None:
        # The primary key (run_id, writer_id, seq) answers this from its index.
        rows = self.db.query(
            "SELECT MAX(seq) FROM metric_batches WHERE run_id = ? AND writer_id = ?", (run_id, writer_id)
        )
        highest = rows[0][0] if rows else None
        if highest is None:
            with self.db.read() as s:
                _require_run(s, run_id)
            return None
        return int(highest)

    def metric_chunks(
        self, run_id: str, key: str, start_step: int | None, end_step: int | None, max_points: int | None = None
    ) -> list[Series]:
        where = 'WHERE run_id = ? AND "key" = ?'
        params: list[Any] = [run_id, key]
        if start_step is not None:
            where += " AND max_step >= ?"
            params.append(start_step)
        if end_step is not None:
            where += " AND min_step <= ?"
            params.append(end_step)
        with self.db.statements(write=False) as q:
            if q.one("SELECT 1 FROM runs WHERE id = ?", (run_id,)) is None:
                raise NotFound(f"runs/{run_id} not found", field="run_id")
            # Which chunks, in logging order (no blob is read for this); then the blobs of those not in memory.
            listed = q.all(
                f'SELECT id, writer_id, seq, "count", min_step, max_step FROM metric_chunks {where} ORDER BY id', params
            )
            if max_points is not None and sum(row[3] for row in listed) > max_points:
                # More than a read may hold if the chunks are kept whole: keep only the points in the range, chunk
                # by chunk, so that chunks overlapping the range (other writers, sparse steps) count what they add.
                return self._points_in_range(q, run_id, key, listed, start_step, end_step, max_points)
            found = self._load_chunks(q, run_id, key, listed)
        return [found[row[0]] for row in listed]

    def _load_chunks(
        self, q: Statements, run_id: str, key: str, listed: Sequence[tuple[Any, ...]]
    ) -> dict[int, Series]:
        """The listed chunks by id, from the cache or decoded from their rows (and then cached)."""
        found: dict[int, Series] = {}
        missing: list[int] = []
        for chunk_id, writer_id, seq, *_ in listed:
            chunk = self._chunks.get((run_id, key, writer_id, seq))
            if chunk is None:
                missing.append(chunk_id)
            else:
                found[chunk_id] = chunk
        for some in _in_batches(missing):
            rows = q.all(
                'SELECT id, writer_id, seq, "count", min_step, max_step, steps, "values", timestamps_ms '
                f"FROM metric_chunks WHERE id IN ({_marks(len(some))})",
                some,
            )
            for chunk_id, writer_id, seq, *stored in rows:
                chunk = _decoded(key, *stored)
                self._chunks.put((run_id, key, writer_id, seq), chunk)
                found[chunk_id] = chunk
        return found

    def _points_in_range(
        self,
        q: Statements,
        run_id: str,
        key: str,
        listed: Sequence[tuple[Any, ...]],
        start_step: int | None,
        end_step: int | None,
        limit: int,
    ) -> list[Series]:
        """The listed chunks cut to the range, read a group at a time (each group of at most one batch's size,
        1,000,000 points): what is held is what the answer keeps, and more than `limit` of it is refused."""
        pieces: list[Series] = []
        kept = grouped = 0
        group: list[tuple[Any, ...]] = []
        for i, row in enumerate(listed):
            group.append(row)
            grouped += row[3]
            if i + 1 < len(listed) and grouped + listed[i + 1][3] <= HISTORY_READ_GROUP:
                continue
            found = self._load_chunks(q, run_id, key, group)
            for r in group:
                piece = metrics_rules.cut(found[r[0]], start_step, end_step)
                kept += len(piece)
                if kept > limit:
                    raise _history_too_large(run_id, key, listed, start_step, end_step, limit)
                pieces.append(piece)
            group, grouped = [], 0
        return pieces

    # ---- eval results ------------------------------------------------------------------------
    def log_eval_result(self, run_id: str, suite_fingerprint: str, metrics: dict[str, float]) -> EvalResult:
        with self.db.write() as s:
            _require_run(s, run_id, lock=True)  # a retry racing the original sees its scores, not a key conflict
            rows = {
                r.metric: r
                for r in s.scalars(
                    select(EvalScoreRow).where(
                        EvalScoreRow.run_id == run_id, EvalScoreRow.suite_fingerprint == suite_fingerprint
                    )
                )
            }
            for metric in sorted(metrics):
                if metric in rows and rows[metric].value != metrics[metric]:
                    raise AlreadyExists(
                        f"eval score {metric!r} of runs/{run_id} on suite {suite_fingerprint} is already "
                        f"recorded as {rows[metric].value}; eval results are immutable",
                        reason="EVAL_RESULT_IMMUTABLE",
                        field=f"metrics[{metric}]",
                        metadata={"key": metric},
                    )
            now = now_us()
            for metric, value in metrics.items():
                if metric not in rows:
                    rows[metric] = EvalScoreRow(
                        run_id=run_id,
                        suite_fingerprint=suite_fingerprint,
                        metric=metric,
                        value=value,
                        create_time_us=now,
                    )
                    s.add(rows[metric])
            s.flush()
            return EvalResult(
                run_id,
                suite_fingerprint,
                {m: r.value for m, r in rows.items()},
                min(r.create_time_us for r in rows.values()),
            )

    def eval_scores(self, run_ids: Sequence[str], metric: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = defaultdict(dict)
        with self.db.read() as s:
            for some in _in_batches(list(run_ids)):
                for run_id, suite, value in s.execute(
                    select(EvalScoreRow.run_id, EvalScoreRow.suite_fingerprint, EvalScoreRow.value).where(
                        EvalScoreRow.run_id.in_(some), EvalScoreRow.metric == metric
                    )
                ):
                    out[run_id][suite] = value
        return dict(out)

    def eval_suites(self, run_ids: Sequence[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        with self.db.read() as s:
            for some in _in_batches(list(run_ids)):
                for run_id, suite in s.execute(
                    select(EvalScoreRow.run_id, EvalScoreRow.suite_fingerprint)
                    .where(EvalScoreRow.run_id.in_(some))
                    .distinct()
                ):
                    out[run_id].add(suite)
        return dict(out)

    # ---- loading -----------------------------------------------------------------------------
    def _load(self, s: Session, rows: Sequence[RunRow]) -> list[Run]:
        """Runs as the API shows them, from rows of the session (a write that has just changed them)."""
        return _runs_with_details(self._fetcher(s), [tuple(getattr(r, c.key) for c in _RUN_COLUMNS) for r in rows])

    def _fetcher(self, s: Session) -> _Fetch:
        """Plain SQL (`?` placeholders) on the session's connection, inside its transaction."""
        driver = s.connection().connection  # the driver's own cursors: SQLAlchemy's results cost per row
        adapt = self.db.driver_sql
        dbapi: Any = self.db.engine.dialect.loaded_dbapi

        def fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
            cursor = driver.cursor()
            try:
                self.db.before_statement(driver.info, cursor)
                cursor.execute(adapt(sql), tuple(params))
                return [tuple(r) for r in cursor.fetchall()]
            except dbapi.OperationalError as exc:
                # The driver's own error, which SQLAlchemy never sees: translated as the ORM path would be (a
                # lock or statement timeout, a cancel, a lost connection: UNAVAILABLE). The session's rollback
                # then deals with the connection.
                raise database_error(exc) from exc
            finally:
                with contextlib.suppress(dbapi.Error):  # a lost connection's cursor refuses to close too
                    cursor.close()

        return fetch


# ---- helpers -------------------------------------------------------------------------------------
def _stored_batch(q: Statements, run_id: str, writer_id: str, seq: int) -> dict[str, Series]:
    """One stored batch's points by key, read from its chunks (rare: only re-sends of batches stored before
    migration 0006 kept their checksum)."""
    rows = q.all(
        'SELECT "key", "count", min_step, max_step, steps, "values", timestamps_ms FROM metric_chunks '
        "WHERE run_id = ? AND writer_id = ? AND seq = ?",
        (run_id, writer_id, seq),
    )
    return {key: _decoded(key, *stored) for key, *stored in rows}


def _decoded(key: str, n: int, low: int, high: int, steps: bytes, values: bytes, stamps: bytes) -> Series:
    """A metric chunk's row (count, min and max step, steps, values, timestamps) as the points it holds."""
    return Series(
        key,
        chunk_format.decode_steps(steps, n, low, high),
        np.frombuffer(values, _VAL),  # a view of the fetched bytes
        chunk_format.decode_timestamps(stamps, n),
    )


_Fetch = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
_RUN_COLUMNS = (
    RunRow.id,
    RunRow.experiment_id,
    RunRow.display_name,
    RunRow.status,
    RunRow.create_time_us,
    RunRow.update_time_us,
    RunRow.start_time_us,
    RunRow.end_time_us,
    RunRow.data_version,
    RunRow.code_commit,
    RunRow.config,
    RunRow.base_model,
    RunRow.seed,
    RunRow.lineage_fingerprint,
)
_ID, _CREATE_TIME, _CONFIG = 0, 4, 10  # positions in _RUN_COLUMNS
_RUN_SELECT = f"SELECT {', '.join(c.key for c in _RUN_COLUMNS)} FROM runs"


def _fitting_a_page(fetch: _Fetch, rows: Sequence[tuple[Any, ...]]) -> int:
    """How many of the runs found (at least one) a SearchRuns page takes, within PAGE_METADATA characters of
    params, tags, configs and latest metrics: measured in SQL, before any of it is loaded."""
    ids_ = [r[_ID] for r in rows]
    size: dict[str, int] = defaultdict(int)
    for some in _in_batches(ids_):
        for table, value_chars in (
            ("run_params", "LENGTH(value)"),
            ("run_tags", "LENGTH(value)"),
            ("latest_metrics", str(LATEST_METRIC_CHARS)),
        ):
            for run_id, chars in fetch(
                f'SELECT run_id, SUM(LENGTH("key") + {value_chars}) FROM {table} '
                f"WHERE run_id IN ({_marks(len(some))}) GROUP BY run_id",
                some,
            ):
                size[run_id] += int(chars or 0)
    total = 0
    for kept, r in enumerate(rows):
        total += size[r[_ID]] + len(r[_CONFIG] or "")
        if kept and total > PAGE_METADATA:
            return kept
    return len(rows)


def _stored_size(s: Session, table: type[RunParamRow] | type[RunTagRow], run_id: str) -> int:
    """Characters of a run's stored params or tags (keys and values), as names.MAX_RUN_METADATA counts them."""
    total = s.scalar(
        select(func.coalesce(func.sum(func.length(table.key) + func.length(table.value)), 0)).where(
            table.run_id == run_id
        )
    )
    return int(total or 0)


def _history_too_large(
    run_id: str,
    key: str,
    listed: Sequence[tuple[Any, ...]],
    start_step: int | None,
    end_step: int | None,
    limit: int,
) -> ResourceExhausted:
    """A bound on what one history read holds in memory: more than `limit` points in the requested steps. The
    metadata gives the steps the range really spans, to split it by."""
    low = max(min(row[4] for row in listed), start_step if start_step is not None else -(1 << 63))
    high = min(max(row[5] for row in listed), end_step if end_step is not None else (1 << 63) - 1)
    return ResourceExhausted(
        f"metric {key!r} of runs/{run_id} holds more than {limit:,} points in the requested steps, what one read "
        f"returns at most: ask for smaller ranges of steps (start_step, end_step) within {low}..{high}",
        reason="HISTORY_TOO_LARGE",
        field="end_step",
        metadata={"limit": str(limit), "minStep": str(low), "maxStep": str(high)},
    )


def _runs_with_details(fetch: _Fetch, rows: Sequence[tuple[Any, ...]]) -> list[Run]:
    """Runs from rows of `_RUN_COLUMNS`, with their params, tags and latest metrics (three reads, not per run)."""
    ids_ = [r[_ID] for r in rows]
    if not ids_:
        return []
    params: dict[str, dict[str, str]] = defaultdict(dict)
    tags: dict[str, dict[str, str]] = defaultdict(dict)
    latest: dict[str, dict[str, LatestMetric]] = defaultdict(dict)
    for some in _in_batches(ids_):
        marks = _marks(len(some))
        for run_id, k, v in fetch(f"SELECT run_id, key, value FROM run_params WHERE run_id IN ({marks})", some):
            params[run_id][k] = v
        for run_id, k, v in fetch(f"SELECT run_id, key, value FROM run_tags WHERE run_id IN ({marks})", some):
            tags[run_id][k] = v
        for run_id, k, step, value, stamp in fetch(
            f"SELECT run_id, key, step, value, timestamp_ms FROM latest_metrics WHERE run_id IN ({marks})", some
        ):
            latest[run_id][k] = LatestMetric(step, math.nan if value is None else value, stamp)
    return [
        Run(
            run_id=r[0],
            experiment_id=r[1],
            display_name=r[2],
            status=r[3],
            params=params.get(r[0], {}),
            tags=tags.get(r[0], {}),
            lineage=Lineage(r[8], r[9], r[10], r[11], r[12]),
            lineage_fingerprint=r[13],
            latest_metrics=latest.get(r[0], {}),
            create_time_us=r[4],
            update_time_us=r[5],
            start_time_us=r[6],
            end_time_us=r[7],
        )
        for r in rows
    ]


def _require_run(s: Session, run_id: str, *, lock: bool = False) -> RunRow:
    """The run's row; `lock` holds it until the transaction ends, for read-merge-write updates on PostgreSQL
    (SQLite's write transactions hold the database lock from their start)."""
    row = s.get(RunRow, run_id, with_for_update=True) if lock else s.get(RunRow, run_id)
    if row is None:
        raise NotFound(f"runs/{run_id} not found", field="run_id")
    return row


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _param_row(run_id: str, key: str, value: str) -> RunParamRow:
    return RunParamRow(run_id=run_id, key=key, value=value, value_prefix=value[:200])


def _lineage(row: RunRow) -> Lineage:
    return Lineage(row.data_version, row.code_commit, row.config, row.base_model, row.seed)


def _apply_lineage(row: RunRow, lineage: Lineage) -> None:
    row.data_version = lineage.data_version
    row.code_commit = lineage.code_commit
    row.config = lineage.config
    row.base_model = lineage.base_model
    row.seed = lineage.seed
    row.lineage_fingerprint = lineage.fingerprint()


def _experiment(row: ExperimentRow, tags: dict[str, str]) -> Experiment:
    return Experiment(row.id, row.display_name, row.description, tags, row.create_time_us)


def _experiment_tags(s: Session, experiment_ids: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    if experiment_ids:
        for eid, k, v in s.execute(
            select(ExperimentTagRow.experiment_id, ExperimentTagRow.key, ExperimentTagRow.value).where(
                ExperimentTagRow.experiment_id.in_(experiment_ids)
            )
        ):
            out[eid][k] = v
    return out


def _compare(column: Any, op: str, values: tuple[Any, ...]) -> ColumnElement[bool]:
    v = values[0]
    if op == "=":
        return column == v
    if op == "!=":
        return column != v
    if op == "<":
        return column < v
    if op == "<=":
        return column <= v
    if op == ">":
        return column > v
    if op == ">=":
        return column >= v
    if op == "LIKE":  # case-sensitive on SQLite too: database.py turns on PRAGMA case_sensitive_like
        return column.like(v, escape=_LIKE_ESCAPE)
    if op == "ILIKE":
        return _AsciiLower(column).like(str(v).translate(_ASCII_LOWER), escape=_LIKE_ESCAPE)
    if op == "IN":
        return column.in_(values)
    if op == "NOT IN":
        return not_(column.in_(values))
    raise InvalidArgument(f"unsupported operator {op!r}", field="filter")


class _AsciiLower(FunctionElement[str]):
    """The text with A-Z lowered and every other character kept, on any database locale.

    ILIKE compares these: SQLite's lower() folds only ASCII, while PostgreSQL's lower() and ILIKE follow the
    database's locale (`É` ILIKE `é` under most UTF-8 locales), so the same filter would match other runs there.
    """

    type = String()
    inherit_cache = True


@compiles(_AsciiLower)  # SQLite's built-in lower() folds only A-Z
def _ascii_lower_default(element: _AsciiLower, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_AsciiLower, "postgresql")
def _ascii_lower_postgresql(element: _AsciiLower, compiler: SQLCompiler, **kw: Any) -> str:
    upper, lower = string.ascii_uppercase, string.ascii_lowercase
    return f"translate({compiler.process(element.clauses, **kw)}, '{upper}', '{lower}')"


def _text_compare(column: Any, op: str, values: tuple[Any, ...]) -> ColumnElement[bool]:
    """Ordering comparisons of text by bytes; equality and patterns need no collation (equal text is equal
    bytes under any deterministic collation), so those keep the column's index usable."""
    return _compare(_Bytewise(column) if op in ("<", "<=", ">", ">=") else column, op, values)


class _Bytewise(FunctionElement[str]):
    """Text compared and ordered by its bytes, as SQLite does: PostgreSQL otherwise follows the database's
    collation (en-US orders `aaa` before `BBB`, SQLite after), so one filter or order would pick other runs."""

    type = String()
    inherit_cache = True


@compiles(_Bytewise)  # SQLite's default collation, BINARY, is bytewise already
def _bytewise_default(element: _Bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_Bytewise, "postgresql")
def _bytewise_postgresql(element: _Bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return f'({compiler.process(element.clauses, **kw)} COLLATE "C")'


def _experiment_clause(c: Clause) -> ColumnElement[bool]:
    if c.kind == "tags":
        return exists().where(
            ExperimentTagRow.experiment_id == ExperimentRow.id,
            ExperimentTagRow.key == c.key,
            _text_compare(ExperimentTagRow.value, c.op, c.values),
        )
    if c.kind == "attribute" and c.key == "display_name":
        return _text_compare(ExperimentRow.display_name, c.op, c.values)
    raise InvalidArgument(
        f"filter: experiments can be filtered on display_name and tags.<key>, not {c.kind}.{c.key}", field="filter"
    )


_LINEAGE_COLUMNS: dict[str, Any] = {
    "data_version": RunRow.data_version,
    "code_commit": RunRow.code_commit,
    "config": RunRow.config,
    "base_model": RunRow.base_model,
    "fingerprint": RunRow.lineage_fingerprint,
}


def _run_clause(c: Clause) -> ColumnElement[bool]:
    if c.kind == "params":
        return exists().where(
            RunParamRow.run_id == RunRow.id,
            RunParamRow.key == c.key,
            _text_compare(RunParamRow.value, c.op, c.values),
        )
    if c.kind == "tags":
        return exists().where(
            RunTagRow.run_id == RunRow.id, RunTagRow.key == c.key, _text_compare(RunTagRow.value, c.op, c.values)
        )
    if c.kind == "metrics":
        return exists().where(
            LatestMetricRow.run_id == RunRow.id,
            LatestMetricRow.key == c.key,
            LatestMetricRow.value.is_not(None),
            _compare(LatestMetricRow.value, c.op, c.values),
        )
    if c.kind == "lineage":
        if c.key == "seed":
            return and_(RunRow.seed.is_not(None), _compare(RunRow.seed, c.op, c.values))
        return and_(_LINEAGE_COLUMNS[c.key].is_not(None), _text_compare(_LINEAGE_COLUMNS[c.key], c.op, c.values))
    column: Any = {
        "status": RunRow.status,
        "display_name": RunRow.display_name,
        "run_id": RunRow.id,
        "experiment": RunRow.experiment_id,
        "create_time": RunRow.create_time_us,
        "start_time": RunRow.start_time_us,
        "end_time": RunRow.end_time_us,
    }[c.key]
    values = c.values
    if c.key == "experiment":
        values = tuple(str(v).removeprefix("experiments/") for v in values)
    elif c.key == "run_id":  # as named in responses and requests elsewhere: `runs/{id}` or the bare ID
        values = tuple(str(v).removeprefix("runs/") for v in values)
    if c.key in TIME_ATTRIBUTES:
        try:
            times = tuple(float(v) for v in values)
        except ValueError as exc:
            raise InvalidArgument(f"filter: {c.key} takes milliseconds since the epoch", field="filter") from exc
        return _time_compare(column, c.op, times)
    return _text_compare(column, c.op, values)


def _require_experiments(s: Session, experiment_ids: Sequence[str]) -> None:
    """A search of an experiment that does not exist is NOT_FOUND (a typo must not read as "no runs")."""
    wanted = set(experiment_ids)
    found: set[str] = set()
    for some in _in_batches(sorted(wanted)):
        found.update(s.scalars(select(ExperimentRow.id).where(ExperimentRow.id.in_(some))))
    missing = sorted(wanted - found)
    if missing:
        named = ", ".join(f"experiments/{m}" for m in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise NotFound(f"{named} not found", field="experiments")


def _time_compare(column: Any, op: str, values: tuple[float, ...]) -> ColumnElement[bool]:
    """Compare a microsecond column with milliseconds as the API shows them, rounded down (a run started at
    -0.5 ms shows -1 ms, and matches `start_time = -1` and `< 0`). Written as ranges of the column itself:
    exact on both databases (SQL integer division rounds toward zero) and able to use an index."""

    def within(ms: float) -> ColumnElement[bool]:  # the column shows exactly `ms`
        if not ms.is_integer():
            return false()
        return and_(column >= int(ms) * 1000, column < (int(ms) + 1) * 1000)

    v = values[0]
    if op == "<":
        return column < math.ceil(v) * 1000
    if op == "<=":
        return column < (math.floor(v) + 1) * 1000
    if op == ">":
        return column >= (math.floor(v) + 1) * 1000
    if op == ">=":
        return column >= math.ceil(v) * 1000
    if op in ("=", "IN", "!=", "NOT IN"):
        if len(values) == 1:
            matches = within(values[0])
        else:
            # One flat IN list on the column rounded down to its millisecond: an OR of ranges per value nests
            # beyond SQLite's expression depth (1,000) and took seconds on PostgreSQL. `%` rounds toward zero
            # on both databases, so ((c % 1000) + 1000) % 1000 is the microseconds above the millisecond.
            floored = column - (((column % 1000) + 1000) % 1000)
            wanted = sorted({int(ms) * 1000 for ms in values if ms.is_integer()})
            matches = floored.in_(wanted) if wanted else false()
        if op in ("=", "IN"):
            return matches
        return and_(column.is_not(None), not_(matches))  # a run without the time (not ended) matches neither
    raise InvalidArgument(f"{op} does not compare times", field="filter")


def _sort_expr(order: OrderBy) -> Any:
    if order.kind == "params":
        return _Bytewise(
            select(RunParamRow.value)
            .where(RunParamRow.run_id == RunRow.id, RunParamRow.key == order.key)
            .scalar_subquery()
        )
    if order.kind == "tags":
        return _Bytewise(
            select(RunTagRow.value).where(RunTagRow.run_id == RunRow.id, RunTagRow.key == order.key).scalar_subquery()
        )
    if order.kind == "metrics":
        return (
            select(LatestMetricRow.value)
            .where(LatestMetricRow.run_id == RunRow.id, LatestMetricRow.key == order.key)
            .scalar_subquery()
        )
    if order.kind == "lineage":
        return RunRow.seed if order.key == "seed" else _Bytewise(_LINEAGE_COLUMNS[order.key])
    if order.key in TIME_ATTRIBUTES:
        return {
            "create_time": RunRow.create_time_us,
            "start_time": RunRow.start_time_us,
            "end_time": RunRow.end_time_us,
        }[order.key]
    return _Bytewise(
        {
            "status": RunRow.status,
            "display_name": RunRow.display_name,
            "run_id": RunRow.id,
            "experiment": RunRow.experiment_id,
        }[order.key]
    )


def _after(sort: Any, order_by: OrderBy, cursor: list[Any]) -> ColumnElement[bool]:
    # The sort value must have the type of the sort key: PostgreSQL refuses to compare a number with text.
    if order_by.kind == "metrics":
        kind: tuple[type, ...] = (int, float, type(None))
    elif (order_by.kind == "attribute" and order_by.key in TIME_ATTRIBUTES) or (order_by.kind, order_by.key) == (
        "lineage",
        "seed",
    ):
        kind = (int, type(None))
    else:
        kind = (str, type(None))
    value, ct, rid = paging.fields(cursor, kind, int, str)
    tie = or_(RunRow.create_time_us > ct, and_(RunRow.create_time_us == ct, RunRow.id > rid))
    if value is None:
        return and_(sort.is_(None), tie)
    beyond = sort < value if order_by.descending else sort > value
    return or_(beyond, and_(sort == value, tie), sort.is_(None))


def _in_batches(values: list[T]) -> Iterator[list[T]]:
    for lo in range(0, len(values), _IN_BATCH):
        yield values[lo : lo + _IN_BATCH]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _owned(series: Series) -> Series:
    """The series as the database returns it (int64 steps and timestamps, float64 values), in arrays of its own:
    a view into a request's bytes would keep the whole request alive in the chunk cache."""
    return Series(
        series.key, _own(series.steps, np.int64), _own(series.values, _VAL), _own(series.timestamps_ms, np.int64)
    )


def _own(a: np.ndarray, dtype: Any) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.owndata else a.copy()
