"""Metric batch validation and the min/max-preserving downsampler."""

from __future__ import annotations

import numpy as np
import pytest

from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.metrics import Series, downsample, validate_batch


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
