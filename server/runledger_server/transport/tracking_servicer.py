"""TrackingService over gRPC (asyncio): requests become use-case calls run on a worker pool."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np

from runledger import wire
from runledger.v1 import tracking_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.domain.errors import InvalidArgument, Unavailable
from runledger_server.domain.metrics import Batch, Series, validate_batch
from runledger_server.services.tracking import INGEST_BARRIER_TIMEOUT_S, TrackingService
from runledger_server.transport import convert, registration
from runledger_server.transport.errors import abort, handle_errors, status_for
from runledger_server.transport.ingest_budget import POINT_BYTES, PointBudget

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
HISTORY_CHUNK_POINTS = 65_536
MAX_IN_FLIGHT_PER_STREAM = 64
CONCURRENT_SEARCHES = 4  # of the 16 worker threads (app.py)
UNARY_WAITING_BUDGETS = 4  # LogMetrics calls may wait for room with this many budgets' worth of batches in all


def add_to_server(servicer: TrackingServicer, server: Any) -> None:
    """Register like the generated `add_TrackingServiceServicer_to_server` (with checked decoding), except that
    GetMetricHistory may yield already serialized MetricSeries bytes, which go to the wire as they are."""

    def adjust(handlers: registration.Handlers) -> None:
        registration.pass_serialized(handlers, "GetMetricHistory")
        # Metric batches are decoded straight into numpy views (wire.decode_metrics_batch): building protobuf
        # arrays and copying them out again cost ~0.7 ms of the event loop per 16,000-point batch.
        for method in ("StreamMetrics", "LogMetrics"):
            handlers[method] = handlers[method]._replace(request_deserializer=_decode_batch)

    registration.register(tracking_service_pb2_grpc.add_TrackingServiceServicer_to_server, servicer, server, adjust)


_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the end of a request stream (not in grpc's stubs)


def _shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down; the batches acknowledged are stored: send the others again (to another "
        "replica, or this one restarted)",
        reason="SHUTTING_DOWN",
    )


def _decode_batch(data: bytes) -> wire.MetricsBatch | InvalidArgument:
    """A metric batch, or the refusal its handler raises: malformed bytes (truncated, invalid UTF-8, a packed
    array cut short) must come back INVALID_ARGUMENT, and a deserializer that raises ends the call otherwise."""
    try:
        return wire.decode_metrics_batch(data)
    except ValueError as exc:  # UnicodeDecodeError included
        return InvalidArgument(f"the metrics batch is not a valid message: {exc}", field="request")


def history_messages(key: str, pieces: list[Series], limit: int) -> Iterator[bytes]:
    """Serialized MetricSeries of at most `limit` points each, the pieces' bytes copied once into them."""
    steps: list[np.ndarray] = []
    values: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    held = 0
    for piece in pieces:
        lo, n = 0, len(piece)
        while lo < n:
            hi = min(n, lo + limit - held)
            steps.append(piece.steps[lo:hi])
            values.append(piece.values[lo:hi])
            stamps.append(piece.timestamps_ms[lo:hi])
            held += hi - lo
            lo = hi
            if held == limit:
                yield wire.encode_series_parts(key, steps, values, stamps)
                steps, values, stamps, held = [], [], [], 0
    if held:
        yield wire.encode_series_parts(key, steps, values, stamps)


class TrackingServicer(tracking_service_pb2_grpc.TrackingServiceServicer):
    def __init__(self, service: TrackingService, executor: Executor, ingest_budget: PointBudget) -> None:
        self._svc = service
        self._executor = executor
        self._budget = ingest_budget
        self._stopping = False
        self._readers: set[asyncio.Task[None]] = set()  # each open StreamMetrics call's request reader
        # Searches (SearchRuns, ListExperiments, SelectWinner) at once on worker threads: costly filters (each
        # stopped after its query budget) then wait here, on the loop, and cannot take every worker from the rest.
        self._searches = asyncio.Semaphore(CONCURRENT_SEARCHES)

    def shut_down(self) -> None:
        """Server stop (on the loop): every metric stream stops reading, acknowledges the batches it took once
        they are committed, and ends with UNAVAILABLE SHUTTING_DOWN; the writer re-sends the rest elsewhere."""
        self._stopping = True
        for reader in self._readers:
            reader.cancel()

    async def _submit(self, batch: Batch, nbytes: int, *, unary: bool = False) -> asyncio.Future[bool]:
        """Queue a batch for the group commit once the server-wide ingest budget has room for it: for its points,
        or for the whole message when that is larger (its arrays are views that keep all of it alive, unknown
        fields and padding included).

        A stream waits with at most one batch, but nothing bounds how many unary calls wait, each holding its
        request: one that finds UNARY_WAITING_BUDGETS budgets' worth already waiting is refused (UNAVAILABLE
        INGEST_BUSY, to send again shortly) instead of adding to the memory held.
        """
        charge = max(batch.points, -(-nbytes // POINT_BYTES))
        if unary and self._budget.waiting >= UNARY_WAITING_BUDGETS * self._budget.limit:
            raise Unavailable(
                "this server's ingest buffer is full and more batches already wait for room; send this one again "
                "shortly",
                reason="INGEST_BUSY",
            )
        taken = await self._budget.acquire(charge)
        loop = asyncio.get_running_loop()

        def release() -> None:  # on the committer thread once the batch is no longer held, or here if refused
            with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nothing waits any more
                loop.call_soon_threadsafe(self._budget.release, taken)

        # Released when the batch leaves the commit queue, not when its caller goes away: a cancelled call's
        # batch stays queued (and is stored), and its points must go on counting until then.
        try:
            committed = self._svc.submit_metrics(batch, release)
        except BaseException:
            self._budget.release(taken)
            raise
        return asyncio.wrap_future(committed)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _search(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A search on a worker thread, holding one of the search permits until that thread is done with it:
        a call its client cancels (a short deadline) leaves its query running until the query budget stops it,
        and that query must still count."""
        await self._searches.acquire()
        try:
            job = self._executor.submit(functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._searches.release()
            raise
        loop = asyncio.get_running_loop()

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
                loop.call_soon_threadsafe(self._searches.release)

        job.add_done_callback(done)
        return await asyncio.wrap_future(job)

    @handle_errors
    async def CreateExperiment(self, request: pb.CreateExperimentRequest, context: Any) -> tracking_pb2.Experiment:
        e = await self._call(self._svc.create_experiment, request.display_name, request.description, dict(request.tags))
        return convert.experiment_to_proto(e)

    @handle_errors
    async def GetExperiment(self, request: pb.GetExperimentRequest, context: Any) -> tracking_pb2.Experiment:
        return convert.experiment_to_proto(await self._call(self._svc.get_experiment, request.name))

    @handle_errors
    async def ListExperiments(self, request: pb.ListExperimentsRequest, context: Any) -> pb.ListExperimentsResponse:
        page = await self._search(self._svc.list_experiments, request.filter, request.page_size, request.page_token)
        return pb.ListExperimentsResponse(
            experiments=[convert.experiment_to_proto(e) for e in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> tracking_pb2.Run:
        run = await self._call(
            self._svc.create_run,
            request.experiment,
            run_id=request.run_id,
            display_name=request.display_name,
            tags=dict(request.tags),
            params=dict(request.params),
            lineage=convert.lineage_from_proto(request.lineage),
            start_time_us=convert.micros(request.start_time, request.HasField("start_time"), "start_time"),
        )
        return convert.run_to_proto(run)

    @handle_errors
    async def GetRun(self, request: pb.GetRunRequest, context: Any) -> tracking_pb2.Run:
        return convert.run_to_proto(await self._call(self._svc.get_run, request.run_id))

    @handle_errors
    async def UpdateRun(self, request: pb.UpdateRunRequest, context: Any) -> tracking_pb2.Run:
        status = None
        if request.status != tracking_pb2.RUN_STATUS_UNSPECIFIED:
            try:
                status = tracking_pb2.RunStatus.Name(request.status).removeprefix("RUN_STATUS_")
            except ValueError:
                status = str(request.status)
        run = await self._call(
            self._svc.update_run,
            request.run_id,
            status=status,
            end_time_us=convert.micros(request.end_time, request.HasField("end_time"), "end_time"),
            display_name=request.display_name if request.HasField("display_name") else None,
        )
        return convert.run_to_proto(run)

    @handle_errors
    async def SearchRuns(self, request: pb.SearchRunsRequest, context: Any) -> pb.SearchRunsResponse:
        page = await self._search(
            self._svc.search_runs,
            list(request.experiments),
            request.filter,
            request.order_by,
            request.page_size,
            request.page_token,
        )
        return pb.SearchRunsResponse(
            runs=[convert.run_to_proto(r) for r in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def LogParams(self, request: pb.LogParamsRequest, context: Any) -> pb.LogParamsResponse:
        params = await self._call(self._svc.log_params, request.run_id, dict(request.params))
        return pb.LogParamsResponse(params=params)

    @handle_errors
    async def SetTags(self, request: pb.SetTagsRequest, context: Any) -> pb.SetTagsResponse:
        tags = await self._call(self._svc.set_tags, request.run_id, dict(request.tags), list(request.remove_keys))
        return pb.SetTagsResponse(tags=tags)

    @handle_errors
    async def SetLineage(self, request: pb.SetLineageRequest, context: Any) -> pb.SetLineageResponse:
        lineage = await self._call(self._svc.set_lineage, request.run_id, convert.lineage_from_proto(request.lineage))
        return pb.SetLineageResponse(
            lineage=convert.lineage_to_proto(lineage),
            fingerprint=lineage.fingerprint() or "",
            missing_fields=lineage.missing_fields(),
        )

    async def StreamMetrics(  # type: ignore[override]  # requests arrive decoded by wire (see add_to_server)
        self, request_iterator: AsyncIterator[wire.MetricsBatch | InvalidArgument], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamMetricsResponse]:
        """Acks go out in arrival order, each only after its batch's group commit."""
        # Unbounded, because its bound is `room`, taken before a batch is submitted: a batch once submitted is
        # queued for its ack at once. (A reader cancelled by a stop while it waited to queue a submitted batch
        # left that batch stored and never acknowledged.)
        pending: asyncio.Queue[tuple[str, int, asyncio.Future[bool]] | None] = asyncio.Queue()
        room = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        failure: list[BaseException] = []

        async def reader() -> None:
            try:
                # context.read(), not `async for` over request_iterator: gRPC's iterator keeps the last message
                # referenced while it waits for the next, so a stream gone quiet would hold its last batch (up to
                # the message limit) after the commit gave its ingest budget back.
                while (req := await context.read()) is not _EOF:
                    if isinstance(req, InvalidArgument):
                        raise req
                    batch = validate_batch(
                        req.run_id, req.writer_id, req.seq, tuple(convert.series_from_wire(s) for s in req.series)
                    )
                    await room.acquire()
                    try:
                        fut = await self._submit(batch, req.nbytes)
                    except BaseException:
                        room.release()
                        raise
                    pending.put_nowait((req.writer_id, req.seq, fut))
                    del req, batch  # not kept while the next message is awaited (see above)
            except BaseException as exc:  # surfaced to the client through the ack loop
                failure.append(exc)
            pending.put_nowait(None)

        if self._stopping:
            await abort(context, status_for(_shutting_down(), "StreamMetrics"))
            return
        task = asyncio.create_task(reader())

        def ended(t: asyncio.Task[None]) -> None:  # cancelled before its first step, it queued no end mark
            if t.cancelled():
                pending.put_nowait(None)

        task.add_done_callback(ended)
        self._readers.add(task)
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                writer_id, seq, fut = item
                try:
                    duplicate = await fut
                except Exception as exc:
                    await abort(context, status_for(exc, "StreamMetrics"))
                    return
                room.release()
                yield pb.StreamMetricsResponse(writer_id=writer_id, seq=seq, duplicate=duplicate)
            if self._stopping:
                await abort(context, status_for(_shutting_down(), "StreamMetrics"))
            elif failure and not isinstance(failure[0], asyncio.CancelledError):
                await abort(context, status_for(failure[0], "StreamMetrics"))
        finally:
            self._readers.discard(task)
            task.cancel()

    @handle_errors
    async def LogMetrics(  # type: ignore[override]  # decoded by wire, as StreamMetrics
        self, request: wire.MetricsBatch | InvalidArgument, context: Any
    ) -> pb.LogMetricsResponse:
        if isinstance(request, InvalidArgument):
            raise request
        batch = validate_batch(
            request.run_id, request.writer_id, request.seq, tuple(convert.series_from_wire(s) for s in request.series)
        )
        duplicate = await (await self._submit(batch, request.nbytes, unary=True))
        return pb.LogMetricsResponse(writer_id=request.writer_id, seq=request.seq, duplicate=duplicate)

    @handle_errors
    async def GetMetricWriter(self, request: pb.GetMetricWriterRequest, context: Any) -> tracking_pb2.MetricWriter:
        self._svc.check_metric_writer(request.run_id, request.writer_id)  # bad input: refused now, not after 10 s
        committed = asyncio.wrap_future(self._svc.queued_metrics_committed())
        try:  # on the loop, not a worker thread: slow commits must not take the pool from every other call
            await asyncio.wait_for(asyncio.shield(committed), INGEST_BARRIER_TIMEOUT_S)
        except TimeoutError:
            raise self._svc.ingest_behind() from None
        next_seq = await self._call(self._svc.next_metric_seq, request.run_id, request.writer_id)
        return tracking_pb2.MetricWriter(run_id=request.run_id, writer_id=request.writer_id, next_seq=next_seq)

    @handle_errors
    async def GetMetricHistory(
        self, request: pb.GetMetricHistoryRequest, context: Any
    ) -> AsyncIterator[tracking_pb2.MetricSeries]:
        pieces = await self._call(
            self._svc.metric_history,
            request.run_id,
            request.key,
            request.start_step if request.HasField("start_step") else None,
            request.end_step if request.HasField("end_step") else None,
            request.max_points,
        )
        total = sum(len(piece) for piece in pieces)
        await context.send_initial_metadata(((wire.HISTORY_POINTS_KEY, str(total)),))
        # Serialized here, straight from the stored chunks (see add_to_server), at most
        # HISTORY_CHUNK_POINTS points per message; an empty history is one message with only the key.
        sent = False
        for message in history_messages(request.key, pieces, HISTORY_CHUNK_POINTS):
            sent = True
            yield message  # type: ignore[misc]
        if not sent:
            yield tracking_pb2.MetricSeries(key=request.key)

    @handle_errors
    async def LogEvalResult(self, request: pb.LogEvalResultRequest, context: Any) -> tracking_pb2.EvalResult:
        result = await self._call(
            self._svc.log_eval_result, request.run_id, request.suite_fingerprint, dict(request.metrics)
        )
        return tracking_pb2.EvalResult(
            run_id=result.run_id,
            suite_fingerprint=result.suite_fingerprint,
            metrics=result.metrics,
            create_time=convert.timestamp(result.create_time_us),
        )

    @handle_errors
    async def SelectWinner(self, request: pb.SelectWinnerRequest, context: Any) -> pb.SelectWinnerResponse:
        # Candidates from an experiment are a search (a permit); listed run IDs are read by key.
        call = self._search if request.experiment else self._call
        result = await call(
            self._svc.select_winner,
            run_ids=list(request.run_ids),
            experiment=request.experiment,
            filter_text=request.filter,
            metric=request.metric,
            direction=convert.direction_from_proto(request.direction),
            suite_fingerprint=request.suite_fingerprint if request.HasField("suite_fingerprint") else None,
        )
        return pb.SelectWinnerResponse(
            winner_run_id=result.winner_run_id,
            score=result.score,
            suite_fingerprint=result.suite_fingerprint,
            cohort=[pb.ScoredRun(run_id=r, score=s) for r, s in result.cohort],
            excluded=[
                pb.ExcludedRun(run_id=e.run_id, reason=e.reason, suite_fingerprints=e.suites) for e in result.excluded
            ],
        )
