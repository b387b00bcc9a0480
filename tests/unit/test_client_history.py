"""Assembling a metric history from GetMetricHistory's messages: the result holds exactly the points the
messages carry, in their order, whatever number the server announced."""

from __future__ import annotations

import numpy as np
import pytest

from runledger import history, wire


def chunks(sizes: list[int]) -> tuple[list[wire.SeriesArrays], np.ndarray]:
    """Decoded messages of the given sizes (read-only views, as received) and all their steps in order."""
    out, start = [], 0
    for n in sizes:
        steps = np.arange(start, start + n, dtype=np.int64)
        message = wire.encode_series("k", steps, steps * 0.5, steps + 1_700_000_000_000)
        out.append(wire.decode_series(message))
        start += n
    return out, np.arange(start, dtype=np.int64)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([3, 0, 5], 8),  # as announced
        ([3, 5, 7], 4),  # more than announced: the arrays grow
        ([3, 5], 100),  # fewer: cut to what arrived
        ([], 0),
        ([2, 2], 0),
        ([6], -1),  # a nonsensical count is treated as none
    ],
)
def test_into_place_holds_exactly_the_points_received(sizes: list[int], expected: int) -> None:
    parts, steps = chunks(sizes)
    got = history.into_place(parts, expected)
    assert np.array_equal(got.steps, steps)
    assert np.array_equal(got.values, steps * 0.5)
    assert np.array_equal(got.timestamps_ms, steps + 1_700_000_000_000)
    for a, dtype in zip(got, (np.int64, np.float64, np.int64), strict=True):
        assert a.dtype == dtype and a.flags.writeable and a.flags.owndata and a.base is None


def test_the_announced_count_is_read_from_the_metadata_and_a_malformed_one_ignored() -> None:
    key = wire.HISTORY_POINTS_KEY
    assert history._announced_points(((key, "1000000"),)) == 1_000_000
    assert history._announced_points((("other", "5"), (key, "0"))) == 0
    for metadata in [(), None, ((key, "many"),), ((key, "-3"),), (("other", "5"),)]:
        assert history._announced_points(metadata) is None


def test_a_huge_announced_count_is_not_allocated_up_front() -> None:
    parts, steps = chunks([10])
    got = history.into_place(parts, 1 << 62)
    assert np.array_equal(got.steps, steps)
