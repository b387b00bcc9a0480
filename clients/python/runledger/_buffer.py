"""Logged points until the server acknowledges them: row groups, batch cutting and the outbox (pure, no I/O)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runledger import errors
from runledger._convert import sendable

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
        float(value)
    except (TypeError, ValueError):
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
    appends; the sender turns the rows into per-key columns with numpy when it cuts a batch.
    """

    __slots__ = ("keys", "stamps", "steps", "values")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.steps: list[int] = []
        self.stamps: list[int] = []
        self.values: list[float] = []  # row-major: len(keys) values per row

    def take(self, rows: int) -> RowBlock:
        """Remove and return the oldest `rows` rows."""
        k = len(self.keys)
        if rows >= len(self.steps):
            block = RowBlock(self.keys, self.steps, self.stamps, self.values)
            self.steps, self.stamps, self.values = [], [], []
            return block
        block = RowBlock(self.keys, self.steps[:rows], self.stamps[:rows], self.values[: rows * k])
        del self.steps[:rows], self.stamps[:rows], self.values[: rows * k]
        return block


class ColumnGroup:
    """One `log_series` call: numpy columns, taken by slicing; never appended to."""

    __slots__ = ("keys", "stamps", "steps", "values")

    def __init__(self, keys: tuple[str, ...], steps: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> None:
        self.keys = keys
        self.steps = steps  # int64, n
        self.stamps = stamps  # int64, n
        self.values = values  # float64, n x len(keys), row-major

    def take(self, rows: int) -> RowBlock:
        block = RowBlock(self.keys, self.steps[:rows], self.stamps[:rows], self.values[:rows])
        self.steps, self.stamps, self.values = self.steps[rows:], self.stamps[rows:], self.values[rows:]
        return block


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
    """

    __slots__ = ("_by_keys", "_groups", "_last", "_newest_of", "max_series", "points")

    def __init__(self, max_series: int = MAX_SERIES_PER_BATCH) -> None:
        self.points = 0
        self.max_series = max_series
        self._groups: list[RowGroup | ColumnGroup] = []
        self._by_keys: dict[tuple[str, ...], RowGroup] = {}
        self._newest_of: dict[str, RowGroup | ColumnGroup] = {}  # key -> the newest group holding it
        self._last: RowGroup | None = None

    def append(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> int:
        """Append one point per key; all or nothing: a bad key or value raises InvalidArgument and adds none."""
        keys = tuple(metrics)
        group = self._last
        if group is None or group.keys != keys:
            if len(keys) > self.max_series:
                return self._append_wide(metrics, step, timestamp_ms)
            if not keys:
                return 0
            group = self._group_for(keys)
        values = group.values
        before = len(values)
        try:
            values.extend(map(float, metrics.values()))
        except BaseException as exc:  # all or nothing, even when interrupted (KeyboardInterrupt)
            del values[before:]
            if isinstance(exc, (TypeError, ValueError)):
                bad = next((k for k, v in metrics.items() if not _is_number(v)), None)
                named = f" ({bad!r}: {metrics[bad]!r})" if bad is not None else ""
                raise errors.InvalidArgument(
                    f"metric values must be numbers{named}: {exc}",
                    reason="INVALID_ARGUMENT",
                    metadata={"field": "values" if bad is None else f"values[{bad}]"},
                ) from None
            raise
        added = len(values) - before
        if added != len(keys):  # the mapping changed while it was read (another thread)
            del values[before:]
            raise errors.InvalidArgument("metrics changed while being logged", reason="INVALID_ARGUMENT")
        group.steps.append(step)
        group.stamps.append(timestamp_ms)
        self._last = group
        self.points += added
        return added

    def _append_wide(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> int:
        items = list(metrics.items())
        for key, value in items:  # validate everything first: all or nothing
            check_key(key)
            _as_float(value)
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
        self._last = None
        added = int(values.size)
        self.points += added
        return added

    def _group_for(self, keys: tuple[str, ...]) -> RowGroup:
        group = self._by_keys.get(keys)
        if group is not None and all(self._newest_of.get(k) is group for k in keys):
            return group
        for key in keys:
            check_key(key)
        if len(set(keys)) != len(keys):  # a Mapping with repeated keys (not a dict)
            raise errors.InvalidArgument(f"metric keys repeat in one call: {keys}", reason="INVALID_ARGUMENT")
        group = RowGroup(keys)
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
            if not len(group.steps):  # made for a call that was then refused (a bad value): holds nothing
                self._drop_oldest()
                continue
            k = len(group.keys)
            fresh = keys.union(group.keys)
            if blocks and len(fresh) > self.max_series:
                break
            rows = min(len(group.steps), max((max_points - taken) // k, 0 if blocks else 1))
            if rows == 0:
                break
            block = group.take(rows)
            blocks.append(block)
            keys = fresh
            taken += block.points
            if len(group.steps):
                break  # the group still has rows: the budget is used up
            self._drop_oldest()
        self.points -= taken
        return blocks, taken

    def _drop_oldest(self) -> None:
        group = self._groups.pop(0)
        if self._by_keys.get(group.keys) is group:
            del self._by_keys[group.keys]
        for key in group.keys:
            if self._newest_of.get(key) is group:
                del self._newest_of[key]
        if self._last is group:
            self._last = None


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(
            f"metric values must be numbers: {exc}", reason="INVALID_ARGUMENT", metadata={"field": "values"}
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
