"""Block encoding of MetricSeries: arrays go onto the wire as one memory copy, not point by point.

Every array of a MetricSeries is fixed-width (sfixed64/double), so its packed protobuf encoding is
exactly the array's little-endian bytes behind a tag and a length. Building those bytes with numpy
and parsing them with `FromString` is an order of magnitude cheaper than assigning Python floats to
a repeated field one by one.
"""

from __future__ import annotations

import numpy as np

from runledger.v1 import tracking_pb2

_I8 = np.dtype("<i8")
_F8 = np.dtype("<f8")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _packed(field: int, data: bytes) -> bytes:
    if not data:
        return b""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def encode_series(key: str, steps: np.ndarray, values: np.ndarray, timestamps_ms: np.ndarray) -> bytes:
    """The serialized MetricSeries for these arrays (any int/float dtype; converted to 8-byte little-endian)."""
    k = key.encode()
    return b"".join(
        (
            _packed(1, k),
            _packed(2, np.ascontiguousarray(steps, dtype=_I8).tobytes()),
            _packed(3, np.ascontiguousarray(values, dtype=_F8).tobytes()),
            _packed(4, np.ascontiguousarray(timestamps_ms, dtype=_I8).tobytes()),
        )
    )


def series(key: str, steps: np.ndarray, values: np.ndarray, timestamps_ms: np.ndarray) -> tracking_pb2.MetricSeries:
    """A MetricSeries message built by block copy (same message as the slow field-by-field way)."""
    return tracking_pb2.MetricSeries.FromString(encode_series(key, steps, values, timestamps_ms))


def arrays(msg: tracking_pb2.MetricSeries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps int64, values float64, timestamps_ms int64) of a MetricSeries."""
    return (
        np.array(msg.steps, dtype=np.int64),
        np.array(msg.values, dtype=np.float64),
        np.array(msg.timestamps_ms, dtype=np.int64),
    )
