"""The entry point trainers import: one channel to a runledger server, typed errors, runs that stream metrics."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from runledger import _convert, _ids, _process, _reentry, artifacts, errors, wire
from runledger._buffer import BatchPolicy
from runledger._call_metadata import with_metadata
from runledger._retry import NO_LIMIT, RetryPolicy, call_with_retry
from runledger._streamer import MetricStreamer, StreamerConfig
from runledger.history import MetricHistory, from_call
from runledger.registry import AliasWatch, Registry
from runledger.run import Run
from runledger.v1 import (
    artifact_pb2,
    registry_pb2,
    registry_service_pb2,
    tracking_pb2,
    tracking_service_pb2 as pb,
    tracking_service_pb2_grpc,
)

_LOGGER = logging.getLogger(__name__)
_HISTORY_METHOD = "/runledger.v1.TrackingService/GetMetricHistory"
_STREAM_METHOD = "/runledger.v1.TrackingService/StreamMetrics"

T = TypeVar("T")
StubT = TypeVar("StubT")
# A run, by ID or as the Run a client started or the Run message a call returned.
RunRef = str | Run | tracking_pb2.Run


def run_id_of(run: object, field: str = "run_id") -> str:
    """The ID of a run given as its ID, a Run or a Run message; InvalidArgument naming `field` otherwise."""
    if isinstance(run, str):
        return run
    if isinstance(run, (Run, tracking_pb2.Run)):
        return run.run_id
    raise errors.InvalidArgument(
        f"{field} must be a run ID or a Run, got {type(run).__name__}",
        reason="INVALID_ARGUMENT",
        metadata={"field": field},
    )


_EXPERIMENT_NAME = re.compile(r"^experiments/[a-z0-9][a-z0-9-]{0,63}$")

# The channel reconnects on its own schedule too: keep it short so a restarted server is found quickly.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Ping every 20 s, also between calls, and give up on a connection after 10 s without an answer: a silent
    # network partition then fails the metric stream (which reconnects and re-sends) instead of hanging it.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),  # what grpcio's keepalive waits for a ping's answer (60 s otherwise)
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Connections of its own: a channel made in a forked child must not pick up the parent's from the shared pool.
    ("grpc.use_local_subchannel_pool", 1),
)


class Client:
    """A connection to a runledger server.

    >>> client = Client("127.0.0.1:50051")
    >>> with client.start_run(experiment="qwen3-sft", params={"lr": 2e-5}) as run:
    ...     run.log_metrics({"train/loss": 0.82}, step=0)

    Every method raises `runledger.errors.RunledgerError` subclasses, never a raw `grpc.RpcError`.
    A call waits up to `timeout` seconds for the server to be reachable before it is sent (a server restarting
    meanwhile is waited for; one never reached, e.g. a wrong address, is Unavailable `SERVER_UNREACHABLE` after
    `timeout`). Calls that are safe to repeat are also retried on UNAVAILABLE until `timeout` has passed
    (None or `math.inf`: as long as it takes).
    Responses are the API's protobuf messages (`runledger.v1`), except `Run` and `MetricHistory`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        writer_id: str | None = None,
        max_buffered_points: int = 2_000_000,
        batch_points: int = 16_384,
        batch_interval: float = 0.05,
        max_in_flight: int = 32,
        retry: RetryPolicy | None = None,
        finish_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`writer_id`: the default writer ID of this client's runs (e.g. f"rank{rank}"), kept by a restarted job
        so that each writer continues its numbering; a random one when unset.
        `finish_timeout`: how long a run's context exit waits for its metrics to be stored (None: as long as it
        takes on success, 60 s when an exception is already escaping). `batch_points`: points per batch sent,
        at most 1,000,000 (the server's limit; ValueError above it)."""
        self.target = target
        self.timeout = timeout
        self.writer_id = None if writer_id is None else _ids.check_writer_id(writer_id)
        self.finish_timeout = finish_timeout
        self.retry = retry or RetryPolicy()
        self.streamer_config = StreamerConfig(
            max_buffered_points=max_buffered_points,
            batch=BatchPolicy(max_points=batch_points, max_delay=batch_interval),
            max_in_flight=max_in_flight,
            retry=self.retry,
        )
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._options = _CHANNEL_OPTIONS + tuple(options)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        # Everything built on the channel (stubs by class, the artifact channel by name): dropped with the channel.
        self._stubs: dict[Any, Any] = {}
        self._closing = self._closed = False
        self._closed_event = threading.Event()  # set once close() has finished
        self._closer: int | None = None  # the thread running close()
        self._starting: int | None = None  # the thread holding the lock while it starts a metric sender
        self._streamers: weakref.WeakSet[MetricStreamer] = weakref.WeakSet()  # what close() sends before it closes
        _process.track(self)

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # ---- plumbing shared by every service module ----------------------------------------------------
    @property
    def channel(self) -> grpc.Channel:
        self._check_not_reentered("a call of the client")
        with self._lock:
            if self._closed:
                raise errors.FailedPrecondition("the client is closed", reason="CLIENT_CLOSED")
            if self._channel is None:
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(self.target, options=self._options)
                else:
                    self._channel = grpc.secure_channel(self.target, self._credentials, options=self._options)
            return self._channel

    def _stub(self, stub_class: Callable[[grpc.Channel], StubT]) -> StubT:
        """The cached stub of a service (e.g. `RegistryServiceStub`) on this client's channel."""
        stub = self._stubs.get(stub_class)
        if stub is None:
            stub = self._stubs[stub_class] = stub_class(self.channel)
        return stub

    @property
    def _tracking(self) -> tracking_service_pb2_grpc.TrackingServiceStub:
        return self._stub(tracking_service_pb2_grpc.TrackingServiceStub)

    @property
    def _stream_metrics_call(self) -> Any:
        """StreamMetrics taking requests already serialized by the sender (`_streamer.build_request`)."""
        return self._method("stream_stream", _STREAM_METHOD, _as_is, pb.StreamMetricsResponse.FromString)

    @property
    def _history_call(self) -> Any:
        """GetMetricHistory decoding each message straight into numpy views (wire.decode_series)."""
        return self._method(
            "unary_stream", _HISTORY_METHOD, pb.GetMetricHistoryRequest.SerializeToString, wire.decode_series
        )

    def _method(self, kind: str, path: str, serializer: Callable[..., Any], deserializer: Callable[..., Any]) -> Any:
        """A method of this client's channel with its own (de)serializers, cached like the stubs."""
        call = self._stubs.get(path)
        if call is None:
            call = self._stubs[path] = getattr(self.channel, kind)(
                path, request_serializer=serializer, response_deserializer=deserializer
            )
        return call

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        idempotent: bool,
        timeout: float | None = None,
    ) -> T:
        """Invoke a unary RPC; UNAVAILABLE is retried with backoff for idempotent calls until the deadline."""
        return self._retrying(
            lambda remaining: method(request, timeout=remaining, metadata=self._metadata, wait_for_ready=True),
            idempotent,
            timeout,
        )

    def _retrying(self, attempt: Callable[[float], T], idempotent: bool, timeout: float | None) -> T:
        budget = self.timeout if timeout is None else timeout
        return call_with_retry(
            attempt, self.retry, idempotent=idempotent, budget=budget, target=self.target, channel=self._channel
        )

    def close(self, timeout: float | None = None) -> None:
        """Store what this client's runs still hold, then close the channel (calling it again does nothing).

        Every point logged through a run of this client is sent first, for up to `timeout` seconds in all (the
        client's timeout when None); runs keep their status (finish them for that). When a run's points cannot
        be stored in time, the channel is closed anyway, those points are lost, and the first error is raised
        (DeadlineExceeded FLUSH_TIMEOUT, or what stopped the run's sender).
        """
        self._check_not_reentered("close")
        with self._lock:
            streamers = list(self._streamers)
        for streamer in streamers:  # from a signal handler inside log_metrics: refused before anything closes
            streamer.check_not_reentered("close")
        with self._lock:
            first = not self._closing
            self._closing = True  # no new metric senders; the channel stays open for the ones being flushed
            streamers = list(self._streamers)
            closer = self._closer
            if first:
                self._closer = threading.get_ident()
        if not first:
            if closer == threading.get_ident() and not self._closed_event.is_set():
                raise errors.FailedPrecondition(  # a signal handler that interrupted this thread's close
                    "close() was called while this thread is inside close() (from a signal handler?): the "
                    "interrupted close goes on when the handler returns",
                    reason="REENTRANT_CALL",
                )
            self._closed_event.wait()  # another close is storing the points: return when it is done
            return
        try:
            budget = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + (NO_LIMIT if budget is None or budget > NO_LIMIT else budget)
            failure: errors.RunledgerError | None = None
            for streamer in streamers:
                if not streamer.sending:
                    # Finished, or stopped: its points are stored, or were lost when it stopped (say so, unless
                    # a call of the run has already raised that error).
                    failure = failure or streamer.unreported_error
                    continue
                try:
                    streamer.close(max(deadline - time.monotonic(), 0.0))
                except errors.RunledgerError as exc:
                    given_up = streamer.abandon_after(exc)  # every one, not only the first to fail
                    failure = failure or given_up
            with self._lock:
                self._closed = True
                channel, self._channel = self._channel, None
                self._stubs = {}
            if channel is not None:
                channel.close()
        finally:
            self._closed_event.set()
        if failure is not None:
            raise failure

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except errors.RunledgerError as err:
            if exc_type is None:
                raise
            _LOGGER.warning("closing %r: %s (while handling %s)", self, err, exc_type.__name__)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a runledger Client cannot be pickled (it holds a channel and threads): in a spawn or forkserver "
            f"worker, create Client({self.target!r}) there, and attach_run(run_id) to log into a run"
        )

    def _after_fork_in_child(self) -> None:
        _process.keep_inherited(self._channel)
        self._channel = None
        self._stubs = {}
        self._lock = threading.Lock()
        self._starting = None
        self._streamers = weakref.WeakSet()  # the parent's senders, which the child neither has nor sends for
        self._closed_event = threading.Event()
        if self._closing:  # closed, or closing, in the parent: closed here (no close of the parent's runs here)
            self._closed = True
            self._closed_event.set()
        if self.writer_id is not None:
            # The parent keeps writing as this writer: a child's runs must not number their batches alike.
            self.writer_id = _ids.forked_writer_id(self.writer_id)

    # ---- experiments --------------------------------------------------------------------------------
    def create_experiment(
        self, display_name: str, *, description: str = "", tags: Mapping[str, Any] | None = None
    ) -> tracking_pb2.Experiment:
        """Create an experiment; AlreadyExists when the display name is taken."""
        request = pb.CreateExperimentRequest(
            display_name=display_name, description=description, tags=_convert.string_map(tags, "tags")
        )
        return self._call(self._tracking.CreateExperiment, request, idempotent=False)

    def get_experiment(self, name: str) -> tracking_pb2.Experiment:
        """By resource name, `experiments/{experiment}`."""
        return self._call(self._tracking.GetExperiment, pb.GetExperimentRequest(name=name), idempotent=True)

    def get_or_create_experiment(
        self, display_name: str, *, description: str = "", tags: Mapping[str, Any] | None = None
    ) -> tracking_pb2.Experiment:
        """Get or create the experiment with this display name."""
        request = pb.CreateExperimentRequest(
            display_name=display_name, description=description, tags=_convert.string_map(tags, "tags")
        )
        try:
            return self._call(self._tracking.CreateExperiment, request, idempotent=True)
        except errors.AlreadyExists as exc:
            existing = exc.metadata.get("experiment")
            if not existing:
                raise
            return self.get_experiment(existing)

    def list_experiments(self, *, filter: str = "", page_size: int = 0) -> Iterator[tracking_pb2.Experiment]:
        """Every experiment matching `filter` (e.g. `display_name = "qwen3-sft"`), fetched page by page."""
        token = ""
        while True:
            request = pb.ListExperimentsRequest(filter=filter, page_size=page_size, page_token=token)
            page = self._call(self._tracking.ListExperiments, request, idempotent=True)
            yield from page.experiments
            token = page.next_page_token
            if not token:
                return

    def _experiment_name(self, experiment: str | tracking_pb2.Experiment) -> str:
        if isinstance(experiment, tracking_pb2.Experiment):
            return experiment.name
        if _EXPERIMENT_NAME.match(experiment):
            return experiment
        return self.get_or_create_experiment(experiment).name

    # ---- runs ---------------------------------------------------------------------------------------
    def start_run(
        self,
        *,
        experiment: str | tracking_pb2.Experiment,
        name: str = "",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        writer_id: str | None = None,
    ) -> Run:
        """Create a run (status RUNNING) and return it as a `Run` that owns its status.

        `experiment` is a display name (created when missing), `experiments/{id}` or an Experiment.
        `lineage` holds any of data_version, code_commit, config (a dict), base_model, seed; the server
        computes the fingerprint (`run.lineage_fingerprint`). `run_id` is chosen here when not given, which
        makes a retried create safe; a given `run_id` whose run is exactly what this call asks for and still
        running returns that run (a retry, or a restarted script), any other run of that ID is AlreadyExists
        (`RUN_EXISTS`; `resume_run` continues a run that stopped).
        """
        if writer_id:
            _ids.check_writer_id(writer_id)  # before the run is created, not when its first points are sent
        chosen = run_id or _ids.new_run_id()
        request = _convert.request(
            pb.CreateRunRequest,
            experiment=self._experiment_name(experiment),
            display_name=name,
            params=_convert.string_map(params, "params"),
            tags=_convert.string_map(tags, "tags"),
            run_id=chosen,
        )
        if lineage:
            request.lineage.CopyFrom(_convert.lineage_to_proto(lineage))
        try:
            info = self._call(self._tracking.CreateRun, request, idempotent=True)
        except errors.AlreadyExists:
            # A fresh random ID that exists: an earlier attempt of this very call was stored, its answer lost.
            # A caller's ID: the same, if the run is exactly what this call asks for and still running (also
            # what a restarted script with a fixed ID wants); any other run of that ID is a real conflict.
            info = self.get_run(chosen)
            if run_id is not None and not _is_created_by(info, request):
                status = tracking_pb2.RunStatus.Name(info.status).removeprefix("RUN_STATUS_")
                raise errors.AlreadyExists(
                    f"runs/{chosen} already exists ({status}) and is not what this call creates (a run that "
                    "stopped, or whose tags or params changed since): continue it with client.resume_run(run_id)",
                    reason="RUN_EXISTS",
                    metadata={"field": "run_id", "run": f"runs/{chosen}", "status": status},
                ) from None
        return Run(self, info, writer_id=writer_id or self.writer_id, owns_status=True)

    def resume_run(self, run_id: RunRef, *, writer_id: str | None = None) -> Run:
        """Continue a run that stopped (a crash, a preemption, more training after it finished), as MLflow's
        `start_run(run_id=...)` does: the run is RUNNING again (its end time cleared) and the returned `Run`
        owns its status, so leaving its `with` block marks it FINISHED, FAILED or KILLED. Params and lineage stay
        as recorded (they are immutable); tags may change. Pass the writer_id the stopped process used (e.g.
        f"rank{rank}") so that its metric batches are numbered on from what the server stored."""
        run_id = run_id_of(run_id)
        if writer_id:
            _ids.check_writer_id(writer_id)
        info = self.update_run(run_id, status="RUNNING")
        return Run(self, info, writer_id=writer_id or self.writer_id, owns_status=True)

    def attach_run(self, run_id: RunRef, *, writer_id: str | None = None) -> Run:
        """Another writer of an existing run (e.g. one rank of a distributed job). Its context exit flushes
        but leaves the run's status to the `Run` that started it. Each writer needs its own writer_id."""
        run_id = run_id_of(run_id)
        if writer_id:
            _ids.check_writer_id(writer_id)
        info = self.get_run(run_id)
        return Run(self, info, writer_id=writer_id or self.writer_id, owns_status=False)

    def get_run(self, run_id: RunRef) -> tracking_pb2.Run:
        run_id = run_id_of(run_id)
        return self._call(self._tracking.GetRun, pb.GetRunRequest(run_id=run_id), idempotent=True)

    def update_run(
        self,
        run_id: RunRef,
        *,
        status: str | int | None = None,
        display_name: str | None = None,
        timeout: float | None = None,
    ) -> tracking_pb2.Run:
        """Set the status (RUNNING, FINISHED, FAILED, KILLED; a final one records the end time) or the name."""
        run_id = run_id_of(run_id)
        request = pb.UpdateRunRequest(run_id=run_id)
        if status is not None:
            request.status = _convert.run_status(status)
        if display_name is not None:
            request.MergeFrom(_convert.request(pb.UpdateRunRequest, display_name=display_name))
        return self._call(self._tracking.UpdateRun, request, idempotent=True, timeout=timeout)

    def search_runs(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        experiments: Sequence[str | tracking_pb2.Experiment] = (),
        page_size: int = 0,
    ) -> Iterator[tracking_pb2.Run]:
        """Runs matching `filter` (e.g. `params.lr = "2e-05" AND metrics.`train/loss` < 0.5`), page by page.
        `experiments` are resource names, display names (looked up, never created) or Experiment messages;
        one of them alone is taken as a list of one."""
        if isinstance(experiments, (str, tracking_pb2.Experiment)):
            experiments = [experiments]
        names = [self._experiment_ref(e) for e in experiments]
        token = ""
        while True:
            request = _convert.request(
                pb.SearchRunsRequest,
                experiments=names,
                filter=filter,
                order_by=order_by,
                page_size=page_size,
                page_token=token,
            )
            page = self._call(self._tracking.SearchRuns, request, idempotent=True)
            yield from page.runs
            token = page.next_page_token
            if not token:
                return

    def log_params(self, run_id: RunRef, params: Mapping[str, Any]) -> dict[str, str]:
        """Record immutable params; returns all params of the run. A changed value raises AlreadyExists
        (reason PARAM_IMMUTABLE) and stores nothing of the call."""
        run_id = run_id_of(run_id)
        request = pb.LogParamsRequest(run_id=run_id, params=_convert.string_map(params, "params"))
        return dict(self._call(self._tracking.LogParams, request, idempotent=True).params)

    def set_tags(self, run_id: RunRef, tags: Mapping[str, Any], *, remove: Sequence[str] = ()) -> dict[str, str]:
        run_id = run_id_of(run_id)
        request = pb.SetTagsRequest(run_id=run_id, tags=_convert.string_map(tags, "tags"), remove_keys=list(remove))
        return dict(self._call(self._tracking.SetTags, request, idempotent=True).tags)

    def set_lineage(self, run_id: RunRef, lineage: Mapping[str, Any]) -> pb.SetLineageResponse:
        run_id = run_id_of(run_id)
        request = pb.SetLineageRequest(run_id=run_id, lineage=_convert.lineage_to_proto(lineage))
        return self._call(self._tracking.SetLineage, request, idempotent=True)

    # ---- metrics ------------------------------------------------------------------------------------
    def _metric_streamer(self, run_id: str, writer_id: str, *, resumable: bool) -> MetricStreamer:
        """`resumable`: the writer_id was chosen by the caller, so it may have written to the run before (a
        restarted job): its numbering continues where the server has it, instead of colliding at seq 0."""

        def open_stream(requests: Iterator[bytes]) -> Any:
            return self._stream_metrics_call(requests, metadata=self._metadata)

        def first_seq() -> int:
            request = pb.GetMetricWriterRequest(run_id=run_id, writer_id=writer_id)
            try:
                return int(self._call(self._tracking.GetMetricWriter, request, idempotent=True).next_seq)
            except errors.RunledgerError as exc:
                if exc.code is grpc.StatusCode.UNIMPLEMENTED:  # a server from before it: number from 0, as then
                    return 0
                raise

        self._check_not_reentered("logging metrics")
        with self._lock:  # registered before close() can take its list of senders to flush
            self._starting = threading.get_ident()  # a while (a thread starts): a signal handler may run meanwhile
            try:
                if self._closing:
                    raise errors.FailedPrecondition("the client is closed", reason="CLIENT_CLOSED")
                streamer = MetricStreamer(
                    run_id, writer_id, open_stream, self.streamer_config, first_seq=first_seq if resumable else None
                )
                self._streamers.add(streamer)
            finally:
                self._starting = None
        return streamer

    def _check_not_reentered(self, what: str) -> None:
        """Refuse a signal handler's call that would wait for the client's lock, held by its own thread."""
        if self._starting == threading.get_ident():
            raise _reentry.refused(what, "a first log call starting a run's metric sender")

    def metric_history(
        self,
        run_id: RunRef,
        key: str,
        *,
        start_step: int | None = None,
        end_step: int | None = None,
        max_points: int = 0,
        timeout: float | None = None,
    ) -> MetricHistory:
        """All points of one key in step order as numpy arrays (steps, values, timestamps_ms).

        `start_step`/`end_step` bound the range (inclusive); `max_points` > 0 downsamples on the server,
        keeping the first, the last, the minimum and the maximum. A range holding more points than the server
        reads at once (HISTORY_TOO_LARGE) is read in parts, within the one `timeout`; each part is downsampled to
        its share of `max_points` (and keeps at least its own first, last, minimum and maximum).
        """
        run_id = run_id_of(run_id)
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + (NO_LIMIT if budget is None or budget > NO_LIMIT else budget)
        request = _convert.request(
            pb.GetMetricHistoryRequest,
            run_id=run_id,
            key=key,
            max_points=max_points,
            start_step=start_step,
            end_step=end_step,
        )

        def attempt(remaining: float) -> MetricHistory:
            return from_call(self._history_call(request, timeout=remaining, metadata=self._metadata))

        try:
            return self._retrying(attempt, True, timeout)
        except errors.ResourceExhausted as exc:
            if exc.reason != "HISTORY_TOO_LARGE":
                raise
            low, high = int(exc.metadata["minStep"]), int(exc.metadata["maxStep"])
            if low >= high:
                raise  # one step holds more than a read: nothing smaller to ask for
        middle = low + (high - low) // 2
        share = -(-max_points // 2) if max_points else 0
        parts = [
            self.metric_history(
                run_id,
                key,
                start_step=lo,
                end_step=hi,
                max_points=share,
                timeout=max(deadline - time.monotonic(), 0.001),
            )
            for lo, hi in ((low, middle), (middle + 1, high))
        ]
        return MetricHistory(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    # ---- eval results and sweeps --------------------------------------------------------------------
    def log_eval_result(
        self, run_id: RunRef, *, suite_fingerprint: str, metrics: Mapping[str, float]
    ) -> tracking_pb2.EvalResult:
        """Record a run's scores on an eval suite (immutable: a changed score raises AlreadyExists)."""
        run_id = run_id_of(run_id)
        request = _convert.request(
            pb.LogEvalResultRequest,
            run_id=run_id,
            suite_fingerprint=suite_fingerprint,
            metrics=_convert.number_map(metrics, "metrics"),
        )
        return self._call(self._tracking.LogEvalResult, request, idempotent=True)

    def select_winner(
        self,
        *,
        metric: str,
        direction: str | int = "MAXIMIZE",
        run_ids: Sequence[str] = (),
        experiment: str | tracking_pb2.Experiment | None = None,
        filter: str = "",
        suite_fingerprint: str | None = None,
    ) -> pb.SelectWinnerResponse:
        """The best of `run_ids` (or of the experiment's runs matching `filter`) by an eval metric.

        Candidates scored on different suites raise FailedPrecondition (reason INCOMPARABLE_EVAL_SUITES)
        unless `suite_fingerprint` names the one to compare on. A single run ID is taken as a list of one.
        """
        optional = {} if suite_fingerprint is None else {"suite_fingerprint": suite_fingerprint}
        request = _convert.request(
            pb.SelectWinnerRequest,
            run_ids=[run_ids] if isinstance(run_ids, str) else list(run_ids),
            experiment=self._experiment_ref(experiment),
            filter=filter,
            metric=metric,
            direction=_convert.direction(direction),
            **optional,
        )
        return self._call(self._tracking.SelectWinner, request, idempotent=True)

    def _experiment_ref(self, experiment: str | tracking_pb2.Experiment | None) -> str:
        """A resource name for a read: a display name is looked up, never created."""
        if experiment is None:
            return ""
        if isinstance(experiment, tracking_pb2.Experiment):
            return experiment.name
        if _EXPERIMENT_NAME.match(experiment):
            return experiment
        quoted = experiment.replace("\\", "\\\\").replace('"', '\\"')
        for found in self.list_experiments(filter=f'display_name = "{quoted}"'):
            return found.name
        raise errors.NotFound(
            f"no experiment is named {experiment!r}", reason="NOT_FOUND", metadata={"field": "experiment"}
        )

    # ---- artifacts ----------------------------------------------------------------------------------
    def log_artifact(
        self,
        run_id: RunRef,
        local_path: str | os.PathLike[str],
        artifact_path: str | None = None,
        *,
        progress: artifacts.Progress = None,
    ) -> list[artifact_pb2.Artifact]:
        """Upload a file or a whole directory (e.g. a LoRA adapter folder) as the run's artifact(s).

        Bytes stream in 1 MiB chunks, are stored once by sha256, and are recorded only after the server has
        verified the digest. `artifact_path` defaults to the file or directory name. A server restarting
        meanwhile is waited for (within the client's timeout), and the file being sent is sent again.
        """
        run_id = run_id_of(run_id)
        channel = self._artifact_channel

        def retrying(attempt: Callable[[float], Any]) -> Any:
            return self._retrying(attempt, True, None)  # a repeat of an upload stores nothing new

        if Path(local_path).is_dir():
            return artifacts.upload_dir(
                channel, run_id, local_path, artifact_path, progress=progress, retrying=retrying, unary=self._read_call
            )
        return [artifacts.upload_file(channel, run_id, local_path, artifact_path, progress=progress, retrying=retrying)]

    def download_artifacts(
        self,
        run_id: RunRef,
        path: str,
        dest: str | os.PathLike[str],
        *,
        resume: bool = True,
        progress: artifacts.Progress = None,
    ) -> Path:
        """Download a file or a directory of a run to `dest`, checking every file's sha256 (DataLoss on
        mismatch) and resuming an interrupted download."""
        run_id = run_id_of(run_id)
        return artifacts.download(
            self._artifact_channel, run_id, path, dest, resume=resume, progress=progress, unary=self._read_call
        )

    def download_model(
        self,
        version: str | registry_pb2.ModelVersion,
        dest: str | os.PathLike[str],
        *,
        resume: bool = True,
        progress: artifacts.Progress = None,
    ) -> Path:
        """Download exactly what a model version registered (`"model@alias"`, `"model/versions/3"` or a
        ModelVersion), by content address: files added to the run's directory after registration are not
        part of the version. Every file is checked against its sha256 (DataLoss on mismatch)."""
        resolved = self.resolve(version) if isinstance(version, str) else version
        return artifacts.download_version(
            self._artifact_channel, resolved, dest, resume=resume, progress=progress, unary=self._read_call
        )

    def list_artifacts(self, run_id: RunRef, *, prefix: str = "") -> Iterator[artifact_pb2.Artifact]:
        run_id = run_id_of(run_id)
        return artifacts.list_artifacts(self._artifact_channel, run_id, prefix=prefix, unary=self._read_call)

    @property
    def _artifact_channel(self) -> grpc.Channel:
        """The channel with this client's metadata on every call: the transfers build their own calls."""
        channel = self._stubs.get("artifact-channel")
        if channel is None:
            channel = self._stubs["artifact-channel"] = with_metadata(self.channel, self._metadata)
        return channel

    def _read_call(self, method: Callable[..., Any], request: Any) -> Any:
        """A side-effect-free unary call with this client's deadline and retries (metadata comes from the channel
        it was made on)."""
        return self._retrying(lambda remaining: method(request, timeout=remaining, wait_for_ready=True), True, None)

    # ---- registry -----------------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """Every RegistryService call (models, versions, gates, aliases, history, watch)."""
        registry = self._stubs.get(Registry)
        if registry is None:
            registry = self._stubs[Registry] = Registry(
                self.channel, timeout=self.timeout, metadata=self._metadata, retry=self.retry
            )
        registry.timeout = self.timeout  # the client's, as it is now
        return registry

    def register(
        self, run: Run | str, *, model: str, artifact_path: str, description: str = "", create_model: bool = True
    ) -> registry_pb2.ModelVersion:
        """Register a run's artifact as the model's next version (the model is created when missing, unless
        `create_model=False`). Raises FailedPrecondition `BROKEN_LINEAGE`, naming every missing lineage field,
        when the run's lineage is incomplete."""
        return self.registry.register(
            run_id_of(run, "run"),
            model=model,
            artifact_path=artifact_path,
            description=description,
            create_model=create_model,
        )

    def create_gate(
        self,
        model: str,
        gate_id: str,
        *,
        suite_fingerprint: str,
        metric: str,
        threshold: float,
        direction: str | int = "MAXIMIZE",
    ) -> registry_pb2.Gate:
        """A frozen eval gate: the suite, metric, direction and pass mark a version must meet to take an alias."""
        return self.registry.create_gate(
            model, gate_id, suite_fingerprint=suite_fingerprint, metric=metric, threshold=threshold, direction=direction
        )

    def record_gate_result(self, model: str, gate_id: str, version: int, score: float) -> registry_pb2.GateResult:
        """The gate's own score for a version (a score the run logged about itself never counts)."""
        return self.registry.record_gate_result(model, gate_id, version, score)

    def set_alias(
        self, model: str, alias: str, version: int, *, gate: str, expected_revision: int | None = None
    ) -> registry_service_pb2.SetAliasResponse:
        """Atomically move the alias if the gate admits the version and it strictly beats the incumbent.
        Raises `PromotionRefused` (reason, candidate and incumbent scores) or `StaleRevision`."""
        return self.registry.set_alias(model, alias, version, gate=gate, expected_revision=expected_revision)

    def rollback_alias(self, model: str, alias: str, *, expected_revision: int | None = None) -> registry_pb2.Alias:
        return self.registry.rollback(model, alias, expected_revision=expected_revision)

    def resolve(self, ref: str) -> registry_pb2.ModelVersion:
        """The version `"model@alias"` points at (e.g. `client.resolve("qwen3-8b-sft@production")`)."""
        return self.registry.resolve(ref)

    def watch_alias(self, model: str, alias: str) -> AliasWatch:
        """Iterate the alias's current state, then every change; `close()` ends the watch."""
        return self.registry.watch_alias(model, alias)

    def alias_history(self, model: str, alias: str) -> Iterator[registry_pb2.AliasHistoryEntry]:
        return self.registry.alias_history(model, alias)


def _is_created_by(run: tracking_pb2.Run, request: pb.CreateRunRequest) -> bool:
    """Whether `run` is what `request` creates: same experiment, name, params and tags, the lineage fields it
    sets (config compared as JSON), and still RUNNING."""
    if (run.experiment, run.display_name, dict(run.params), dict(run.tags)) != (
        request.experiment,
        request.display_name,
        dict(request.params),
        dict(request.tags),
    ) or run.status != tracking_pb2.RUN_STATUS_RUNNING:
        return False
    for field, value in request.lineage.ListFields():
        stored = getattr(run.lineage, field.name)
        if field.name == "config" and _convert.same_json(stored, value):
            continue
        if stored != value:
            return False
    return True


def _as_is(request: bytes) -> bytes:
    return request
