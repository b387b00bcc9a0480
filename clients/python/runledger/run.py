"""A run as a trainer holds it: log metrics without waiting, record params, tags and lineage, finish with a status."""

from __future__ import annotations

import logging
import operator
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from runledger import _convert, _ids, _process, _reentry, errors
from runledger._buffer import INT64_MAX, INT64_MIN
from runledger._streamer import FINISHING, MetricStreamer
from runledger.artifacts import Progress
from runledger.v1 import artifact_pb2, tracking_pb2, tracking_service_pb2 as pb

if TYPE_CHECKING:
    from runledger.client import Client

_LOGGER = logging.getLogger(__name__)

_DEFAULT_FAILED_EXIT_TIMEOUT = 60.0
# sys.exit(128 + signal) from a SIGINT or SIGTERM handler (a preempted job): the run was stopped, not broken.
_KILLED_EXIT_CODES = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM})
_INTERRUPTED_STATUS_TIMEOUT = 2.0  # marking a run KILLED after Ctrl-C: the person waiting should not wait long
_time_ns = time.time_ns


class Run:
    """One writer of one run. Made by `Client.start_run` (owns the run's status) or `Client.attach_run`.

    `log_metrics` appends to a buffer and returns; a background sender streams the points and re-sends
    what the server has not acknowledged, across reconnections. Use it as a context manager: on exit it
    flushes and sets FINISHED (also on sys.exit(0)), or FAILED (KILLED on KeyboardInterrupt) when an
    exception escapes.
    """

    def __init__(self, client: Client, info: tracking_pb2.Run, *, writer_id: str | None, owns_status: bool) -> None:
        """`writer_id` None: a fresh random one. A writer_id the caller chose may have written to this run
        before (a restarted job keeps its rank's ID): its batches are then numbered on from where it stopped."""
        self._client = client
        self.info = info
        self.run_id = info.run_id
        self.writer_id = writer_id or _ids.new_writer_id()
        self._resumable = writer_id is not None
        self.owns_status = owns_status
        self._stream: MetricStreamer | None = None
        self._fast_append: Callable[[Mapping[str, float], int, int | None], bool] | None = None  # the stream's
        self._dropped: weakref.finalize | None = None  # ends the stream when this object is collected
        self._lock = threading.Lock()
        self._opening: int | None = None  # the thread holding the lock while it opens the metric stream
        self._closed = False  # finish() began: no new metric stream is opened
        self._finished = False  # finish() completed: calling it again does nothing
        _process.track(self)

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r}, writer_id={self.writer_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a runledger Run cannot be pickled (its metrics stream belongs to this process): pass the run ID "
            f"{self.run_id!r} to a spawn or forkserver worker, which logs through Client(address).attach_run(run_id)"
        )

    # ---- identity ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The resource name, `runs/{run_id}`."""
        return self.info.name or f"runs/{self.run_id}"

    @property
    def experiment(self) -> str:
        return self.info.experiment

    @property
    def lineage_fingerprint(self) -> str:
        """The server's fingerprint of the complete lineage; empty while a field is missing."""
        return self.info.lineage_fingerprint

    @property
    def missing_lineage_fields(self) -> list[str]:
        return list(self.info.missing_lineage_fields)

    # ---- metrics -------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], *, step: int, timestamp_ms: int | None = None) -> None:
        """Queue one point per key at `step` and return; NaN and infinities are kept as they are.

        Blocks only when the buffer is full (`max_buffered_points` logged and not yet acknowledged), until
        acknowledgements free room: points are never dropped. Raises the error that stopped the sender, if any.
        """
        fast = self._fast_append
        if fast is not None and fast(metrics, step, timestamp_ms):
            return  # the usual call, done in C: see _rowbuffer.c
        if type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
            step = _int64(step, "step")
        stream = self._stream
        if stream is None:
            stream = self._open_stream()
        stream.append(
            metrics, step, _time_ns() // 1_000_000 if timestamp_ms is None else _int64(timestamp_ms, "timestamp_ms")
        )

    def log_series(
        self,
        metrics: Mapping[str, Any],
        *,
        steps: Any,
        timestamps_ms: Any = None,
    ) -> None:
        """Queue many steps at once: `metrics` maps each key to an array of values, one per entry of `steps`.

        For loops that already hold their metrics as arrays (vectorized environments, per-token statistics,
        imports from another tracker): no Python work per point. Every key gets a value at every step (NaN
        and infinities are kept as they are); `timestamps_ms` is one per step, or the current time for all.
        Validated whole: a bad argument raises InvalidArgument and queues nothing.
        """
        columns = _series_columns(metrics, steps, timestamps_ms)
        stream = self._stream
        if stream is None:
            stream = self._open_stream()
        stream.append_columns(*columns)

    def _open_stream(self) -> MetricStreamer:
        self._check_not_reentered("logging metrics")
        with self._lock:
            self._opening = threading.get_ident()  # a while: a signal handler may run meanwhile (see _reentry)
            try:
                if self._stream is None:
                    if self._closed:
                        raise errors.FailedPrecondition(
                            f"run {self.run_id} is finished; no more metrics can be logged through this object",
                            reason="RUN_CLOSED",
                            metadata={"runId": self.run_id},
                        )
                    self._stream = self._client._metric_streamer(self.run_id, self.writer_id, resumable=self._resumable)
                    self._fast_append = self._stream.fast_append
                    # A Run dropped without finish(): its sender sends what it holds, then ends, instead of
                    # polling for points nobody can log any more for the life of the process (at exit, the exit
                    # flush acts).
                    self._dropped = weakref.finalize(self, self._stream.close_when_sent)
                    self._dropped.atexit = False
                return self._stream
            finally:
                self._opening = None

    def _check_not_reentered(self, what: str) -> None:
        """Refuse a signal handler's call that would wait for the run's lock, held by its own thread further up."""
        if self._opening == threading.get_ident():
            raise _reentry.refused(
                f"{what} on run {self.run_id}", "the first log call opening its stream", {"runId": self.run_id}
            )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every point logged so far is stored; raises DeadlineExceeded after `timeout` seconds
        (the points stay queued and keep being sent), or the error that stopped the sender."""
        stream = self._stream
        if stream is not None:
            stream.flush(timeout)

    @property
    def logged_points(self) -> int:
        stream = self._stream
        return 0 if stream is None else stream.logged_points

    @property
    def acked_points(self) -> int:
        """Points the server has acknowledged as stored (by this object, since it was created or forked)."""
        stream = self._stream
        return 0 if stream is None else stream.acked_points

    @property
    def reconnections(self) -> int:
        """How many times the metric stream was re-opened after a failure."""
        stream = self._stream
        return 0 if stream is None else max(0, stream.connections - 1)

    @property
    def in_flight_batches(self) -> int:
        """Batches sent and awaiting their acknowledgement on the current connection."""
        stream = self._stream
        return 0 if stream is None else stream.in_flight_batches

    @property
    def resent_batches(self) -> int:
        """Batches sent again after a reconnection because their acknowledgement never came."""
        stream = self._stream
        return 0 if stream is None else stream.resent_batches

    # ---- params, tags, lineage, eval results ---------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Record immutable params; the same value again is a no-op, a different one raises AlreadyExists."""
        return self._client.log_params(self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any], *, remove: Sequence[str] = ()) -> dict[str, str]:
        return self._client.set_tags(self.run_id, tags, remove=remove)

    def set_lineage(self, lineage: Mapping[str, Any]) -> pb.SetLineageResponse:
        """Record lineage fields; once all five are known, `lineage_fingerprint` holds the server's fingerprint."""
        response = self._client.set_lineage(self.run_id, lineage)
        self.info.lineage.CopyFrom(response.lineage)
        self.info.lineage_fingerprint = response.fingerprint
        del self.info.missing_lineage_fields[:]
        self.info.missing_lineage_fields.extend(response.missing_fields)
        return response

    def log_eval_result(self, *, suite_fingerprint: str, metrics: Mapping[str, float]) -> tracking_pb2.EvalResult:
        return self._client.log_eval_result(self.run_id, suite_fingerprint=suite_fingerprint, metrics=metrics)

    def log_artifact(
        self, local_path: str | os.PathLike[str], artifact_path: str | None = None, *, progress: Progress = None
    ) -> list[artifact_pb2.Artifact]:
        """Upload a file or a directory (a checkpoint, a LoRA adapter folder) as this run's artifact(s)."""
        return self._client.log_artifact(self.run_id, local_path, artifact_path, progress=progress)

    def refresh(self) -> tracking_pb2.Run:
        """Re-read the run from the server (status, params, tags, latest metrics)."""
        self.info = self._client.get_run(self.run_id)
        return self.info

    # ---- end -----------------------------------------------------------------------------------------
    def finish(self, status: str | None = None, *, timeout: float | None = None) -> None:
        """Flush every logged point, stop the sender and set the status.

        `status` defaults to FINISHED for a run this object started and to "unchanged" for an attached one.
        When the flush fails or `timeout` expires, the points not yet stored are given up, the run is marked
        FAILED (if this object owns its status) and the error is raised. When only setting the status fails
        (the server unreachable for a moment), the points are stored and calling it again sets the status.
        Once it has succeeded, calling it again does nothing.
        """
        if status is not None:
            _convert.run_status(status)  # a status the server would refuse is refused before anything closes
        self._check_not_reentered("finish")  # from a signal handler that interrupted the first log call
        stream = self._stream
        if stream is not None:
            stream.check_not_reentered("finish")  # from a signal handler that interrupted log_metrics
        with self._lock:
            if self._finished:
                return
            self._closed = True
            stream = self._stream
        if status is None and self.owns_status:
            status = "FINISHED"
        if stream is not None:
            try:
                stream.close(timeout)
            except errors.RunledgerError as exc:
                failure = stream.abandon_after(exc)
                with self._lock:
                    self._finished = True  # the points are given up: nothing a second call could change
                if status is not None:  # a stop asked for (Ctrl-C, SIGTERM) stays KILLED; the server was just
                    # unreachable or refusing for the whole flush, so trying again is brief
                    self._set_status_quietly(
                        "KILLED" if status == "KILLED" else "FAILED", timeout=_INTERRUPTED_STATUS_TIMEOUT
                    )
                if failure is exc:
                    raise
                raise failure from exc
            except (KeyboardInterrupt, SystemExit):
                # Interrupted (Ctrl-C) while the points were being flushed: they stay queued, for the flush at
                # exit to deliver, and the run is marked KILLED, briefly trying, since someone is waiting.
                if status is not None:
                    self._set_status_quietly("KILLED", timeout=_INTERRUPTED_STATUS_TIMEOUT)
                raise
        if status is not None:
            self.info = self._client.update_run(self.run_id, status=status)
        with self._lock:
            self._finished = True

    def _set_status_quietly(self, status: str, timeout: float | None = None) -> None:
        try:
            self.info = self._client.update_run(self.run_id, status=status, timeout=timeout)
        except errors.RunledgerError as exc:
            _LOGGER.warning("could not mark run %s %s: %s", self.run_id, status, exc)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            # sys.exit(0) inside the block (a script ending early, a handler stopping cleanly) is a success
            self.finish(timeout=self._client.finish_timeout)
            return
        killed = issubclass(exc_type, KeyboardInterrupt) or (
            isinstance(exc, SystemExit) and exc.code in _KILLED_EXIT_CODES
        )
        status = "KILLED" if killed else "FAILED"
        timeout = self._client.finish_timeout
        if timeout is None:
            timeout = _DEFAULT_FAILED_EXIT_TIMEOUT
        stream = self._stream
        unsent = 0 if stream is None else stream.logged_points - stream.acked_points
        if killed and unsent > 0 and stream is not None:
            # Someone is waiting for the process to end, and with the server away the wait can be long: say
            # why at once (the library's log is silent unless the application configures logging).
            stream.wait_said = FINISHING  # its finish below need not say it again
            print(
                f"runledger: run {self.run_id} stopped; storing up to {unsent:,} points it still holds (for up "
                f"to {timeout:g} s; interrupt again to give them up)",
                file=sys.stderr,
                flush=True,
            )
        try:
            self.finish(status if self.owns_status else None, timeout=timeout)
        except errors.RunledgerError as err:
            _LOGGER.warning("run %s: %s (while handling %s)", self.run_id, err, exc_type.__name__)
        except KeyboardInterrupt:
            if killed and stream is not None:  # interrupted again, as the notice offered: give the points up
                # now, or the exit flush would wait for them once more (a third Ctrl-C, with nothing said)
                given_up = stream.logged_points - stream.acked_points
                stream.abandon()
                print(f"runledger: run {self.run_id}: gave up {given_up:,} points", file=sys.stderr, flush=True)
            raise

    # ---- process lifecycle ---------------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        # The parent's sender thread does not exist here and its lock may be held forever: start afresh,
        # as a new writer, so the child's batches never collide with the parent's seqs.
        _process.keep_inherited(self._stream)
        if self._dropped is not None:
            self._dropped.detach()  # the parent's stream: its lock may be held by a thread the child does not have
            self._dropped = None
        self._stream = None
        self._fast_append = None  # it appends to the parent's stream
        self._lock = threading.Lock()
        self._opening = None
        self.writer_id = _ids.forked_writer_id(self.writer_id)
        self._resumable = False  # a new writer: nothing to continue from
        self.owns_status = False


def _int64(value: Any, field: str) -> int:
    """An int64 argument (an int, or anything with __index__ such as numpy integers), else InvalidArgument."""
    try:
        if isinstance(value, (bool, np.bool_)):  # True is an int to Python, but never a step someone meant
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise errors.InvalidArgument(
            f"{field} must be an integer, got {type(value).__name__}",
            reason="INVALID_ARGUMENT",
            metadata={"field": field},
        ) from None
    if number > INT64_MAX or number < INT64_MIN:
        raise errors.InvalidArgument(
            f"{field} {number} does not fit in int64", reason="INVALID_ARGUMENT", metadata={"field": field}
        )
    return number


def _series_columns(
    metrics: Mapping[str, Any], steps: Any, timestamps_ms: Any
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(keys, steps, timestamps_ms, values n x len(keys)) checked for log_series."""
    step_array = _int64_array(steps, "steps")
    n = step_array.shape[0]
    if timestamps_ms is None:
        stamps = np.full(n, _time_ns() // 1_000_000, dtype=np.int64)
    else:
        stamps = _int64_array(timestamps_ms, "timestamps_ms")
        if stamps.shape[0] != n:
            raise errors.InvalidArgument(
                f"timestamps_ms has {stamps.shape[0]} entries for {n} steps", reason="INVALID_ARGUMENT"
            )
    keys = tuple(_convert.mapping(metrics, "metrics"))
    values = np.empty((n, len(keys)), dtype=np.float64)
    for j, key in enumerate(keys):
        try:
            column = _float_column(metrics[key])
        except (TypeError, ValueError, OverflowError) as exc:
            raise errors.InvalidArgument(
                f"values of metric {key!r} must be numbers: {exc}",
                reason="INVALID_ARGUMENT",
                metadata={"field": f"metrics[{key}]"},
            ) from None
        if column.shape != (n,):
            raise errors.InvalidArgument(
                f"metric {key!r} has values of shape {column.shape} for {n} steps", reason="INVALID_ARGUMENT"
            )
        values[:, j] = column
    return keys, step_array, stamps, values


def _float_column(data: Any) -> np.ndarray:
    """float64 values from an array or a sequence of numbers; text is refused, as `log_metrics` refuses it."""
    raw = np.asarray(data)
    if raw.dtype.kind in "USV":
        raise TypeError(f"a number is required, not {raw.dtype}")
    if raw.dtype.kind == "O":  # Decimals, tensors, mixed objects: each converted as log_metrics converts it
        return np.array([_convert.as_float(v) for v in raw.ravel()], dtype=np.float64).reshape(raw.shape)
    return raw.astype(np.float64, copy=False)


def _int64_array(data: Any, field: str) -> np.ndarray:
    """A 1-D int64 array from integers (numpy integer arrays or Python ints), else InvalidArgument."""
    try:
        array = np.asarray(data)
        if array.dtype.kind == "O":  # Python ints beyond int64 (or mixed objects)
            array = np.asarray(data, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.InvalidArgument(f"{field} must be int64 integers: {exc}", reason="INVALID_ARGUMENT") from None
    if array.ndim != 1:
        raise errors.InvalidArgument(
            f"{field} must be one-dimensional, got shape {array.shape}", reason="INVALID_ARGUMENT"
        )
    if array.dtype.kind == "u" and array.size and int(array.max()) > INT64_MAX:
        raise errors.InvalidArgument(f"{field} do not fit in int64", reason="INVALID_ARGUMENT")
    if array.dtype.kind not in "iu" and array.size:
        raise errors.InvalidArgument(f"{field} must be integers, got {array.dtype}", reason="INVALID_ARGUMENT")
    # Always a copy: the points are queued, and a caller may refill its array for the next call meanwhile.
    return np.array(array, dtype=np.int64, order="C", copy=True)
