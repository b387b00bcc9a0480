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


CASES = [
    ([], [], []),
    ([0], [0.5], [1]),
    ([-3, 2**62, 7], [math.nan, math.inf, -math.inf], [0, -1, 2**40]),
    (list(range(1000)), [1.0 / (i + 1) for i in range(1000)], [1_700_000_000_000 + i for i in range(1000)]),
]


def bits(values: np.ndarray) -> list[int]:
    return np.asarray(values, dtype=np.float64).view(np.int64).tolist()


@pytest.mark.parametrize(("steps", "values", "stamps"), CASES)
def test_decode_series_agrees_with_protobuf(steps, values, stamps) -> None:
    data = tracking_pb2.MetricSeries(
        key="train/kl", steps=steps, values=values, timestamps_ms=stamps
    ).SerializeToString()
    got = wire.decode_series(data)
    assert got.key == "train/kl"
    assert got.steps.tolist() == steps and got.timestamps_ms.tolist() == stamps
    assert bits(got.values) == bits(np.array(values, dtype=np.float64))


@pytest.mark.parametrize(("steps", "values", "stamps"), CASES)
def test_parts_encoding_equals_whole_array_encoding(steps, values, stamps) -> None:
    s, v, t = np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64), np.array(stamps, dtype=np.int64)
    cut = len(steps) // 3
    parts = wire.encode_series_parts("k", [s[:cut], s[cut:]], [v[:cut], v[cut:]], [t[:cut].tobytes(), t[cut:]])
    assert parts == wire.encode_series("k", s, v, t)


def test_parts_of_unequal_length_are_refused() -> None:
    with pytest.raises(ValueError, match="same number"):
        wire.encode_series_parts("k", [np.arange(3)], [np.zeros(2)], [np.arange(3)])


def test_decode_accepts_unpacked_fields_repeated_blocks_and_unknown_fields() -> None:
    def varint(n: int) -> bytes:
        return wire._varint(n)

    i8 = lambda *xs: np.array(xs, dtype="<i8").tobytes()  # noqa: E731
    f8 = lambda *xs: np.array(xs, dtype="<f8").tobytes()  # noqa: E731
    data = b"".join(
        [
            varint(1 << 3 | 2) + varint(1) + b"k",
            varint(2 << 3 | 1) + i8(5),  # one unpacked step
            varint(2 << 3 | 2) + varint(16) + i8(6, 7),  # then a packed block
            varint(3 << 3 | 2) + varint(24) + f8(0.5, 1.5, 2.5),
            varint(99 << 3 | 0) + varint(300),  # unknown varint field
            varint(98 << 3 | 2) + varint(3) + b"xyz",  # unknown bytes field
            varint(4 << 3 | 2) + varint(24) + i8(1, 2, 3),
        ]
    )
    assert tracking_pb2.MetricSeries.FromString(data).steps == [5, 6, 7]
    got = wire.decode_series(data)
    assert (got.key, got.steps.tolist(), got.values.tolist(), got.timestamps_ms.tolist()) == (
        "k",
        [5, 6, 7],
        [0.5, 1.5, 2.5],
        [1, 2, 3],
    )


@pytest.mark.parametrize("cut", [1, 5, 20, 40])
def test_truncated_or_inconsistent_messages_are_refused(cut: int) -> None:
    data = wire.encode_series("k", np.arange(3), np.zeros(3), np.arange(3))
    with pytest.raises(ValueError, match="MetricSeries"):
        wire.decode_series(data[:cut])
    lopsided = tracking_pb2.MetricSeries(key="k", steps=[1, 2], values=[1.0], timestamps_ms=[1, 2])
    with pytest.raises(ValueError, match="2 steps, 1 values"):
        wire.decode_series(lopsided.SerializeToString())


def test_the_senders_request_bytes_equal_protobufs_serialization() -> None:
    """`build_request` hands gRPC its own bytes; they must be exactly the message protobuf would write."""
    from runledger._buffer import RowBlock
    from runledger._streamer import build_request
    from runledger.v1 import tracking_service_pb2

    blocks = [
        RowBlock(("loss", "reward"), [0, 1], [10, 11], [0.5, 1.0, math.nan, -0.0]),
        RowBlock(("loss",), np.array([2, 3]), np.array([12, 13]), np.array([[0.25], [math.inf]])),
    ]
    got = build_request("run-1", "w-1", 7, blocks)
    want = tracking_service_pb2.StreamMetricsRequest(
        run_id="run-1",
        writer_id="w-1",
        seq=7,
        series=[
            tracking_pb2.MetricSeries(
                key="loss", steps=[0, 1, 2, 3], values=[0.5, math.nan, 0.25, math.inf], timestamps_ms=[10, 11, 12, 13]
            ),
            tracking_pb2.MetricSeries(key="reward", steps=[0, 1], values=[1.0, -0.0], timestamps_ms=[10, 11]),
        ],
    )
    assert got == want.SerializeToString()
    assert (
        build_request("run-1", "w-1", 0, [])
        == tracking_service_pb2.StreamMetricsRequest(run_id="run-1", writer_id="w-1").SerializeToString()
    )


def test_metrics_batch_decoding_agrees_with_protobuf() -> None:
    from runledger.v1 import tracking_service_pb2

    rng = np.random.default_rng(7)
    for seq in (0, 1, 2**40, -5):
        msg = tracking_service_pb2.StreamMetricsRequest(
            run_id="run-ü", writer_id="rank-3", seq=seq, series=[tracking_pb2.MetricSeries(key="empty")]
        )
        for key in ("loss", "rl/kl"):
            n = int(rng.integers(1, 50))
            msg.series.add(key=key, steps=list(range(n)), values=rng.normal(size=n).tolist(), timestamps_ms=[7] * n)
        data = msg.SerializeToString()
        got = wire.decode_metrics_batch(data)
        assert (got.run_id, got.writer_id, got.seq) == (msg.run_id, msg.writer_id, msg.seq)
        assert [s.key for s in got.series] == [s.key for s in msg.series]
        for g, m in zip(got.series, msg.series, strict=True):
            assert g.steps.tolist() == list(m.steps) and g.timestamps_ms.tolist() == list(m.timestamps_ms)
            assert bits(g.values) == bits(np.array(m.values, dtype=np.float64))
        # Unknown fields are skipped and a repeated singular field's last value wins, as protobuf does.
        extra = (
            data
            + wire.length_delimited(9, b"future")
            + wire.length_delimited(2, b"rank-4")
            + bytes([5 << 3 | 5])
            + b"\0" * 4
        )
        parsed = tracking_service_pb2.StreamMetricsRequest.FromString(extra)
        again = wire.decode_metrics_batch(extra)
        assert (again.writer_id, again.seq, len(again.series)) == (parsed.writer_id, parsed.seq, len(parsed.series))


def test_metrics_batch_keeps_unequal_arrays_for_the_receiver_and_refuses_truncation() -> None:
    from runledger.v1 import tracking_service_pb2

    msg = tracking_service_pb2.StreamMetricsRequest(
        run_id="r", writer_id="w", seq=1, series=[tracking_pb2.MetricSeries(key="k", steps=[1, 2], values=[0.5])]
    )
    data = msg.SerializeToString()
    got = wire.decode_metrics_batch(data)
    assert (len(got.series[0].steps), len(got.series[0].values)) == (2, 1)  # the server refuses it by name
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            wire.decode_metrics_batch(data[:cut])
    with pytest.raises(ValueError):  # strings are UTF-8, as protobuf requires
        wire.decode_metrics_batch(wire.length_delimited(1, b"\xff\xfe"))


@pytest.mark.parametrize(
    "tail",
    [
        b"\x00\x05",  # field number 0
        b"\x80\x80\x80\x80\x80\x08\x01",  # a tag in six bytes
        b"\x80\x80\x80\x80\x10\x01",  # a field number beyond 2^29 (the tag beyond 32 bits)
    ],
    ids=["field-zero", "six-byte-tag", "field-beyond-2^29"],
)
def test_the_batch_decoder_refuses_tags_protobuf_refuses(tail: bytes) -> None:
    """It parses like protobuf: what protobuf calls corrupt is refused here too, not skipped as unknown."""
    from google.protobuf.message import DecodeError

    from runledger.v1 import tracking_service_pb2

    good = tracking_service_pb2.StreamMetricsRequest(run_id="r", writer_id="w", seq=1).SerializeToString()
    wire.decode_metrics_batch(good)
    with pytest.raises(DecodeError):
        tracking_service_pb2.StreamMetricsRequest.FromString(good + tail)
    with pytest.raises(ValueError, match=r"invalid field tag|bad varint"):
        wire.decode_metrics_batch(good + tail)
