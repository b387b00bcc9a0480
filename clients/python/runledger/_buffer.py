"""Logged points until the server acknowledges them: row groups, batch cutting and the outbox (pure, no I/O)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from runledger import errors
from runledger._convert import as_float, mapping, sendable

native: ModuleType | None
try:  # the fast path of log_metrics, built from _rowbuffer.c at install time when a C compiler is present
    from runledger import _rowbuffer as native
except ImportError:  # pragma: no cover - exercised by installs without a compiler
    native = None
if os.environ.get("RUNLEDGER_PURE_PYTHON"):  # the reference implementation, for comparison and debugging
    native = None

_LOGGER = logging.getLogger(__name__)

MAX_KEY_LENGTH = 250
MAX_SERIES_PER_BATCH = 10_000  # the server refuses batches with more series
MAX_POINTS_PER_BATCH = 1_000_000  # ... or more points
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def check_key(key: object) -> str:
    """The server's rule for a metric key, checked once per key so a bad key fails in the caller's hands."""
    if (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY_LENGTH
        or "\x00" in key
        or key.strip() != key
        or not sendable(key)
    ):
        raise errors.InvalidArgument(
            f"metric key {key!r} is not valid (a string of 1-{MAX_KEY_LENGTH} characters, no NUL, "
            "no surrounding spaces, valid Unicode)",
            reason="INVALID_ARGUMENT",
            metadata={"field": "series.key"},
        )
    return key


def _is_number(value: Any) -> bool:
    try:
        as_float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def check_int64(value: int, field: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise errors.InvalidArgument(
            f"{field} {value} does not fit in int64", reason="INVALID_ARGUMENT", metadata={"field": field}
        )
    return value


@dataclass(frozen=True)
class BatchPolicy:
    """When the buffered points become a batch: at `max_points`, or `max_delay` seconds after the last cut."""

    max_points: int = 16_384
    max_delay: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.max_points <= MAX_POINTS_PER_BATCH or self.max_delay <= 0:
            # Above the server's limit every batch would be refused, and with it the run's metrics.
            raise ValueError(
                f"batch points must be within 1..{MAX_POINTS_PER_BATCH:,} (the server's limit per batch) "
                f"and the batch interval > 0, got {self.max_points} and {self.max_delay}"
            )

    def due(self, buffered: int, since_last_cut: float, *, force: bool = False) -> bool:
        if buffered <= 0:
            return False
        return force or buffered >= self.max_points or since_last_cut >= self.max_delay


class RowGroup:
    """Consecutive log calls with the same keys, in the same order: one step, timestamp and value row each.

    Training loops log the same keys step after step, so a call costs one tuple comparison and three list
    appends; the sender turns the rows into per-key columns with numpy when it cuts a batch. `_rowbuffer.c`
    holds the same rows in C arrays (same methods), which its fast path appends to.
    """

    __slots__ = ("_head", "keys", "stamps", "steps", "values")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.steps: list[int] = []
        self.stamps: list[int] = []
        self.values: list[float] = []  # row-major: len(keys) values per row
        self._head = 0  # rows before it were taken: dropped from the lists once they are half of them

    @property
    def rows(self) -> int:
        return len(self.steps) - self._head

    def append(self, step: int, stamp: int, values: list[float]) -> None:
        """One row, all or nothing: an interrupt (Ctrl-C) between the three appends undoes them."""
        rows = len(self.steps)
        try:
            self.values.extend(values)
            self.steps.append(step)
            self.stamps.append(stamp)
        except BaseException:
            del self.values[rows * len(self.keys) :], self.steps[rows:], self.stamps[rows:]
            raise

    def take(self, rows: int) -> tuple[list[int], list[int], list[float]]:
        """Remove and return the oldest `rows` rows: steps, timestamps, values (row-major).

        Taking moves a mark rather than the rows left, so cutting a large buffer into many batches costs
        what it takes, not the buffer's size per batch."""
        k, h = len(self.keys), self._head
        if rows >= len(self.steps) - h:
            if h:
                taken = self.steps[h:], self.stamps[h:], self.values[h * k :]
            else:
                taken = self.steps, self.stamps, self.values
            self.steps, self.stamps, self.values, self._head = [], [], [], 0
            return taken
        end = h + rows
        taken = self.steps[h:end], self.stamps[h:end], self.values[h * k : end * k]
        if 2 * end >= len(self.steps):
            del self.steps[:end], self.stamps[:end], self.values[: end * k]
            self._head = 0
        else:
            self._head = end
        return taken


class Lane:
    """What `log_metrics` reads on every call: the newest group, the buffered points, the slow-path threshold.

    `_rowbuffer.Lane` is the same state in C, with an `append` that handles the common call without Python;
    this one has none, so every call takes the Python path. Changed only under the streamer's lock.
    """

    __slots__ = ("group", "points", "slow_at", "unusable")

    def __init__(self, lock: object) -> None:
        self.group: RowGroup | None = None
        self.points = 0
        self.slow_at = 0
        self.unusable = False

    def commit(self, group: RowGroup, step: int, stamp: int, values: list[float]) -> None:
        """Append a row to `group`, make it the newest and count it (the C version does it in one call)."""
        added = len(values)  # no call after the append: an interrupt cannot come between the row and its count
        group.append(step, stamp, values)
        self.group = group
        self.points += added


class ColumnGroup:
    """One `log_series` call: numpy columns, taken by slicing; never appended to."""

    __slots__ = ("keys", "stamps", "steps", "values")

    def __init__(self, keys: tuple[str, ...], steps: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> None:
        self.keys = keys
        self.steps = steps  # int64, n
        self.stamps = stamps  # int64, n
        self.values = values  # float64, n x len(keys), row-major

    @property
    def rows(self) -> int:
        return int(self.steps.shape[0])

    def take(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        taken = self.steps[:rows], self.stamps[:rows], self.values[:rows]
        self.steps, self.stamps, self.values = self.steps[rows:], self.stamps[rows:], self.values[rows:]
        return taken


@dataclass(frozen=True)
class RowBlock:
    """Rows cut from one group into a batch (plain lists; the sender converts them off the caller's thread)."""

    keys: tuple[str, ...]
    steps: list[int] | np.ndarray
    stamps: list[int] | np.ndarray
    values: list[float] | np.ndarray  # row-major, flat (lists) or n x len(keys) (arrays)

    @property
    def points(self) -> int:
        return len(self.steps) * len(self.keys)


class MetricBuffer:
    """Points logged and not yet cut into a batch: row groups in logging order.

    A call whose keys match the newest group (the usual case) appends to it. Otherwise the call joins the
    group with its exact keys if no newer group holds any of them (so every key's points stay in logging
    order, e.g. a loop alternating `{"loss": ...}` and `{"lr": ...}` uses two groups), or starts a group.
    A call with more than `max_series` keys is split into rows of at most that many, so every row fits a batch.

    With the C module, `lane.append` does the usual case without this class (see `_rowbuffer.c`); `lock` is
    the lock under which every method here is called, which that fast path checks is free.
    """

    __slots__ = ("_by_keys", "_groups", "_newest_of", "_row_group", "lane", "max_series")

    def __init__(
        self, max_series: int = MAX_SERIES_PER_BATCH, *, lock: object | None = None, accelerated: bool = True
    ) -> None:
        self.max_series = max_series
        lock = threading.Lock() if lock is None else lock
        if accelerated and native is not None:
            self.lane: Lane = native.Lane(lock)
            self._row_group: type[RowGroup] = native.RowGroup
        else:
            self.lane = Lane(lock)
            self._row_group = RowGroup
        self._groups: list[RowGroup | ColumnGroup] = []
        self._by_keys: dict[tuple[str, ...], RowGroup] = {}
        self._newest_of: dict[str, RowGroup | ColumnGroup] = {}  # key -> the newest group holding it

    @property
    def points(self) -> int:
        return self.lane.points

    def append(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> int:
        """Append one point per key; all or nothing: a bad key or value raises InvalidArgument and adds none."""
        keys = tuple(mapping(metrics, "metrics"))
        lane = self.lane
        group = lane.group
        if group is None or group.keys != keys:
            if len(keys) > self.max_series:
                return self._append_wide(metrics, step, timestamp_ms)
            if not keys:
                return 0
            group = self._group_for(keys)
        try:
            values = list(map(as_float, metrics.values()))
        except (TypeError, ValueError, OverflowError) as exc:
            bad = next((k for k, v in metrics.items() if not _is_number(v)), None)
            named = f" ({bad!r}: {metrics[bad]!r})" if bad is not None else ""
            raise errors.InvalidArgument(
                f"metric values must be numbers{named}: {exc}",
                reason="INVALID_ARGUMENT",
                metadata={"field": "values" if bad is None else f"values[{bad}]"},
            ) from None
        added = len(values)
        if added != len(keys):  # the mapping changed while it was read (another thread)
            raise errors.InvalidArgument("metrics changed while being logged", reason="INVALID_ARGUMENT")
        lane.commit(group, step, timestamp_ms, values)  # the row and its count at once (see Lane.commit)
        return added

    def _append_wide(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> int:
        items = list(metrics.items())
        for key, value in items:  # validate everything first: all or nothing
            check_key(key)
            _as_float(key, value)
        done = 0
        for lo in range(0, len(items), self.max_series):
            done += self.append(dict(items[lo : lo + self.max_series]), step, timestamp_ms)
        return done

    def append_columns(self, keys: tuple[str, ...], steps: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> int:
        """Append validated columns (values: n x len(keys)) as their own group(s), after everything else."""
        for key in keys:
            check_key(key)
        if len(set(keys)) != len(keys):
            raise errors.InvalidArgument(f"metric keys repeat in one call: {keys}", reason="INVALID_ARGUMENT")
        if steps.shape[0] == 0 or not keys:
            return 0
        for lo in range(0, len(keys), self.max_series):
            part = keys[lo : lo + self.max_series]
            group = ColumnGroup(part, steps, stamps, np.ascontiguousarray(values[:, lo : lo + len(part)]))
            self._groups.append(group)
            for key in part:
                self._newest_of[key] = group  # later rows of these keys start a new row group
        self.lane.group = None
        added = int(values.size)
        self.lane.points += added
        return added

    def _group_for(self, keys: tuple[str, ...]) -> RowGroup:
        group = self._by_keys.get(keys)
        if group is not None and all(self._newest_of.get(k) is group for k in keys):
            return group
        for key in keys:
            check_key(key)
        if len(set(keys)) != len(keys):  # a Mapping with repeated keys (not a dict)
            raise errors.InvalidArgument(f"metric keys repeat in one call: {keys}", reason="INVALID_ARGUMENT")
        group = self._row_group(keys)
        self._groups.append(group)
        self._by_keys[keys] = group
        for key in keys:
            self._newest_of[key] = group
        return group

    def cut(self, max_points: int) -> tuple[list[RowBlock], int]:
        """Remove the oldest rows, about `max_points` points (at least one row) of at most `max_series` keys."""
        blocks: list[RowBlock] = []
        keys: set[str] = set()
        taken = 0
        while self._groups:
            group = self._groups[0]
            held = group.rows
            if not held:  # made for a call that was then refused (a bad value): holds nothing
                self._drop_oldest()
                continue
            k = len(group.keys)
            fresh = keys.union(group.keys)
            if blocks and len(fresh) > self.max_series:
                break
            rows = min(held, max((max_points - taken) // k, 0 if blocks else 1))
            if rows == 0:
                break
            block = _block(group.keys, *group.take(rows))
            blocks.append(block)
            keys = fresh
            taken += block.points
            if group.rows:
                break  # the group still has rows: the budget is used up
            self._drop_oldest()
        points = self.lane.points - taken
        if points and not self._groups:  # rows lost without their count (never expected: say so, and go on)
            _LOGGER.error("metric buffer counted %d points more than it held; count reset", points)
            points = 0  # else flush() would cut empty batches for ever
        self.lane.points = points
        return blocks, taken

    def _drop_oldest(self) -> None:
        group = self._groups.pop(0)
        if self._by_keys.get(group.keys) is group:
            del self._by_keys[group.keys]
        for key in group.keys:
            if self._newest_of.get(key) is group:
                del self._newest_of[key]
        if self.lane.group is group:
            self.lane.group = None


def _block(keys: tuple[str, ...], steps: Any, stamps: Any, values: Any) -> RowBlock:
    """A RowBlock from what a group's take() returned: lists, arrays, or the C groups' raw bytes."""
    if isinstance(steps, bytes):
        steps = np.frombuffer(steps, dtype=np.int64)
        stamps = np.frombuffer(stamps, dtype=np.int64)
        values = np.frombuffer(values, dtype=np.float64)
    return RowBlock(keys, steps, stamps, values)


def _as_float(key: str, value: Any) -> float:
    try:
        return as_float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.InvalidArgument(
            f"metric values must be numbers ({key!r}: {value!r}): {exc}",
            reason="INVALID_ARGUMENT",
            metadata={"field": f"values[{key}]"},
        ) from None


@dataclass(eq=False)
class PendingBatch:
    """A cut batch awaiting its acknowledgement; `message` is built once, on first send, and reused on re-sends."""

    seq: int
    series: list[RowBlock] | None
    points: int
    attempts: int = 0
    message: Any = None


class Outbox:
    """Cut batches by seq until acknowledged. Seqs are 0, 1, 2... in cut order; acks may come in any order."""

    __slots__ = ("batches", "next_seq", "points")

    def __init__(self, first_seq: int = 0) -> None:
        self.batches: dict[int, PendingBatch] = {}
        self.next_seq = first_seq
        self.points = 0

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, series: list[RowBlock], points: int) -> PendingBatch:
        batch = PendingBatch(self.next_seq, series, points)
        self.batches[batch.seq] = batch
        self.next_seq += 1
        self.points += points
        return batch

    def get(self, seq: int) -> PendingBatch | None:
        return self.batches.get(seq)

    def ack(self, seq: int) -> PendingBatch | None:
        """Forget an acknowledged batch; None when it is unknown or was acknowledged already."""
        batch = self.batches.pop(seq, None)
        if batch is not None:
            self.points -= batch.points
        return batch

    def first_unacked(self) -> int:
        """The lowest seq still awaiting its ack (dicts keep insertion order, which is seq order), else next_seq."""
        return next(iter(self.batches), self.next_seq)

    def pending(self) -> Iterable[PendingBatch]:
        return self.batches.values()
