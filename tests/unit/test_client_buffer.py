"""The client's pure buffering: row groups, batch cutting, the cut policy and the outbox of unacked batches.

The buffer tests run twice: with the C row groups and log_metrics' fast path (`_rowbuffer.c`), logging as
`Run.log_metrics` does (the fast path first, the Python path when it declines), and with the Python reference.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from runledger import errors
from runledger._buffer import BatchPolicy, MetricBuffer, Outbox, RowBlock, RowGroup as PyRowGroup, native

NO_LIMIT = 1 << 62


@pytest.fixture(params=["c", "python"])
def new_buffer(request: pytest.FixtureRequest) -> Callable[..., MetricBuffer]:
    def make(**kwargs: Any) -> MetricBuffer:
        buffer = MetricBuffer(accelerated=request.param == "c", **kwargs)
        buffer.lane.slow_at = NO_LIMIT  # the streamer's threshold: here the fast path never defers to it
        return buffer

    return make


def _holding(inner: object) -> np.ndarray:
    """A 0-d object array whose one element is `inner`."""
    outer = np.empty((), dtype=object)
    outer[()] = inner
    return outer


def _log(buffer: MetricBuffer, metrics: Any, step: Any, stamp: Any) -> None:
    """As Run.log_metrics: the C fast path when it takes the call, else the Python path."""
    fast = getattr(buffer.lane, "append", None)
    if fast is None or not fast(metrics, step, stamp):
        buffer.append(metrics, step, stamp)


def _fill(buffer: MetricBuffer, rows: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in rows:
        _log(buffer, metrics, step, 1_000 + step)


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


def test_append_keeps_points_per_key_in_logging_order(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer()
    _fill(buffer, [(0, {"loss": 1.0, "kl": 0.1}), (1, {"loss": 0.9}), (2, {"kl": 0.3, "loss": 0.8})])
    assert buffer.points == 5
    blocks, taken = buffer.cut(100)
    assert taken == 5 and buffer.points == 0
    assert _points(blocks) == {
        "loss": [(0, 1.0, 1000), (1, 0.9, 1001), (2, 0.8, 1002)],
        "kl": [(0, 0.1, 1000), (2, 0.3, 1002)],
    }
    assert buffer.cut(100) == ([], 0)


def test_nan_and_infinities_and_numeric_types_go_through_as_floats(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer()
    _log(buffer, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": np.float32(0.5), "e": 3, "f": True}, 7, 0)
    blocks, _ = buffer.cut(100)
    values = {key: pts[0][1] for key, pts in _points(blocks).items()}
    assert math.isnan(values["a"]) and values["b"] == math.inf and values["c"] == -math.inf
    assert values["d"] == 0.5 and values["e"] == 3.0 and values["f"] == 1.0


@pytest.mark.parametrize(
    ("metrics", "reason_fragment"),
    [
        ({"ok": 1.0, "bad": "not a number"}, "must be numbers"),
        ({"ok": 1.0, "bad": None}, "must be numbers"),
        ({"ok": 1.0, "bad": "1.5"}, "must be numbers"),  # text that float() would parse is still text
        ({"ok": 1.0, "bad": b"2"}, "must be numbers"),
        ({"ok": 1.0, "bad": bytearray(b"3")}, "must be numbers"),
        ({"ok": 1.0, "bad": np.array("1.5")}, "must be numbers"),  # 0-d numpy arrays of text
        ({"ok": 1.0, "bad": np.array(b"1.5")}, "must be numbers"),
        ({"ok": 1.0, "bad": np.array("1.5", dtype=object)}, "must be numbers"),
        ({"ok": 1.0, "bad": _holding(np.array("1.5"))}, "must be numbers"),  # text inside an object array
        ({"ok": 1.0, "bad": 10**400}, "must be numbers"),  # too large for a float (was a bare OverflowError)
        ({"ok": 1.0, "": 1.0}, "not valid"),
        ({"ok": 1.0, " padded": 1.0}, "not valid"),
        ({"ok": 1.0, "nul\x00": 1.0}, "not valid"),
        ({"ok": 1.0, "k" * 251: 1.0}, "not valid"),
        ({"ok": 1.0, 5: 1.0}, "not valid"),
    ],
)
def test_a_bad_key_or_value_adds_nothing(
    metrics: dict, reason_fragment: str, new_buffer: Callable[..., MetricBuffer]
) -> None:
    buffer = new_buffer()
    _log(buffer, {"ok": 0.5}, 0, 0)
    with pytest.raises(errors.InvalidArgument, match=reason_fragment):
        _log(buffer, metrics, 1, 0)
    _log(buffer, {"ok": 0.25}, 2, 0)  # the same keys as the group the refused call may have joined
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        _log(buffer, {"ok": "x"}, 3, 0)
    assert buffer.points == 2
    blocks, taken = buffer.cut(100)
    assert taken == 2 and _points(blocks) == {"ok": [(0, 0.5, 0), (2, 0.25, 0)]}


def test_numeric_text_is_refused_naming_its_key(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer()
    _log(buffer, {"loss": 1.0, "lr": 0.1}, 0, 0)
    with pytest.raises(errors.InvalidArgument, match="'lr': '2e-05'") as info:
        _log(buffer, {"loss": 1.0, "lr": "2e-05"}, 1, 0)
    assert info.value.metadata["field"] == "values[lr]" and buffer.points == 2


def test_a_refused_call_with_new_keys_does_not_hold_up_later_points(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer()
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        _log(buffer, {"a": "bad"}, 0, 0)  # its keys got a group before the value was refused
    _log(buffer, {"b": 1.0}, 1, 0)
    blocks, taken = buffer.cut(100)  # an empty group at the head used to end the cut with nothing taken
    assert taken == 1 and buffer.points == 0 and _points(blocks) == {"b": [(1, 1.0, 0)]}
    _log(buffer, {"a": 2.0}, 2, 0)
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
def test_cut_takes_the_oldest_whole_rows(
    rows: list[dict[str, float]], max_points: int, first_cut: int, new_buffer: Callable[..., MetricBuffer]
) -> None:
    buffer = new_buffer()
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


def test_alternating_key_sets_share_groups_and_keep_order(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer()
    for step in range(100):
        _log(buffer, {"loss": float(step)}, step, 0)
        _log(buffer, {"lr": 0.1}, step, 0)
    blocks, taken = buffer.cut(1_000)
    assert taken == 200 and len(blocks) == 2  # two groups, not 200
    pts = _points(blocks)
    assert [p[0] for p in pts["loss"]] == list(range(100)) and [p[0] for p in pts["lr"]] == list(range(100))


def test_a_call_wider_than_a_batch_is_split_by_keys(new_buffer: Callable[..., MetricBuffer]) -> None:
    buffer = new_buffer(max_series=2)
    _log(buffer, {f"k{i}": float(i) for i in range(5)}, 0, 0)
    assert buffer.points == 5
    keys_per_cut = []
    while buffer.points:
        blocks, _ = buffer.cut(100)
        keys_per_cut.append(sorted({k for b in blocks for k in b.keys}))
    assert keys_per_cut == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    with pytest.raises(errors.InvalidArgument, match="must be numbers"):
        _log(buffer, {"k0": 1.0, "k1": 1.0, "k2": "bad"}, 1, 0)
    assert buffer.points == 0


def test_random_logging_matches_the_reference_order(new_buffer: Callable[..., MetricBuffer]) -> None:
    """Rows with random key sets (reordered too), column blocks and refused calls, cut at random budgets:
    every accepted point comes out exactly once, in logging order, and no cut exceeds its limits."""
    rng = random.Random(5)
    pool = ["a", "b", "c", "d", "e"]
    for _ in range(200):
        buffer = new_buffer(max_series=3)
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
                bad[rng.choice(keys)] = rng.choice(["not a number", "7.5", None, 10**400, [1.0]])
                with pytest.raises(errors.InvalidArgument):
                    _log(buffer, bad, step, 0)
            else:
                # Keys equal to the group's but other str objects, and every kind of number the fast path
                # takes or leaves to Python: all must come out as the same floats.
                keys = tuple("".join(list(k)) if rng.random() < 0.3 else k for k in rng.sample(pool, rng.randint(1, 5)))
                number = rng.choice([float, int, np.float64, np.float32, bool, Decimal])
                row = {key: number(step * 10 + j) for j, key in enumerate(keys)}
                _log(buffer, row, step, step + 7)
                for key, value in row.items():
                    expected.setdefault(key, []).append((step, float(value), step + 7))
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


def test_the_c_fast_path_is_built() -> None:
    """The install builds `_rowbuffer.c` (a C compiler is part of the setup): without it every log_metrics call
    takes the Python path, several times slower, and the tests above would not exercise the fast path."""
    assert native is not None, "runledger._rowbuffer is not built: reinstall with a C compiler (pip install -e .)"


def _fast_buffer() -> tuple[MetricBuffer, threading.Lock]:
    if native is None:
        pytest.fail("runledger._rowbuffer is not built")
    lock = threading.Lock()
    buffer = MetricBuffer(lock=lock)
    buffer.lane.slow_at = NO_LIMIT
    buffer.append({"loss": 1.0, "kl": 0.5}, 0, 10)  # the Python path makes the group the fast path appends to
    return buffer, lock


def test_the_fast_path_takes_the_usual_call_and_stamps_it_now() -> None:
    buffer, _ = _fast_buffer()
    before = time.time_ns() // 1_000_000
    assert buffer.lane.append({"loss": 0.5, "kl": 2}, 1, None) is True
    after = time.time_ns() // 1_000_000
    assert buffer.lane.append({"loss": 0.25, "kl": 0.0}, 2, 99) is True
    assert buffer.points == 6
    blocks, taken = buffer.cut(100)
    assert taken == 6
    pts = _points(blocks)
    assert [p[:2] for p in pts["loss"]] == [(0, 1.0), (1, 0.5), (2, 0.25)] and pts["kl"][1][1] == 2.0
    assert before <= pts["loss"][1][2] <= after and pts["loss"][2][2] == 99 and pts["loss"][0][2] == 10


@pytest.mark.parametrize(
    ("metrics", "step", "stamp"),
    [
        ({"kl": 0.5, "loss": 1.0}, 1, None),  # the same keys in another order: another group
        ({"loss": 1.0}, 1, None),  # fewer keys
        ({"loss": 1.0, "kl": 0.5, "x": 1.0}, 1, None),  # more keys
        ({"loss": 1.0, "kl": True}, 1, None),  # a bool: float() semantics, in Python
        ({"loss": 1.0, "kl": np.float64(0.5)}, 1, None),  # numpy scalars too
        ({"loss": 1.0, "kl": 10**400}, 1, None),  # an int too large for a float: Python names the key
        ({"loss": 1.0, "kl": "0.5"}, 1, None),
        ({"loss": 1.0, "kl": 0.5}, True, None),  # a bool step
        ({"loss": 1.0, "kl": 0.5}, 1 << 63, None),  # a step beyond int64
        ({"loss": 1.0, "kl": 0.5}, np.int64(1), None),
        ({"loss": 1.0, "kl": 0.5}, 1, 1.5),  # a timestamp that is not an int
        ({"loss": 1.0, "kl": 0.5}, 1, 1 << 63),
    ],
)
def test_the_fast_path_leaves_every_other_call_to_python_untouched(metrics: Any, step: Any, stamp: Any) -> None:
    buffer, _ = _fast_buffer()
    assert buffer.lane.append(metrics, step, stamp) is False
    assert buffer.points == 2 and buffer.lane.group is not None and buffer.lane.group.rows == 1


def test_the_fast_path_declines_while_the_lock_is_held_the_stream_is_unusable_or_the_threshold_is_reached() -> None:
    buffer, lock = _fast_buffer()
    row = {"loss": 0.5, "kl": 0.5}
    with lock:  # a holder of the lock may be in the middle of changing the buffer
        assert buffer.lane.append(row, 1, None) is False
    buffer.lane.unusable = True  # closing or failed: the Python path raises RUN_CLOSED
    assert buffer.lane.append(row, 1, None) is False
    buffer.lane.unusable = False
    buffer.lane.slow_at = 4  # 2 points buffered + 2 would reach it: Python wakes the sender or waits for room
    assert buffer.lane.append(row, 1, None) is False
    buffer.lane.slow_at = 5
    assert buffer.lane.append(row, 1, None) is True
    buffer.lane.group = None  # the newest group was cut away: Python picks the group
    assert buffer.lane.append(row, 2, None) is False
    assert buffer.points == 4
    with pytest.raises(TypeError):
        buffer.lane.group = "not a group"  # type: ignore[assignment]


def test_threads_logging_through_both_paths_while_batches_are_cut_lose_and_repeat_nothing() -> None:
    """The fast path runs without the lock, relying on the GIL and on finding the lock free: four threads log
    the same keys (fast path, else the Python path under the lock, as the streamer does) while a fifth cuts
    batches under the lock, with thread switches forced as often as possible. Every point comes out once,
    each thread's in its logging order."""
    buffer, lock = _fast_buffer()
    buffer.cut(100)
    per_thread = 50_000
    seen: Points = {}
    done = threading.Event()

    def writer(t: int) -> None:
        for i in range(per_thread):
            row = {"loss": float(t), "kl": float(i)} if i % 97 else {"loss": t, "kl": np.float64(i)}  # some slow
            if not buffer.lane.append(row, t * per_thread + i, None):
                with lock:
                    buffer.append(row, t * per_thread + i, 0)

    def cutter() -> None:
        rng = random.Random(3)
        while not done.is_set():
            with lock:
                blocks, _ = buffer.cut(rng.choice([rng.randint(1, 50), 1_000_000]))  # often all: the group goes
            _points(blocks, seen)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        writers = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        cutting = threading.Thread(target=cutter)
        cutting.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        done.set()
        cutting.join()
    finally:
        sys.setswitchinterval(interval)
    for _ in range(1_000):  # what is left (a miscounted buffer would never empty: bounded)
        blocks, taken = buffer.cut(5_000)
        if not taken:
            break
        _points(blocks, seen)
    assert buffer.points == 0
    steps = [p[0] for p in seen["kl"]]
    assert sorted(steps) == list(range(4 * per_thread)) and [p[0] for p in seen["loss"]] == steps
    for t in range(4):
        mine = [int(v) for s, v, _ in seen["kl"] if s // per_thread == t]
        assert mine == list(range(per_thread))


def test_c_row_groups_refuse_bad_rows_whole_and_take_the_oldest() -> None:
    if native is None:
        pytest.fail("runledger._rowbuffer is not built")
    group = native.RowGroup(("a", "b"))
    for step in range(100):  # past the first allocation: rows move when the arrays grow
        group.append(step, step + 1, [float(step), -float(step)])
    with pytest.raises(TypeError):
        group.append(100, 0, [1.0, "x"])
    with pytest.raises(ValueError):
        group.append(100, 0, [1.0])
    assert group.rows == 100
    steps, stamps, values = group.take(30)
    assert np.frombuffer(steps, np.int64).tolist() == list(range(30))
    assert np.frombuffer(stamps, np.int64).tolist() == list(range(1, 31))
    assert np.frombuffer(values, np.float64).reshape(30, 2)[:, 1].tolist() == [-float(s) for s in range(30)]
    steps, _, values = group.take(1_000)
    assert np.frombuffer(steps, np.int64).tolist() == list(range(30, 100)) and group.rows == 0
    assert np.frombuffer(values, np.float64)[-2:].tolist() == [99.0, -99.0]

    class PythonLock:
        def locked(self) -> bool:
            return False

    with pytest.raises(TypeError):
        native.Lane(PythonLock())  # the fast path's atomicity needs a lock whose check runs no Python code


def test_c_types_refuse_misuse_instead_of_crashing() -> None:
    if native is None:
        pytest.fail("runledger._rowbuffer is not built")
    lane = native.Lane(threading.Lock())
    with pytest.raises(TypeError):
        lane.group = native.RowGroup.__new__(native.RowGroup)  # no keys: the fast path divided by zero
    with pytest.raises(TypeError):
        lane.__init__(threading.Lock())  # a second init reset the count and could swap the lock
    with pytest.raises(TypeError):
        lane.commit(native.RowGroup.__new__(native.RowGroup), 0, 0, [])
    bare = native.Lane.__new__(native.Lane)  # never initialised: no lock to check
    bare.slow_at = NO_LIMIT
    assert bare.append({"a": 1.0}, 0, 0) is False
    group = native.RowGroup(("a",))
    lane.slow_at = NO_LIMIT
    lane.commit(group, 1, 2, [0.5])
    assert (lane.group is group, lane.points, group.rows) == (True, 1, 1)
    assert lane.append({"a": 0.25}, 2, 3) is True and lane.points == 2


@pytest.fixture(params=["c", "python"])
def row_group(request: pytest.FixtureRequest) -> type:
    if request.param == "python":
        return PyRowGroup
    if native is None:
        pytest.fail("runledger._rowbuffer is not built")
    return native.RowGroup


@pytest.mark.parametrize("change", ["grow", "take", "shrink the values"])
def test_a_value_whose_float_changes_the_c_group_or_the_row_still_appends_the_row_it_was_given(change: str) -> None:
    """A value's __float__ runs Python code. The C group kept pointers into its arrays and into the list across
    it: growing the group there wrote the row into freed memory, taking rows stored the row at a stale place,
    and emptying the list read freed items. (The Python group is handed floats: MetricBuffer converts first.)"""
    if native is None:
        pytest.fail("runledger._rowbuffer is not built")
    group = native.RowGroup(("a", "b"))
    for i in range(64):  # at capacity: one more row reallocates the arrays
        group.append(i, 0, [1.0, 2.0])
    values: list[Any] = []

    class Meddling:
        def __float__(self) -> float:
            if change == "grow":
                for j in range(10_000):
                    group.append(1_000 + j, 0, [3.0, 4.0])
            elif change == "take":
                group.take(1 << 30)
            else:
                values.clear()
            return 5.0

    values.extend([Meddling(), 6.0])
    group.append(999, 0, values)
    taken_steps, _, taken_values = group.take(1 << 30)
    steps = np.frombuffer(taken_steps, np.int64).tolist()
    got = np.frombuffer(taken_values, np.float64).tolist()
    assert (steps[-1], got[-2:]) == (999, [5.0, 6.0])
    expected_before = {"grow": 64 + 10_000, "take": 0, "shrink the values": 64}[change]
    assert len(steps) == expected_before + 1


def test_taking_and_appending_interleaved_keeps_every_row_once_in_order(row_group: type) -> None:
    """Taking moves a mark and reuses the space in front once it is half the group (cutting a large buffer
    into many small batches moved every row left, per batch): rows come out once each, in logging order."""
    group = row_group(("a", "b"))
    rng = random.Random(5)
    logged: list[int] = []
    taken: list[int] = []
    step = 0
    for _ in range(3_000):
        for _ in range(rng.randint(0, 40)):
            group.append(step, step * 10, [float(step), -float(step)])
            logged.append(step)
            step += 1
        steps, stamps, values = group.take(rng.randint(0, 30))
        steps, stamps, values = (
            (list(np.frombuffer(x, dt)) for x, dt in ((steps, np.int64), (stamps, np.int64), (values, np.float64)))
            if isinstance(steps, bytes)
            else (steps, stamps, values)
        )
        assert list(stamps) == [x * 10 for x in steps] and list(values) == [v for x in steps for v in (x, -x)]
        taken += steps
        assert group.rows == len(logged) - len(taken)
    rest = group.take(1 << 30)[0]
    taken += list(np.frombuffer(rest, np.int64)) if isinstance(rest, bytes) else rest
    assert taken == logged and group.rows == 0


def test_a_row_group_in_a_reference_cycle_through_its_keys_is_collected(row_group: type) -> None:
    """Keys may be str subclasses that refer back to their group; the C group was invisible to the collector."""

    class Key(str):
        owner: Any

    key = Key("loss")
    key.owner = row_group((key,))
    gone = weakref.ref(key)
    del key
    gc.collect()
    assert gone() is None


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
