"""Compact metric-chunk columns: lossless for every input, compact only when regular, raw blobs still read."""

from __future__ import annotations

import numpy as np
import pytest

from runledger_server.backends.sql import chunk_format as cf

I64_MAX = np.iinfo(np.int64).max


@pytest.mark.parametrize(
    ("steps", "compact"),
    [
        ([7], True),
        (list(range(0, 4096)), True),
        (list(range(-50, 1000, 25)), True),
        ([0, 1, 2, 4], False),  # not a progression
        ([3, 2, 1], False),  # decreasing
        ([5, 5, 5], False),  # repeated step
        ([1, 2], True),
        ([I64_MAX - 2, I64_MAX - 1, I64_MAX], False),  # the next step would overflow int64: kept raw
        ([-(2**63), 0], False),
    ],
)
def test_steps_round_trip(steps: list[int], compact: bool) -> None:
    arr = np.array(steps, dtype=np.int64)
    blob = cf.encode_steps(arr)
    assert (blob == b"") == compact
    back = cf.decode_steps(blob, len(steps), int(arr.min()), int(arr.max()))
    assert back.dtype == np.int64 and back.tolist() == steps


def test_random_steps_round_trip() -> None:
    rng = np.random.default_rng(7)
    for _ in range(500):
        n = int(rng.integers(1, 50))
        arr = np.sort(rng.integers(-1000, 1000, n)) if rng.random() < 0.5 else np.arange(n) * int(rng.integers(1, 9))
        back = cf.decode_steps(cf.encode_steps(arr), n, int(arr.min()), int(arr.max()))
        assert back.tolist() == arr.tolist()


@pytest.mark.parametrize(
    ("stamps", "compact"),
    [
        ([1_700_000_000_000 + 10 * i for i in range(1000)], True),
        ([1_700_000_000_000] * 3, True),
        ([5, -5, 2**31 - 6], True),
        ([0, 2**31], False),  # an offset beyond int32
        ([-(2**63), 2**63 - 1], False),
        ([1, 2], False),  # too short to gain
        ([], False),
    ],
)
def test_timestamps_round_trip(stamps: list[int], compact: bool) -> None:
    arr = np.array(stamps, dtype=np.int64)
    blob = cf.encode_timestamps(arr)
    assert (len(blob) < 8 * len(stamps)) == compact
    assert len(blob) <= 8 * len(stamps)
    assert cf.decode_timestamps(blob, len(stamps)).tolist() == stamps


def test_raw_blobs_written_before_the_compact_format_still_read() -> None:
    steps = np.array([0, 1, 2, 3], dtype=np.int64)
    assert cf.decode_steps(steps.tobytes(), 4, 0, 3).tolist() == [0, 1, 2, 3]
    assert cf.decode_timestamps(steps.tobytes(), 4).tolist() == [0, 1, 2, 3]


def test_inconsistent_blobs_are_refused_not_misread() -> None:
    with pytest.raises(ValueError, match="steps"):
        cf.decode_steps(b"\x00" * 12, 2, 0, 1)
    with pytest.raises(ValueError, match="cannot run"):
        cf.decode_steps(b"", 3, 0, 3)  # 3 evenly spaced points cannot end at 3 from 0 with an integer stride
    with pytest.raises(ValueError, match="timestamps"):
        cf.decode_timestamps(b"\x02" + b"\x00" * 16, 2)
