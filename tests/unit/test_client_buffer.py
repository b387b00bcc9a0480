"""The client's pure buffering: per-key columns, batch cutting, the cut policy and the outbox of unacked batches."""

from __future__ import annotations

import math

import pytest

from runledger import errors
from runledger._buffer import BatchPolicy, MetricBuffer, Outbox


def _fill(buffer: MetricBuffer, rows: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in rows:
        buffer.append(metrics, step, 1_000 + step)


def _points(series: list[tuple[str, list[int], list[float], list[int]]]) -> dict[str, list[tuple[int, float, int]]]:
    return {key: list(zip(steps, values, stamps, strict=True)) for key, steps, values, stamps in series}


def test_append_keeps_columns_per_key_in_logging_order() -> None:
    buffer = MetricBuffer()
    _fill(buffer, [(0, {"loss": 1.0, "kl": 0.1}), (1, {"loss": 0.9}), (2, {"kl": 0.3, "loss": 0.8})])
    assert buffer.points == 5
    series, taken = buffer.cut(100)
    assert taken == 5 and buffer.points == 0
    assert _points(series) == {
        "loss": [(0, 1.0, 1000), (1, 0.9, 1001), (2, 0.8, 1002)],
        "kl": [(0, 0.1, 1000), (2, 0.3, 1002)],
    }
    assert buffer.cut(100) == ([], 0)


def test_nan_and_infinities_and_numeric_types_go_through_as_floats() -> None:
    import numpy as np

    buffer = MetricBuffer()
    buffer.append({"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(0.5), "e": 3, "f": True}, 7, 0)
    (series, _) = buffer.cut(100)
    values = {key: v[0] for key, _, v, _ in series}
    assert math.isnan(values["a"]) and values["b"] == math.inf and values["c"] == -math.inf
    assert values["d"] == 0.5 and values["e"] == 3.0 and values["f"] == 1.0
    assert all(type(v) is float for v in values.values())


@pytest.mark.parametrize(
    ("metrics", "reason_fragment"),
    [
        ({"ok": 1.0, "bad": "not a number"}, "must be numbers"),
        ({"ok": 1.0, "bad": None}, "must be numbers"),
        ({"ok": 1.0, "": 1.0}, "not valid"),
        ({"ok": 1.0, " padded": 1.0}, "not valid"),
        ({"ok": 1.0, "nul\x00": 1.0}, "not valid"),
        ({"ok": 1.0, "k" * 251: 1.0}, "not valid"),
        ({"ok": 1.0, 5: 1.0}, "not valid"),
    ],
)
def test_a_bad_key_or_value_adds_nothing(metrics: dict, reason_fragment: str) -> None:
    buffer = MetricBuffer()
    buffer.append({"ok": 0.5}, 0, 0)
    with pytest.raises(errors.InvalidArgument, match=reason_fragment):
        buffer.append(metrics, 1, 0)
    assert buffer.points == 1
    series, taken = buffer.cut(100)
    assert taken == 1 and _points(series) == {"ok": [(0, 0.5, 0)]}


@pytest.mark.parametrize(
    ("per_key", "max_points", "expected_first_cut"),
    [
        # everything fits: one cut takes all
        ({"a": 3, "b": 2}, 10, {"a": 3, "b": 2}),
        # exactly the budget
        ({"a": 5, "b": 5}, 10, {"a": 5, "b": 5}),
        # over budget: proportional shares, keys keep their oldest points first
        ({"a": 10, "b": 10}, 10, {"a": 5, "b": 5}),
        ({"a": 30, "b": 10}, 20, {"a": 15, "b": 5}),
        # a tiny key still gets at least one point: no starvation behind a busy key
        ({"a": 1000, "b": 1}, 10, {"a": 9, "b": 1}),
        # budget of one point per cut
        ({"a": 3}, 1, {"a": 1}),
    ],
)
def test_cut_takes_proportional_prefixes(
    per_key: dict[str, int], max_points: int, expected_first_cut: dict[str, int]
) -> None:
    buffer = MetricBuffer()
    for key, n in per_key.items():
        for step in range(n):
            buffer.append({key: float(step)}, step, 0)
    total = sum(per_key.values())
    series, taken = buffer.cut(max_points)
    got = {key: steps for key, steps, _, _ in series}
    assert {k: len(v) for k, v in got.items()} == expected_first_cut
    assert all(v == list(range(len(v))) for v in got.values())  # oldest points first, in order
    assert taken == sum(expected_first_cut.values()) and buffer.points == total - taken
    # draining the rest yields every remaining point exactly once, in order per key
    seen = {k: list(v) for k, v in got.items()}
    while buffer.points:
        more, _ = buffer.cut(max_points)
        for key, steps, _, _ in more:
            seen.setdefault(key, []).extend(steps)
    assert seen == {k: list(range(n)) for k, n in per_key.items()}


def test_cut_limits_series_per_batch() -> None:
    buffer = MetricBuffer()
    buffer.append({f"k{i}": 1.0 for i in range(5)}, 0, 0)
    series, taken = buffer.cut(100, max_series=2)
    assert [s[0] for s in series] == ["k0", "k1"] and taken == 2 and buffer.points == 3
    series, taken = buffer.cut(100, max_series=2)
    assert [s[0] for s in series] == ["k2", "k3"]


@pytest.mark.parametrize(
    ("buffered", "since_last_cut", "force", "due"),
    [
        (0, 10.0, True, False),  # nothing to send is never due
        (1, 0.0, False, False),  # a few points, just cut: wait
        (1, 0.049, False, False),
        (1, 0.05, False, True),  # the interval has passed
        (16_383, 0.0, False, False),
        (16_384, 0.0, False, True),  # a full batch goes at once
        (5, 0.0, True, True),  # forced: a writer is blocked or the run is closing
    ],
)
def test_batch_policy(buffered: int, since_last_cut: float, force: bool, due: bool) -> None:
    assert BatchPolicy(max_points=16_384, max_delay=0.05).due(buffered, since_last_cut, force=force) is due


@pytest.mark.parametrize(("max_points", "max_delay"), [(0, 0.05), (10, 0.0), (10, -1.0)])
def test_batch_policy_refuses_nonsense(max_points: int, max_delay: float) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_points=max_points, max_delay=max_delay)


def test_outbox_numbers_batches_and_tracks_unacked_points() -> None:
    box = Outbox()
    b0 = box.add([("a", [0], [1.0], [0])], 1)
    b1 = box.add([("a", [1, 2], [1.0, 2.0], [0, 0])], 2)
    b2 = box.add([("a", [3], [1.0], [0])], 1)
    assert [b0.seq, b1.seq, b2.seq] == [0, 1, 2] and box.next_seq == 3
    assert box.points == 4 and len(box) == 3 and box.first_unacked() == 0
    # out-of-order ack: the lowest unacked stays 0
    assert box.ack(1) is b1 and box.points == 2 and box.first_unacked() == 0
    assert box.ack(1) is None  # a repeated ack changes nothing
    assert box.ack(0) is b0 and box.first_unacked() == 2
    assert box.ack(2) is b2 and box.first_unacked() == 3 and box.points == 0 and len(box) == 0
    assert box.ack(99) is None


def test_outbox_resend_order_is_seq_order() -> None:
    box = Outbox()
    for i in range(5):
        box.add([], i)
    box.ack(2)
    assert [b.seq for b in box.pending()] == [0, 1, 3, 4]
