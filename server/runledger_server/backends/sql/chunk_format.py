"""How a metric chunk's steps and timestamps are stored: compactly when they are regular.

A 1M-point history read is bound by the bytes SQLite hands back, so the two integer columns shrink
when they can, losslessly, and stay raw little-endian int64 otherwise (also every chunk written before
this format existed; migration 0004 marks databases that may hold the compact forms):

- steps: an empty blob when the chunk's steps are an arithmetic progression (min_step, min_step + d,
  ..., max_step with d > 0, or a single step); `count`, `min_step` and `max_step` restore them.
- timestamps_ms: `0x01`, an int64 base, then one int32 offset per point when every offset fits.
  That is 9 + 4 * count bytes, which never equals the raw form's 8 * count.
"""

from __future__ import annotations

import numpy as np

_I8 = np.dtype("<i8")
_I4 = np.dtype("<i4")
_OFFSETS = b"\x01"
_I4_MAX = int(np.iinfo(np.int32).max)
_I8_MAX = int(np.iinfo(np.int64).max)


def encode_steps(steps: np.ndarray) -> bytes:
    n = steps.shape[0]
    if n == 1:
        return b""
    if n > 1:
        first, stride = int(steps[0]), int(steps[1]) - int(steps[0])
        regular = stride > 0 and int(steps[-1]) == first + stride * (n - 1) and first + stride * n <= _I8_MAX
        if regular and np.array_equal(steps, np.arange(first, first + stride * n, stride, dtype=np.int64)):
            return b""
    return np.ascontiguousarray(steps, dtype=_I8).tobytes()


def decode_steps(blob: bytes, count: int, min_step: int, max_step: int) -> np.ndarray:
    if len(blob) == 8 * count:
        return np.frombuffer(blob, _I8)
    if blob or count < 1:
        raise ValueError(f"metric chunk steps: {len(blob)} bytes for {count} points")
    if count == 1:
        return np.array([min_step], dtype=np.int64)
    stride = (max_step - min_step) // (count - 1)
    steps = np.arange(min_step, min_step + stride * count, stride, dtype=np.int64) if stride > 0 else None
    if steps is None or steps.shape[0] != count or int(steps[-1]) != max_step:
        raise ValueError(f"metric chunk steps: {count} points cannot run from {min_step} to {max_step}")
    return steps


def encode_timestamps(stamps: np.ndarray) -> bytes:
    stamps = np.ascontiguousarray(stamps, dtype=_I8)
    if stamps.shape[0] < 3:  # the compact form is smaller from three points on
        return stamps.tobytes()
    base = int(stamps.min())
    if int(stamps.max()) - base <= _I4_MAX:
        return b"".join((_OFFSETS, np.int64(base).astype(_I8).tobytes(), (stamps - base).astype(_I4).tobytes()))
    return stamps.tobytes()


def decode_timestamps(blob: bytes, count: int) -> np.ndarray:
    if len(blob) == 8 * count:
        return np.frombuffer(blob, _I8)
    if len(blob) == 9 + 4 * count and blob[:1] == _OFFSETS:
        base = int(np.frombuffer(blob, _I8, 1, 1)[0])
        return np.frombuffer(blob, _I4, count, 9).astype(np.int64) + base
    raise ValueError(f"metric chunk timestamps: {len(blob)} bytes for {count} points")
