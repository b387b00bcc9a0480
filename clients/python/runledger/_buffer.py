"""Logged points until the server acknowledges them: per-key columns, batch cutting and the outbox (pure, no I/O)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runledger import errors

_LOGGER = logging.getLogger(__name__)

MAX_KEY_LENGTH = 250
MAX_SERIES_PER_BATCH = 10_000  # the server refuses batches with more series
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# One key's points inside a batch: key, steps, values, timestamps_ms.
SeriesData = tuple[str, list[int], list[float], list[int]]


def check_key(key: object) -> str:
    """The server's rule for a metric key, checked once per key so a bad key fails in the caller's hands."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or "\x00" in key or key.strip() != key:
        raise errors.InvalidArgument(
            f"metric key {key!r} is not valid (a string of 1-{MAX_KEY_LENGTH} characters, no NUL, "
            "no surrounding spaces)",
            reason="INVALID_ARGUMENT",
            metadata={"field": "series.key"},
        )
    return key


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
        if self.max_points < 1 or self.max_delay <= 0:
            raise ValueError("BatchPolicy needs max_points >= 1 and max_delay > 0")

    def due(self, buffered: int, since_last_cut: float, *, force: bool = False) -> bool:
        if buffered <= 0:
            return False
        return force or buffered >= self.max_points or since_last_cut >= self.max_delay


class MetricBuffer:
    """Points logged and not yet cut into a batch: per key one flat list of (step, value, timestamp_ms) triples.

    One `list.extend` of a 3-tuple per point is the cheapest append CPython offers the training thread;
    the sender splits the triples into columns with slicing when it cuts a batch.
    """

    __slots__ = ("columns", "points")

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {}
        self.points = 0

    def append(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> int:
        """Append one point per key; all or nothing: a bad key or value raises InvalidArgument and adds none."""
        columns = self.columns
        done = 0
        try:
            for key, value in metrics.items():
                col = columns.get(key)
                if col is None:
                    col = columns[check_key(key)] = []
                col.extend((step, float(value), timestamp_ms))
                done += 1
        except BaseException as exc:  # all or nothing, even when interrupted (KeyboardInterrupt)
            self._rollback(metrics, done)
            if isinstance(exc, (TypeError, ValueError)):
                raise errors.InvalidArgument(
                    f"metric values must be numbers: {exc}", reason="INVALID_ARGUMENT", metadata={"field": "values"}
                ) from None
            raise
        self.points += done
        return done

    def _rollback(self, metrics: Mapping[str, Any], done: int) -> None:
        for i, key in enumerate(metrics):
            if i >= done:
                break
            del self.columns[key][-3:]

    def cut(self, max_points: int, max_series: int = MAX_SERIES_PER_BATCH) -> tuple[list[SeriesData], int]:
        """Remove about `max_points` points (every key's oldest first) and return them with their count.

        When more is buffered than fits, each key gives a share proportional to what it holds (at least one
        point), so no key starves behind busier ones; a key's points keep their order.
        """
        if self.points == 0:
            return [], 0
        nonempty = [(key, col) for key, col in self.columns.items() if col]
        if len(nonempty) > max_series:
            nonempty = nonempty[:max_series]
            total = sum(len(col) for _, col in nonempty) // 3
        else:
            total = self.points
        series: list[SeriesData] = []
        taken = 0
        for key, col in nonempty:
            n = len(col) // 3
            share = n if total <= max_points else max(1, n * max_points // total)
            if share >= n:
                flat = col
                self.columns[key] = []
            else:
                flat = col[: 3 * share]
                del col[: 3 * share]
            series.append((key, flat[0::3], flat[1::3], flat[2::3]))
            taken += share if share < n else n
        self.points -= taken
        return series, taken


@dataclass(eq=False)
class PendingBatch:
    """A cut batch awaiting its acknowledgement; `message` is built once, on first send, and reused on re-sends."""

    seq: int
    series: list[SeriesData] | None
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

    def add(self, series: list[SeriesData], points: int) -> PendingBatch:
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
