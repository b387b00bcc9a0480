"""The background sender of one writer's metrics: batches over StreamMetrics, re-sent until acknowledged.

The training thread only appends to per-key lists under a lock (`append`). A sender thread keeps one
bidirectional StreamMetrics call open; gRPC pulls requests from `_requests`, which cuts batches when the
policy says so and builds their protobuf messages off the caller's thread. Every batch stays in the
outbox until the server acknowledges it (after its commit); when the connection drops, the next call
re-sends every unacknowledged batch with the same seq, and the server stores each (run, writer, seq) once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from runledger import _process, _reentry, errors, wire
from runledger._buffer import BatchPolicy, MetricBuffer, Outbox, PendingBatch, RowBlock
from runledger._retry import RetryPolicy
from runledger.v1 import tracking_service_pb2 as pb

_LOGGER = logging.getLogger(__name__)

_KEPT = "(they are kept and still being sent)"
FINISHING, EXITING = "finishing", "the process is exiting"  # the waits that say what they wait for
NOTICE_AFTER_S = 3.0  # how long a finishing or exiting flush waits before it says what it waits for
WAIT_SLICE_S = 0.1  # the longest a caller's wait runs with signals held (see MetricStreamer._wait)

# Opens one StreamMetrics call fed by the given serialized requests; returns the call (an iterator of acks).
OpenStream = Callable[[Iterator[bytes]], Any]


@dataclass(frozen=True)
class StreamerConfig:
    """Limits of one writer's sender."""

    max_buffered_points: int = 2_000_000  # buffered + unacknowledged; log_metrics blocks beyond it
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    max_in_flight: int = 32  # batches sent and not yet acknowledged, per connection
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    close_timeout: float = 30.0  # how long close() waits for the stream to end after everything is acked
    accelerated: bool = True  # log_metrics' fast path in C (_rowbuffer.c), when it was built

    def __post_init__(self) -> None:
        if self.max_buffered_points < 1 or self.max_in_flight < 1:
            raise ValueError("StreamerConfig needs max_buffered_points >= 1 and max_in_flight >= 1")


class _Connection:
    """The state of one StreamMetrics call."""

    __slots__ = ("cursor", "in_flight", "stopped")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor  # the next seq to send on this call
        self.in_flight = 0
        self.stopped = False


def build_request(run_id: str, writer_id: str, seq: int, blocks: list[RowBlock]) -> bytes:
    """Row blocks -> one serialized StreamMetricsRequest with one block-encoded MetricSeries per key (wire.py).

    The bytes go to gRPC as they are (the client registers a pass-through serializer for StreamMetrics), so a
    batch is never parsed into protobuf objects and serialized again.
    """
    steps: dict[str, list[np.ndarray]] = {}
    values: dict[str, list[np.ndarray]] = {}
    stamps: dict[str, list[np.ndarray]] = {}
    for block in blocks:
        # Steps were checked to fit int64 when logged, timestamps too (or come from the clock).
        s = np.asarray(block.steps, dtype=np.int64)
        t = np.asarray(block.stamps, dtype=np.int64)
        v = np.asarray(block.values, dtype=np.float64).reshape(s.shape[0], len(block.keys))
        for j, key in enumerate(block.keys):
            steps.setdefault(key, []).append(s)
            values.setdefault(key, []).append(np.ascontiguousarray(v[:, j]))
            stamps.setdefault(key, []).append(t)
    pieces: list[Any] = [
        wire.length_delimited(1, run_id.encode()),
        wire.length_delimited(2, writer_id.encode()),
        wire.varint_field(3, seq),
    ]
    for key in steps:
        series, length = wire.series_pieces(key, steps[key], values[key], stamps[key])
        pieces.append(wire.field_header(4, length))
        pieces += series
    return b"".join(pieces)  # the one copy of the points


class MetricStreamer:
    """One writer (run_id, writer_id): buffer, outbox and the sender thread."""

    def __init__(
        self,
        run_id: str,
        writer_id: str,
        open_stream: OpenStream,
        config: StreamerConfig | None = None,
        *,
        first_seq: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`first_seq`, for a writer_id that may have written to the run before (a resumed job): asks the server
        where the writer's numbering continues. The sender asks before it cuts the first batch; until then
        points are buffered as usual."""
        self.run_id = run_id
        self.writer_id = writer_id
        self._open_stream = open_stream
        self._first_seq = first_seq
        self._numbered = first_seq is None  # the outbox knows the seq of the first batch
        self._config = config or StreamerConfig()
        self._policy = self._config.batch
        self._cap = self._config.max_buffered_points
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        # Entered as `with self._lock` everywhere (the condition's own lock): Condition.__enter__ is Python code,
        # and an interrupt between its acquire and its return would leave the lock held.
        self._cond = threading.Condition(self._lock)
        self._buffer = MetricBuffer(lock=self._lock, accelerated=self._config.accelerated)
        self._lane = self._buffer.lane  # the state log_metrics reads on every call (see _after_append)
        self._outbox = Outbox()
        self._acked = 0
        self._dropped = 0  # points of a batch the server kept from another writer with this writer_id
        self._blocked = 0  # callers waiting for room: the next batch is cut at once
        self._woken = False  # the sender was told that a full batch is buffered
        self._lane.slow_at = min(self._cap, self._policy.max_points)  # see _reset_threshold
        self._lane.unusable = False  # closing or failed: the caller's append goes the slow way and raises
        self._holder: int | None = None  # the caller's thread inside a section holding the lock (reentry check)
        self._last_cut = clock()
        self._error: errors.RunledgerError | None = None  # fatal: raised to the caller, nothing more is sent
        self._error_reported = False
        self._lost_at_failure = 0  # points the failure left unstored, counted when it happened
        self._last_transient: errors.RunledgerError | None = None
        self.wait_said = ""  # which wait (FINISHING, EXITING) has said on stderr what it waits for
        self._closing = False
        self._stop_now = False
        self._call: Any = None
        self._conn: _Connection | None = None
        self._connections = 0
        self._resent = 0
        self._thread = threading.Thread(target=self._run, name=f"runledger-metrics-{writer_id}", daemon=True)
        self._thread.start()
        _process.flush_at_exit(self)

    # ---- the caller's side ---------------------------------------------------------------------------
    @property
    def logged_points(self) -> int:
        # Every logged point is buffered, in the outbox, acknowledged, or dropped as a duplicate writer's.
        return self._buffer.points + self._outbox.points + self._acked + self._dropped

    @property
    def acked_points(self) -> int:
        return self._acked

    @property
    def connections(self) -> int:
        """How many StreamMetrics calls were opened (1 + reconnections)."""
        return self._connections

    @property
    def in_flight_batches(self) -> int:
        """Batches sent on the current connection and not yet acknowledged."""
        conn = self._conn
        return 0 if conn is None or conn.stopped else conn.in_flight

    @property
    def resent_batches(self) -> int:
        """Batch sends that repeated an earlier, unacknowledged send (after a reconnection)."""
        return self._resent

    @property
    def error(self) -> errors.RunledgerError | None:
        return self._error

    def _reported_error(self) -> errors.RunledgerError:
        """The sender's fatal error, to raise to a caller (who has then been told)."""
        assert self._error is not None
        self._error_reported = True
        return self._error.again()

    @property
    def unreported_error(self) -> errors.RunledgerError | None:
        """The error that stopped the sender with points unstored, if no caller has been told of it yet."""
        if self._error is None or self._error_reported or not (self._lost_at_failure or self.unstored_points):
            return None
        return self._error.again()

    @property
    def unstored_points(self) -> int:
        """Points logged and neither acknowledged nor dropped as another writer's: lost if the sender has stopped."""
        return self._buffer.points + self._outbox.points

    @property
    def sending(self) -> bool:
        """The sender still runs and has not failed: points it holds may yet be stored."""
        return self._thread.is_alive() and self._error is None and not self._stop_now

    def append(self, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> None:
        # The training thread's hot path: one flag for "closed or failed", and one threshold standing for "a batch
        # is due" and "the buffer is full". `with` on the lock, not acquire()/try: a Ctrl-C arriving right after
        # acquire() would skip the release and leave every later call (finish, the exit flush) waiting forever.
        # Only calls the C fast path declined get here (see Run.log_metrics).
        me = threading.get_ident()
        if self._holder == me:  # a signal handler's call, inside a call of ours that holds the lock
            self._refuse_reentry("log_metrics")
        with self._lock:
            self._holder = me
            try:
                lane = self._lane
                self._check_room()
                self._buffer.append(metrics, step, timestamp_ms)
                if lane.points >= lane.slow_at:
                    self._after_append()
            finally:
                self._holder = None

    @property
    def fast_append(self) -> Callable[[Mapping[str, Any], int, int | None], bool] | None:
        """The C fast path of `append` (True: appended; False: call `append`), or None without the C module.

        It takes a plain dict with the newest group's keys, float or int values, an int step and timestamp
        (None: now), and only while the lock is free, the buffer is below `slow_at` and the stream usable.
        """
        append: Callable[[Mapping[str, Any], int, int | None], bool] | None = getattr(self._lane, "append", None)
        return append

    def _check_room(self) -> None:
        """Under the lock, before a call takes its points: refused when closed, else waiting while the buffer is
        full. Waiting before taking them (not after) means a call refused while it waited (the run finished,
        the client closed, Ctrl-C) took nothing, as its error says; a caller that logs it again stores it once."""
        if self._lane.unusable:
            self._raise_unusable()
        if self._buffer.points + self._outbox.points >= self._cap:
            self._wait_for_room()
            if self._lane.unusable:  # closed while it waited (room came from the final acks)
                self._raise_unusable()

    def _after_append(self) -> None:
        """Under the lock, once the buffer reached `lane.slow_at`: wake the sender for a full batch. A full
        buffer is waited on by the next call (`_check_room`); `slow_at` sends that call here."""
        buffer = self._buffer
        if buffer.points >= self._policy.max_points and not self._woken:
            self._woken = True  # once per batch: waking the sender costs more than the append
            self._cond.notify_all()
        self._reset_threshold()

    def _reset_threshold(self) -> None:
        """Under the lock: the buffered points at which an append must wake the sender or wait for room."""
        room = self._cap - self._outbox.points
        self._lane.slow_at = room if self._woken else min(room, self._policy.max_points)

    def append_columns(self, keys: tuple[str, ...], steps: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> None:
        me = threading.get_ident()
        if self._holder == me:
            self._refuse_reentry("log_series")
        with self._lock:
            self._holder = me
            try:
                self._check_room()
                self._buffer.append_columns(keys, steps, stamps, values)
                if self._buffer.points >= self._policy.max_points and not self._woken:
                    self._woken = True
                    self._cond.notify_all()
            finally:
                self._holder = None

    def _wait_for_room(self) -> None:
        self._blocked += 1
        self._cond.notify_all()  # the sender cuts what is buffered now instead of waiting for the timer
        try:
            while self._buffer.points + self._outbox.points >= self._cap:
                if self._lane.unusable:
                    self._raise_unusable()
                self._wait()
        finally:
            self._blocked -= 1

    def _wait(self, timeout: float | None = None) -> None:
        """A wait on the condition by a caller's thread: it does not hold the lock meanwhile (see _holder).

        Waits in slices with the usual signals held (on the main thread): a Ctrl-C that interrupted
        `Condition.wait` while it re-took the lock raised with the lock not held, and the caller's `with` then
        released it anyway (RuntimeError, or another thread's hold). Held, the signal's handler runs once the
        slice is over, with the lock back in hand; callers wait in loops, so a slice ending early is harmless.
        """
        holder, self._holder = self._holder, None
        try:
            with _signals_deferred():
                try:
                    self._cond.wait(WAIT_SLICE_S if timeout is None else min(timeout, WAIT_SLICE_S))
                finally:
                    # Back before the held signals are let through: their handler runs with the lock in hand, and
                    # must find it held by its own thread (a call then is REENTRANT_CALL, not a wait for ever).
                    self._holder = holder
        finally:
            self._holder = holder

    def _raise_unusable(self) -> None:
        if self._error is not None:
            raise self._reported_error()
        raise errors.FailedPrecondition(
            f"metrics of run {self.run_id} (writer {self.writer_id}) can no longer be logged: "
            "the run was finished or its client closed",
            reason="RUN_CLOSED",
            metadata={"runId": self.run_id, "writerId": self.writer_id},
        )

    def check_not_reentered(self, what: str) -> None:
        """Raise FailedPrecondition REENTRANT_CALL when this thread was interrupted inside a call holding the lock.

        A signal handler (SIGTERM on a preempted job) runs in the thread it interrupts: called from inside
        `append`, taking the lock would wait for ourselves for ever. The callers' sections that hold the lock
        record their thread in `_holder` (cleared while they wait on the condition, which releases the lock),
        so a call interrupted while merely waiting for the lock is not refused.
        """
        if self._holder == threading.get_ident():
            self._refuse_reentry(what)

    def _refuse_reentry(self, what: str) -> None:
        """This thread holds the lock further up its stack: a signal handler (SIGTERM on a preempted job, say)
        interrupted it inside a call of this run. Going on would corrupt the buffer or wait for ourselves."""
        raise _reentry.refused(f"{what} on run {self.run_id}", "another call logging to it", {"runId": self.run_id})

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every point appended before this call is acknowledged (stored) by the server."""
        self.check_not_reentered("flush")
        deadline = None if timeout is None else self._clock() + timeout
        with self._lock:
            self._holder = threading.get_ident()
            try:
                if self._error is not None:
                    raise self._reported_error()
                self._cond.notify_all()
                while not self._numbered and self._buffer.points:  # the sender is asking where numbering starts
                    self._wait_until(deadline, timeout)
                with _signals_deferred():  # a Ctrl-C between rows taken and their batch queued loses them
                    while self._buffer.points:
                        self._cut()
                target = self._outbox.next_seq
                self._cond.notify_all()
                while self._outbox.first_unacked() < target or self._error is not None:
                    self._wait_until(deadline, timeout)
            finally:
                self._holder = None

    def _wait_until(self, deadline: float | None, timeout: float | None) -> None:
        """Under the lock: one wait for news from the sender, within the caller's deadline."""
        if self._error is not None:
            raise self._reported_error()
        if self._stop_now:
            raise errors.FailedPrecondition(f"the metric sender of run {self.run_id} was stopped", reason="RUN_CLOSED")
        remaining = None if deadline is None else deadline - self._clock()
        if remaining is not None and remaining <= 0:
            raise self._timeout_error(timeout)
        self._wait(None if remaining is None or remaining > threading.TIMEOUT_MAX else remaining)

    def _timeout_error(self, timeout: float | None) -> errors.DeadlineExceeded:
        pending = self._outbox.points + self._buffer.points
        last = self._last_transient
        why = f"; last error: {last}" if last is not None else ""
        return errors.DeadlineExceeded(
            f"flush of run {self.run_id} timed out after {timeout} s with {pending} points not yet acknowledged "
            f"{_KEPT}{why}",
            reason="FLUSH_TIMEOUT",
            metadata={"runId": self.run_id, "writerId": self.writer_id, "pendingPoints": str(pending)},
        )

    def close(self, timeout: float | None = None) -> None:
        """Stop taking points, flush every point taken, then end the stream and the sender thread.

        Points are refused from the first moment, so a point another thread logs while this runs is either
        refused (RUN_CLOSED) or waited for: never taken and then given up. Raises what flush raises; the
        sender then goes on until `abandon()`.
        """
        self.check_not_reentered("finish")
        self.close_when_sent()
        self._flush_saying_so(timeout, FINISHING)
        self._thread.join(self._config.close_timeout)
        if self._thread.is_alive():
            _LOGGER.warning("metric sender of run %s did not end in time; cancelling its stream", self.run_id)
            self.abandon()

    def close_when_sent(self) -> None:
        """Refuse further points and let the sender end once everything held is acknowledged, without waiting
        for it (the exit flush still waits for what is left).

        Also a dropped Run's finalizer, which the garbage collector may run on any thread, the sender's included,
        while that thread holds the lock: then the flags are set without it (they only ever go from False to
        True) and the sender sees them at its next poll, instead of this waiting for ever for its own lock.
        """
        if self._lock.locked():
            self._lane.unusable = True  # refuse points first: the sender may end as soon as it sees _closing
            self._closing = True
            return
        with self._lock:
            self._holder = threading.get_ident()
            try:
                self._closing = self._lane.unusable = True
                self._cond.notify_all()
            finally:
                self._holder = None

    def _flush_at_exit(self, timeout: float) -> None:
        # A stream closing when its close was interrupted (Ctrl-C in finish) still holds points: flushed too.
        with self._lock:
            self._holder = threading.get_ident()
            try:
                if self._stop_now or (not self._buffer.points and not len(self._outbox)):
                    return
            finally:
                self._holder = None
        _LOGGER.info("run %s was not finished: flushing its metrics before the process exits", self.run_id)
        self._flush_saying_so(timeout, EXITING)

    def _flush_saying_so(self, timeout: float | None, why: str) -> None:
        """A flush that, once it has waited NOTICE_AFTER_S, says on stderr what it holds and how long it waits:
        someone is waiting for the run or the process to end (the library's log is silent unless the
        application configures logging), and with the server away the wait can be long."""
        if self.wait_said == why:  # the caller said it already (a Ctrl-C'd run's finish)
            self.flush(timeout)
            return
        first = NOTICE_AFTER_S if timeout is None else min(timeout, NOTICE_AFTER_S)
        try:
            self.flush(first)
            return
        except errors.DeadlineExceeded:
            if timeout is not None and timeout <= first:
                raise
        self.wait_said = why
        left = None if timeout is None else timeout - first
        last = self._last_transient
        at_exit = why == EXITING  # a Ctrl-C there ends the process; in a finish it keeps them for the exit
        print(
            f"runledger: run {self.run_id} ({why}): storing {self.logged_points - self.acked_points:,} points it "
            f"still holds; waiting {'until the server takes them' if left is None else f'up to {left:.0f} s more'}"
            f"{f' (last error: {last})' if last is not None else ''}{'; Ctrl-C gives them up' if at_exit else ''}",
            file=sys.stderr,
            flush=True,
        )
        try:
            self.flush(left)
        except errors.DeadlineExceeded as exc:  # timed out after the whole timeout, not the part left
            raise self._timeout_error(timeout) from exc

    def abandon_after(self, failure: errors.RunledgerError) -> errors.RunledgerError:
        """`abandon()` after a failed or timed-out close; the error to raise, which now says the points it
        held are given up (a flush's timeout says they are kept, which is no longer so)."""
        self.abandon()
        if _KEPT not in failure.message:
            return failure
        given_up = errors.DeadlineExceeded(
            failure.message.replace(_KEPT, "(they were given up)"), reason=failure.reason, metadata=failure.metadata
        )
        given_up.__cause__ = failure
        return given_up

    def abandon(self) -> None:
        """Stop at once, dropping whatever is not acknowledged (used after a failed or timed-out close)."""
        with self._lock:
            self._holder = threading.get_ident()
            try:
                self._closing = self._lane.unusable = True
                self._stop_now = True
                call = self._call
                self._cond.notify_all()
            finally:
                self._holder = None
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(self._config.close_timeout)

    # ---- the sender's side ---------------------------------------------------------------------------
    def _cut(self) -> PendingBatch:
        series, points = self._buffer.cut(self._policy.max_points)
        self._last_cut = self._clock()
        self._woken = False
        batch = self._outbox.add(series, points)
        self._reset_threshold()
        return batch

    def _has_work(self) -> bool:
        return bool(self._buffer.points or len(self._outbox))

    def _run(self) -> None:
        try:
            self._send_until_closed()
        except BaseException as exc:
            # Whatever ends the sender must reach the callers: flush() and finish() would otherwise wait forever
            # on points nobody sends any more.
            _LOGGER.exception("metric sender of run %s failed", self.run_id)
            self._fail(errors.RunledgerError(f"metric sender failed: {exc!r}", reason="CLIENT_ERROR"))
            if not isinstance(exc, Exception):
                raise
        finally:
            _process.untrack_exit(self)

    def _send_until_closed(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not self._stop_now and not self._has_work():
                    if self._closing:
                        return
                    self._cond.wait(self._policy.max_delay)  # nothing to send: poll for new points
                if self._stop_now:
                    return
            if not self._numbered and not self._learn_first_seq():
                return
            with self._lock:
                conn = self._conn = _Connection(self._outbox.first_unacked())
                self._connections += 1
            error: errors.RunledgerError | None = None
            progressed = False
            call: Any = None
            try:
                call = self._open_stream(self._requests(conn))
                with self._lock:
                    self._call = call
                    stop_now = self._stop_now
                if stop_now:
                    call.cancel()
                for ack in call:
                    progressed |= self._on_ack(conn, ack)
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
            except errors.RunledgerError as exc:  # refused by this client (a reused writer_id, a closed client)
                error = exc
                if call is not None:
                    call.cancel()
            except Exception as exc:  # e.g. the channel was closed under us: nothing will ever be sent
                if call is not None:
                    call.cancel()
                _LOGGER.exception("metric sender of run %s failed", self.run_id)
                self._fail(errors.RunledgerError(f"metric stream failed: {exc!r}", reason="CLIENT_ERROR"))
                return
            finally:
                with self._lock:
                    conn.stopped = True
                    self._call = None
                    self._cond.notify_all()
            with self._lock:
                if self._stop_now or self._error is not None:  # stopped, or failed for good (a batch not encodable)
                    return
                if error is None and len(self._outbox) and conn.cursor > self._outbox.first_unacked():
                    error = errors.Unavailable("the server ended the metric stream before acknowledging every batch")
            if progressed:
                failures = 0
            if error is None:
                continue
            if not errors.is_transient(error):
                self._fail(error)
                return
            failures += 1
            delay = self._config.retry.delay(failures, self._rand())
            _LOGGER.info(
                "metric stream of run %s interrupted (%s); retrying in %.2f s with %d unacknowledged batches",
                self.run_id,
                error,
                delay,
                len(self._outbox),
            )
            with self._lock:
                self._last_transient = error
                resume = self._clock() + delay
                while not self._stop_now and (left := resume - self._clock()) > 0:
                    self._cond.wait(left)

    def _learn_first_seq(self) -> bool:
        """Ask the server where this writer's numbering continues (retrying while it is unreachable), before
        any batch is cut; False when the sender must stop (stopped, or refused for good)."""
        assert self._first_seq is not None
        failures = 0
        while True:
            try:
                first = self._first_seq()
            except errors.RunledgerError as exc:
                if not errors.is_transient(exc):
                    self._fail(exc)
                    return False
                failures += 1
                delay = self._config.retry.delay(failures, self._rand())
                _LOGGER.info(
                    "run %s: cannot ask where writer %s resumes (%s); retrying", self.run_id, self.writer_id, exc
                )
                with self._lock:
                    self._last_transient = exc
                    resume = self._clock() + delay
                    while not self._stop_now and (left := resume - self._clock()) > 0:
                        self._cond.wait(left)
                    if self._stop_now:
                        return False
                continue
            with self._lock:
                if first:
                    _LOGGER.info("run %s: writer %s resumes at batch %d", self.run_id, self.writer_id, first)
                self._outbox.next_seq = first  # nothing is cut before this: no batch holds a seq yet
                self._numbered = True
                self._cond.notify_all()
            return True

    def _fail(self, error: errors.RunledgerError) -> None:
        with self._lock:
            self._fail_locked(error)

    def _fail_locked(self, error: errors.RunledgerError, lost: int = 0) -> None:
        if self._error is None:
            unstored = self._outbox.points + self._buffer.points + lost
            self._lost_at_failure = unstored
            error.metadata.setdefault("unstoredPoints", str(unstored))
            self._error = error
            self._lane.unusable = True
            _LOGGER.error("metric stream of run %s failed: %s (%d points not stored)", self.run_id, error, unstored)
        self._cond.notify_all()

    def _on_ack(self, conn: _Connection, ack: pb.StreamMetricsResponse) -> bool:
        with self._lock:
            batch = self._outbox.ack(ack.seq)
            if batch is None:
                return False
            conn.in_flight -= 1
            if ack.duplicate and batch.attempts <= 1:
                # Sent once and already stored: another writer used this writer_id on this run, so the
                # server kept its batch and dropped ours. Refuse loudly rather than lose points quietly.
                error = errors.AlreadyExists(
                    f"writer_id {self.writer_id!r} had already written batch {ack.seq} to run {self.run_id}: "
                    "another writer uses the same writer_id, and the server kept its points instead of these. "
                    "Give each writer of a run its own writer_id (or leave it unset for a random one).",
                    reason="WRITER_ID_REUSED",
                    metadata={"runId": self.run_id, "writerId": self.writer_id, "seq": str(ack.seq)},
                )
                self._dropped += batch.points
                self._fail_locked(error, lost=batch.points)
                raise error
            self._acked += batch.points
            self._reset_threshold()
            self._cond.notify_all()
            return True

    def _next_to_send(self, conn: _Connection) -> PendingBatch | None:
        """Under the lock: the next batch for this connection, cutting a new one when due; None ends the stream."""
        policy = self._policy
        while True:
            if conn.stopped or self._stop_now:
                return None
            if conn.in_flight < self._config.max_in_flight:
                batch = self._outbox.get(conn.cursor)
                if batch is None:
                    force = self._blocked > 0 or self._closing
                    if policy.due(self._buffer.points, self._clock() - self._last_cut, force=force):
                        batch = self._cut()
                if batch is not None:
                    return batch
                if self._closing and not self._buffer.points and conn.cursor >= self._outbox.next_seq:
                    return None  # everything is sent: half-close; the server acks the rest and ends the call
                wait = policy.max_delay - (self._clock() - self._last_cut) if self._buffer.points else policy.max_delay
                self._cond.wait(max(wait, 0.001))
            else:
                self._cond.wait()

    def _requests(self, conn: _Connection) -> Iterator[bytes]:
        """Runs on gRPC's request-consuming thread: waits for batches, builds their messages, yields them."""
        while True:
            with self._lock:
                batch = self._next_to_send(conn)
                if batch is None:
                    return
                conn.cursor = batch.seq + 1
                conn.in_flight += 1
                batch.attempts += 1
                if batch.attempts > 1:
                    self._resent += 1
            message = batch.message
            if message is None:
                series = batch.series
                if series is None:  # another connection built it meanwhile
                    message = batch.message
                else:
                    try:
                        message = build_request(self.run_id, self.writer_id, batch.seq, series)
                    except Exception as exc:
                        # A batch that cannot be built never will be: fail for good, or every reconnection
                        # would stop at it again (gRPC reports it as an UNKNOWN status, which is retried).
                        _LOGGER.exception("metric batch %d of run %s cannot be encoded", batch.seq, self.run_id)
                        self._fail(
                            errors.RunledgerError(f"metric batch cannot be encoded: {exc!r}", reason="CLIENT_ERROR")
                        )
                        return
                    batch.message = message
                    batch.series = None
            yield message


# Signals whose handlers (Python's, or a user's) may raise in the thread they interrupt.
_DEFERRED_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
}


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """On the main thread (where Python runs signal handlers), hold these signals until the block ends, so their
    handlers (KeyboardInterrupt) run after it rather than in the middle. Elsewhere, or without sigmasks: nothing.

    Only signals sent to the main thread are held: one sent to the process (a terminal's Ctrl-C, `kill`) is
    delivered to another thread that does not block it, and its handler still runs in the main thread inside
    the block.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # read only: nothing to undo if a handler fires here
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
