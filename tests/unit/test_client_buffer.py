"""The client's pure buffering: row groups, batch cutting, the cut policy and the outbox of unacked batches."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from runledger import errors
from runledger._buffer import BatchPolicy, MetricBuffer, Outbox, RowBlock


def _fill(buffer: MetricBuffer, rows: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in rows:
        buffer.append(metrics, step, 1_000 + step)


Points = dict[str, list[tuple[int, float, int]]]


def _points(blocks: list[RowBlock], into: Points | None = None) -> Points:
    """Per key, the (step, value, timestamp) triples of cut blocks, in block order."""
    out: Points = {} if into is None else into
    for b in blocks:
        values = np.asarray(b.values, dtype=np.float64).reshape(len(b.steps), len(b.keys))
        for j, key in enumerate(b.keys):
            out.setdefault(key, []).extend(
                zip(np.asarray(b.steps).tolist(), values[:, j].tolist(), np.asarray(b.stamps).tolist(), strict=True)
            )
    return out


def test_append_keeps_points_per_key_in_logging_order() -> None:
    buffer = MetricBuffer()
    _fill(buffer, [(0, {"loss": 1.0, "kl": 0.1}), (1, {"loss": 0.9}), (2, {"kl": 0.3, "loss": 0.8})])
    assert buffer.points == 5
    blocks, taken = buffer.cut(100)
    assert taken == 5 and buffer.points == 0
    assert _points(blocks) == {
        "loss": [(0, 1.0, 1000), (1, 0.9, 1001), (2, 0.8, 1002)],
        "kl": [(0, 0.1, 1000), (2, 0.3, 1002)],
    }
    assert buffer.cut(100) == ([], 0)


def test_nan_and_infinities_and_numeric_types_go_through_as_floats() -> None:
    buffer = MetricBuffer()
    buffer.append({"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(0.5), "e": 3, "f": True}, 7, 0)
    blocks, _ = buffer.cut(100)
    values = {key: pts[0][1] for key, pts in _points(blocks).items()}
    assert math.isnan(values["a"]) and values["b"] == math.inf and values["c"] == -math.inf
    assert values["d"] == 0.5 and values["e"] == 3.0 and values["f"] == 1.0


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
    buffer.append({"ok": 0.25}, 2, 0)  # the same keys as the group the refused call may have joined
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        buffer.append({"ok": "x"}, 3, 0)
    assert buffer.points == 2
    blocks, taken = buffer.cut(100)
    assert taken == 2 and _points(blocks) == {"ok": [(0, 0.5, 0), (2, 0.25, 0)]}


def test_a_refused_call_with_new_keys_does_not_hold_up_later_points() -> None:
    buffer = MetricBuffer()
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        buffer.append({"a": "bad"}, 0, 0)  # its keys got a group before the value was refused
    buffer.append({"b": 1.0}, 1, 0)
    blocks, taken = buffer.cut(100)  # an empty group at the head used to end the cut with nothing taken
    assert taken == 1 and buffer.points == 0 and _points(blocks) == {"b": [(1, 1.0, 0)]}
    buffer.append({"a": 2.0}, 2, 0)
    blocks, taken = buffer.cut(100)
    assert taken == 1 and _points(blocks) == {"a": [(2, 2.0, 0)]}


@pytest.mark.parametrize(
    ("rows", "max_points", "first_cut"),
    [
        # everything fits: one cut takes all
        ([{"a": 1.0, "b": 2.0}] * 3, 10, 6),
        # whole rows only, oldest first, up to the budget
        ([{"a": 1.0, "b": 2.0}] * 10, 5, 4),
        # at least one row, even when it alone is over the budget
        ([{"a": 1.0, "b": 2.0, "c": 3.0}] * 2, 1, 3),
        # rows of several groups in one cut
        ([{"a": 1.0}, {"b": 2.0}, {"a": 1.0, "b": 2.0}, {"c": 0.0}], 100, 5),
    ],
)
def test_cut_takes_the_oldest_whole_rows(rows: list[dict[str, float]], max_points: int, first_cut: int) -> None:
    buffer = MetricBuffer()
    _fill(buffer, list(enumerate(rows)))
    total = buffer.points
    blocks, taken = buffer.cut(max_points)
    assert taken == first_cut == sum(b.points for b in blocks) and buffer.points == total - taken
    seen = _points(blocks)
    while buffer.points:
        more, _ = buffer.cut(max_points)
        _points(more, seen)
    expected: Points = {}
    for step, row in enumerate(rows):
        for key, value in row.items():
            expected.setdefault(key, []).append((step, value, 1_000 + step))
    assert seen == expected


def test_alternating_key_sets_share_groups_and_keep_order() -> None:
    buffer = MetricBuffer()
    for step in range(100):
        buffer.append({"loss": float(step)}, step, 0)
        buffer.append({"lr": 0.1}, step, 0)
    blocks, taken = buffer.cut(1_000)
    assert taken == 200 and len(blocks) == 2  # two groups, not 200
    pts = _points(blocks)
    assert [p[0] for p in pts["loss"]] == list(range(100)) and [p[0] for p in pts["lr"]] == list(range(100))


def test_a_call_wider_than_a_batch_is_split_by_keys() -> None:
    buffer = MetricBuffer(max_series=2)
    buffer.append({f"k{i}": float(i) for i in range(5)}, 0, 0)
    assert buffer.points == 5
    keys_per_cut = []
    while buffer.points:
        blocks, _ = buffer.cut(100)
        keys_per_cut.append(sorted({k for b in blocks for k in b.keys}))
    assert keys_per_cut == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        buffer.append({"k0": 1.0, "k1": 1.0, "k2": "bad"}, 1, 0)
    assert buffer.points == 0


def test_random_logging_matches_the_reference_order() -> None:
    """Rows with random key sets (reordered too), column blocks and refused calls, cut at random budgets:
    every accepted point comes out exactly once, in logging order, and no cut exceeds its limits."""
    rng = random.Random(5)
    pool = ["a", "b", "c", "d", "e"]
    for _ in range(200):
        buffer = MetricBuffer(max_series=3)
        expected: Points = {}
        seen: Points = {}
        step = 0
        for _ in range(rng.randint(1, 60)):
            if rng.random() < 0.15:
                keys = tuple(rng.sample(pool, rng.randint(1, 4)))
                n = rng.randint(1, 6)
                steps = np.arange(step, step + n, dtype=np.int64)
                values = np.array([[float(s * 10 + j) for j in range(len(keys))] for s in steps.tolist()])
                buffer.append_columns(keys, steps, steps + 7, values)
                for j, key in enumerate(keys):
                    expected.setdefault(key, []).extend((s, s * 10.0 + j, s + 7) for s in steps.tolist())
                step += n
            elif rng.random() < 0.1:
                keys = tuple(rng.sample(pool, rng.randint(1, 5)))
                bad: dict[str, object] = {key: float(j) for j, key in enumerate(keys)}
                bad[rng.choice(keys)] = "not a number"
                with pytest.raises(errors.InvalidArgument):
                    buffer.append(bad, step, 0)
            else:
                keys = tuple(rng.sample(pool, rng.randint(1, 5)))
                row = {key: float(step * 10 + j) for j, key in enumerate(keys)}
                buffer.append(row, step, step + 7)
                for key, value in row.items():
                    expected.setdefault(key, []).append((step, value, step + 7))
                step += 1
            if rng.random() < 0.3:
                blocks, taken = buffer.cut(rng.randint(1, 12))
                assert len({k for b in blocks for k in b.keys}) <= 3
                assert taken == sum(b.points for b in blocks)
                _points(blocks, seen)
        for _ in range(1_000):
            if not buffer.points:
                break
            _points(buffer.cut(rng.randint(1, 12))[0], seen)
        assert buffer.points == 0 and seen == expected


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


@pytest.mark.parametrize(("max_points", "max_delay"), [(0, 0.05), (10, 0.0), (10, -1.0), (1_000_001, 0.05)])
def test_batch_policy_refuses_nonsense(max_points: int, max_delay: float) -> None:
    with pytest.raises(ValueError):  # above 1,000,000 points the server would refuse every batch
        BatchPolicy(max_points=max_points, max_delay=max_delay)
    assert BatchPolicy(max_points=1_000_000).max_points == 1_000_000  # the server's limit itself is fine


def test_outbox_numbers_batches_and_tracks_unacked_points() -> None:
    box = Outbox()
    b0 = box.add([RowBlock(("a",), [0], [0], [1.0])], 1)
    b1 = box.add([RowBlock(("a",), [1, 2], [0, 0], [1.0, 2.0])], 2)
    b2 = box.add([RowBlock(("a",), [3], [0], [1.0])], 1)
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
