"""Block-encoded MetricSeries are byte-identical to field-by-field ones and keep every bit of every value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runledger import wire
from runledger.v1 import tracking_pb2


@pytest.mark.parametrize(
    ("steps", "values", "stamps"),
    [
        ([], [], []),
        ([0], [0.5], [1]),
        ([-3, 2**62, 7], [math.nan, math.inf, -math.inf], [0, -1, 2**40]),
        (list(range(1000)), [1.0 / (i + 1) for i in range(1000)], [1_700_000_000_000 + i for i in range(1000)]),
    ],
)
def test_block_encoding_equals_field_by_field(steps, values, stamps) -> None:
    slow = tracking_pb2.MetricSeries(key="train/loss", steps=steps, values=values, timestamps_ms=stamps)
    fast = wire.series(
        "train/loss", np.array(steps, dtype=np.int64), np.array(values), np.array(stamps, dtype=np.int64)
    )
    assert fast.SerializeToString() == slow.SerializeToString()
    s, v, t = wire.arrays(fast)
    assert s.tolist() == steps and t.tolist() == stamps
    assert v.view(np.int64).tolist() == np.array(values, dtype=np.float64).view(np.int64).tolist()


def test_nan_payload_bits_survive() -> None:
    odd_nan = np.array([0x7FF8_0000_DEAD_BEEF], dtype=np.int64).view(np.float64)
    _, v, _ = wire.arrays(wire.series("k", np.array([1]), odd_nan, np.array([1])))
    assert v.view(np.int64)[0] == 0x7FF8_0000_DEAD_BEEF
