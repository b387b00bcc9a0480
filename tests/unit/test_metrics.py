"""Metric batch validation and the min/max-preserving downsampler."""

from __future__ import annotations

import numpy as np
import pytest

from runledger_server.domain import metrics
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.metrics import (
    Batch,
    Series,
    downsample,
    holds_same_points,
    in_step_order,
    joined,
    validate_batch,
)


def _series(key: str, n: int, nv: int | None = None, nt: int | None = None) -> Series:
    return Series(
        key,
        np.arange(n, dtype=np.int64),
        np.zeros(n if nv is None else nv),
        np.zeros(n if nt is None else nt, dtype=np.int64),
    )


@pytest.mark.parametrize(
    ("run_id", "writer", "seq", "series", "field"),
    [
        ("", "w", 0, (), "run_id"),
        ("r1", "", 0, (), "writer_id"),
        ("r1", "w", -1, (), "seq"),
        ("r1", "w", 0, (_series("loss", 3, nv=2),), "series[loss]"),
        ("r1", "w", 0, (_series("loss", 3, nt=4),), "series[loss]"),
        ("r1", "w", 0, (_series("", 1),), "series.key"),
        ("r1", "w", 1 << 63, (), "seq"),  # stored as int64
        ("r1", "w", (1 << 63) - 1, (), "seq"),  # the writer's next seq would not fit in int64 (GetMetricWriter)
        ("r1", "w", 0, (_series("loss", 2), _series("kl", 1), _series("loss", 3)), "series.key"),  # one chunk per key
    ],
)
def test_validate_batch_refusals(run_id: str, writer: str, seq: int, series: tuple[Series, ...], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_batch(run_id, writer, seq, series)
    assert info.value.field == field


def test_validate_batch_counts_points() -> None:
    batch = validate_batch("r1", "rank0", 7, (_series("a", 3), _series("b", 5)))
    assert batch.points == 8 and batch.seq == 7


@pytest.mark.parametrize("n", [0, 1, 5, 100])
def test_downsample_keeps_everything_when_small(n: int) -> None:
    steps = np.arange(n)
    assert np.array_equal(downsample(steps, np.random.default_rng(0).normal(size=n), 100), np.arange(n))


@pytest.mark.parametrize(("n", "max_points"), [(1_000, 10), (10_000, 100), (100_001, 1_000), (50, 4)])
def test_downsample_keeps_ends_and_extremes(n: int, max_points: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.normal(size=n)
    lo, hi = int(rng.integers(1, n - 1)), int(rng.integers(1, n - 1))
    values[lo], values[hi] = -1e9, 1e9
    keep = downsample(np.arange(n), values, max_points)
    assert len(keep) <= max_points
    assert keep[0] == 0 and keep[-1] == n - 1 and np.all(np.diff(keep) > 0)
    assert lo in keep and hi in keep


def test_downsample_keeps_a_divergence() -> None:
    values = np.linspace(1, 0, 10_000)
    values[6000:] = np.nan
    keep = downsample(np.arange(10_000), values, 60)
    assert len(keep) <= 60 and np.isnan(values[keep]).any() and 0 in keep and 9_999 in keep


def chunk(steps: list[int], first_value: float = 0.0) -> Series:
    n = len(steps)
    return Series(
        "k", np.array(steps, dtype=np.int64), first_value + np.arange(n, dtype=np.float64), np.zeros(n, np.int64)
    )


def reference(chunks: list[Series], start: int | None, end: int | None) -> list[tuple[int, float]]:
    """The definition: every point in range, stable-sorted by step (ties keep logging order)."""
    points = [(int(s), float(v)) for c in chunks for s, v in zip(c.steps, c.values, strict=True)]
    points = [p for p in points if (start is None or p[0] >= start) and (end is None or p[0] <= end)]
    return sorted(points, key=lambda p: p[0])


def flat(pieces: list[Series]) -> list[tuple[int, float]]:
    whole = joined(pieces)
    return [(int(s), float(v)) for s, v in zip(whole.steps, whole.values, strict=True)]


def test_ordered_chunks_pass_through_uncopied() -> None:
    chunks = [chunk([0, 1, 2]), chunk([2, 3], 10.0), chunk([7, 9], 20.0)]
    pieces = in_step_order(chunks, None, None)
    assert all(p is c for p, c in zip(pieces, chunks, strict=True))
    assert flat(pieces) == reference(chunks, None, None)


def test_range_cuts_chunks_and_drops_empty_ones() -> None:
    chunks = [chunk([0, 1, 2]), chunk([3, 4, 5], 10.0), chunk([6, 7], 20.0)]
    pieces = in_step_order(chunks, 2, 4)
    assert flat(pieces) == [(2, 2.0), (3, 10.0), (4, 11.0)]
    assert len(pieces) == 2


def test_random_chunks_match_the_stable_sort_definition() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        chunks = []
        base = 0
        for i in range(int(rng.integers(0, 6))):
            n = int(rng.integers(0, 5))
            if rng.random() < 0.6:  # mostly increasing, sometimes overlapping or out of order
                steps = sorted(int(x) for x in base + rng.integers(-3, 8, n))
            else:
                steps = [int(x) for x in rng.integers(0, 20, n)]
            base += 5
            chunks.append(chunk(steps, 100.0 * i))
        start = None if rng.random() < 0.5 else int(rng.integers(0, 15))
        end = None if rng.random() < 0.5 else int(rng.integers(0, 25))
        assert flat(in_step_order(chunks, start, end)) == reference(chunks, start, end)


def _batch(*series: tuple[str, list[int], list[float], list[int]], dtype: str = "<f8") -> metrics.Batch:
    return metrics.Batch(
        "r1",
        "w",
        0,
        tuple(
            metrics.Series(key, np.array(steps, ">i8"), np.array(values, dtype), np.array(stamps, "<i8"))
            for key, steps, values, stamps in series
        ),
    )


def test_a_batch_checksum_depends_on_its_points_not_their_encoding() -> None:
    base = _batch(("loss", [1, 2], [0.5, float("nan")], [10, 20]), ("kl", [1], [0.1], [10]))
    same = _batch(("loss", [1, 2], [0.5, float("nan")], [10, 20]), ("kl", [1], [0.1], [10]), dtype=">f8")
    assert base.checksum() == same.checksum()  # byte order of the arrays does not matter, only the numbers
    others = [
        _batch(("loss", [1, 2], [0.5, 0.25], [10, 20]), ("kl", [1], [0.1], [10])),  # a value
        _batch(("loss", [1, 3], [0.5, float("nan")], [10, 20]), ("kl", [1], [0.1], [10])),  # a step
        _batch(("loss", [1, 2], [0.5, float("nan")], [10, 21]), ("kl", [1], [0.1], [10])),  # a timestamp
        _batch(("loss", [1, 2], [0.5, float("nan")], [10, 20]), ("kL", [1], [0.1], [10])),  # a key
        _batch(("kl", [1], [0.1], [10]), ("loss", [1, 2], [0.5, float("nan")], [10, 20])),  # the order of keys
        _batch(("loss", [1, 2], [-0.0, float("nan")], [10, 20]), ("kl", [1], [0.1], [10])),  # -0.0 is not 0.0
    ]
    zero = _batch(("loss", [1, 2], [0.0, float("nan")], [10, 20]), ("kl", [1], [0.1], [10]))
    assert len({b.checksum() for b in [base, *others, zero]}) == len(others) + 2


def test_a_resumed_writer_continues_its_drawn_number_of_gaps_past_its_highest_stored_batch() -> None:
    gap, slots = metrics.RESUME_GAP, metrics.RESUME_SLOTS
    assert metrics.resume_seq(None, 1) == gap  # none stored: an earlier incarnation may have some in flight
    assert metrics.resume_seq(7, 1) == 8 + gap
    assert metrics.resume_seq(7, slots) == 8 + slots * gap
    top = metrics.MAX_SEQ - 1  # the highest seq a batch may take
    assert metrics.resume_seq(top - 2 * gap, 2) == top - gap + 1  # two gaps do not fit: one does
    assert metrics.resume_seq(top - gap - 1, slots) == top  # the last one with room for a gap
    assert metrics.resume_seq(top, 5) == top + 1 == metrics.MAX_SEQ  # no room for any: right after, in int64
    for slot in (0, slots + 1):
        with pytest.raises(ValueError):
            metrics.resume_seq(7, slot)


def test_a_batch_stored_without_a_checksum_is_compared_point_for_point() -> None:
    def series(key: str, values: list[float]) -> Series:
        n = len(values)
        return Series(key, np.arange(n, dtype=np.int64), np.array(values, dtype=np.float64), np.zeros(n, np.int64))

    stored = {"loss": series("loss", [float("nan"), -0.0]), "kl": series("kl", [1.0])}
    batch = Batch("r", "w", 0, (series("kl", [1.0]), series("empty", []), series("loss", [float("nan"), -0.0])))
    assert holds_same_points(batch, stored)  # order and keys without points do not matter
    other_nan = np.array([float("nan"), -0.0]).view(np.int64)
    other_nan[0] ^= 1  # another NaN payload: other bits, other points
    for changed in (
        Batch("r", "w", 0, (series("kl", [1.0]), series("loss", [float("nan"), 0.0]))),  # -0.0 is not 0.0 here
        Batch("r", "w", 0, (series("kl", [1.0]), series("loss", list(other_nan.view(np.float64))))),
        Batch("r", "w", 0, (series("kl", [1.0]),)),  # a key missing
        Batch("r", "w", 0, (series("kl", [1.0]), series("loss", [float("nan"), -0.0]), series("x", [2.0]))),
    ):
        assert not holds_same_points(changed, stored)
