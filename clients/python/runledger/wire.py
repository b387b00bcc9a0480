"""Block encoding of MetricSeries: arrays go onto the wire as one memory copy, not point by point.

Every array of a MetricSeries is fixed-width (sfixed64/double), so its packed protobuf encoding is
exactly the array's little-endian bytes behind a tag and a length. Building those bytes with numpy
and parsing them with `FromString` is an order of magnitude cheaper than assigning Python floats to
a repeated field one by one. `decode_series` goes the other way without protobuf objects at all: the
arrays it returns are views of the received message bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

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


def length_delimited(field: int, data: bytes) -> bytes:
    """One length-delimited field (bytes, string, embedded message, packed array), even when empty."""
    return field_header(field, len(data)) + data


def varint_field(field: int, value: int) -> bytes:
    """One varint field (a non-negative integer); empty for 0, as protobuf writes proto3 defaults."""
    return _varint(field << 3) + _varint(value) if value else b""


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


def encode_series_parts(key: str, steps: Sequence[Any], values: Sequence[Any], timestamps_ms: Sequence[Any]) -> bytes:
    """The serialized MetricSeries whose arrays are the concatenation of the given parts.

    Parts are little-endian 8-byte arrays or buffers (int64 steps and timestamps, float64 values), e.g.
    stored chunks read from the database: they are copied once, into the message.
    """
    return b"".join(series_pieces(key, steps, values, timestamps_ms)[0])


def series_pieces(
    key: str, steps: Sequence[Any], values: Sequence[Any], timestamps_ms: Sequence[Any]
) -> tuple[list[Any], int]:
    """The serialized MetricSeries of `encode_series_parts` as pieces to join, and its length in bytes:
    for embedding it in a larger message with a single copy of the arrays."""
    sizes = [sum(memoryview(p).nbytes for p in parts) for parts in (steps, values, timestamps_ms)]
    if len(set(sizes)) != 1 or sizes[0] % 8:
        raise ValueError(f"steps, values and timestamps_ms must hold the same number of 8-byte items: {sizes} bytes")
    k = key.encode()
    pieces: list[Any] = [_packed(1, k)] if k else []
    if sizes[0]:
        for field, parts in ((2, steps), (3, values), (4, timestamps_ms)):
            pieces.append(_varint(field << 3 | 2) + _varint(sizes[0]))
            pieces.extend(parts)
    return pieces, sum(memoryview(p).nbytes for p in pieces)


def field_header(field: int, length: int) -> bytes:
    """The tag and length that precede a length-delimited field of `length` bytes."""
    return _varint(field << 3 | 2) + _varint(length)


# Initial metadata of a GetMetricHistory call: the number of points its messages hold in all, so that a
# reader can place each message's points straight into arrays of the final size (older servers omit it).
HISTORY_POINTS_KEY = "x-runledger-history-points"


class SeriesArrays(NamedTuple):
    """A decoded MetricSeries: read-only numpy views of the message bytes."""

    key: str
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    timestamps_ms: np.ndarray  # int64


_ARRAY_FIELDS = {2: _I8, 3: _F8, 4: _I8}


def decode_series(data: bytes | memoryview, *, equal_lengths: bool = True) -> SeriesArrays:
    """Parse a serialized MetricSeries into numpy views of `data`: no protobuf objects, no copy.

    Accepts everything a protobuf parser would: packed or unpacked arrays, repeated occurrences of a
    field (concatenated), and unknown fields (skipped), so messages from any conforming sender decode.
    Arrays of unequal lengths raise ValueError unless `equal_lengths` is False (the caller checks them).
    """
    view = memoryview(data)
    key = ""
    parts: dict[int, list[np.ndarray]] = {2: [], 3: [], 4: []}
    for field, kind, pos, size in _fields(view, "MetricSeries"):
        if kind == 2:
            if field == 1:
                key = bytes(view[pos : pos + size]).decode()
            elif field in _ARRAY_FIELDS:
                if size % 8:
                    raise ValueError(f"malformed MetricSeries: field {field} holds {size} bytes, not 8-byte items")
                parts[field].append(np.frombuffer(data, _ARRAY_FIELDS[field], size // 8, pos))
        elif kind == 1 and field in _ARRAY_FIELDS:
            parts[field].append(np.frombuffer(data, _ARRAY_FIELDS[field], 1, pos))
    steps, values, stamps = (_joined(parts[f], _ARRAY_FIELDS[f]) for f in (2, 3, 4))
    if equal_lengths and not steps.shape[0] == values.shape[0] == stamps.shape[0]:
        raise ValueError(
            f"malformed MetricSeries: {steps.shape[0]} steps, {values.shape[0]} values, {stamps.shape[0]} timestamps"
        )
    return SeriesArrays(key, steps, values, stamps)


class MetricsBatch(NamedTuple):
    """A decoded StreamMetricsRequest or LogMetricsRequest (the same fields): its series as numpy views."""

    run_id: str
    writer_id: str
    seq: int
    series: list[SeriesArrays]
    nbytes: int = 0  # the whole message, which the series' views keep alive


def decode_metrics_batch(data: bytes | memoryview) -> MetricsBatch:
    """Parse a serialized StreamMetricsRequest (or LogMetricsRequest) without protobuf objects.

    Like a protobuf parser: the last occurrence of a singular field wins, unknown fields and fields of an
    unexpected wire type are skipped, strings must be UTF-8; a truncated message raises ValueError. A series
    whose arrays differ in length is returned as it is, for the receiver to refuse with its own message.
    """
    view = memoryview(data)
    run_id = writer_id = ""
    seq = 0
    series: list[SeriesArrays] = []
    for field, kind, pos, size in _fields(view, "metrics batch"):
        if kind == 2:
            if field == 1:
                run_id = bytes(view[pos : pos + size]).decode()
            elif field == 2:
                writer_id = bytes(view[pos : pos + size]).decode()
            elif field == 4:
                series.append(decode_series(view[pos : pos + size], equal_lengths=False))
        elif kind == 0 and field == 3:
            seq = size - (1 << 64) if size >= 1 << 63 else size  # int64 is two's complement on the wire
    return MetricsBatch(run_id, writer_id, seq, series, view.nbytes)


def _fields(view: memoryview, what: str) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, position, size) of each field of a serialized message, checked against its end;
    for a varint field the last item is its value instead of a size."""
    end = len(view)
    pos = 0
    while pos < end:
        start = pos
        tag, pos = _read_varint(view, pos, what)
        field, kind = tag >> 3, tag & 7
        if field == 0 or tag >> 32 or pos - start > 5:  # as protobuf: no field 0, a tag fits 32 bits in 5 bytes
            raise ValueError(f"malformed {what}: invalid field tag {tag}")
        if kind == 0:
            value, pos = _read_varint(view, pos, what)
            yield field, kind, pos, value
            continue
        if kind == 2:
            size, pos = _read_varint(view, pos, what)
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
        else:
            raise ValueError(f"malformed {what}: unsupported wire type {kind} for field {field}")
        if pos + size > end:
            raise ValueError(f"truncated {what}: field {field} runs past the end of the message")
        yield field, kind, pos, size
        pos += size


def _read_varint(view: memoryview, pos: int, what: str = "MetricSeries") -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError(f"malformed {what}: bad varint")
        b = view[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _joined(parts: list[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


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
