"""ArtifactService over gRPC (asyncio): byte streams are hashed and stored on a worker pool, pipelined with the
network so that neither side waits for the other, and with bounded memory per transfer."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from runledger import wire
from runledger.v1 import artifact_pb2, artifact_service_pb2 as pb, artifact_service_pb2_grpc
from runledger_server.domain.errors import InvalidArgument, Unavailable
from runledger_server.services.artifacts import ArtifactService, Upload
from runledger_server.store.artifacts import ArtifactRecord
from runledger_server.transport import convert, registration
from runledger_server.transport.errors import handle_errors

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
WRITE_BATCH_BYTES = 2 << 20  # chunks handed to the worker pool at once; one batch in flight per upload
# What one chunk message counts toward a batch besides its bytes: empty or tiny chunks must not grow a batch
# (and the memory it holds) without end before 2 MiB of content arrive.
CHUNK_OVERHEAD_BYTES = 64
# Uploads open at once on this server: each holds a temporary file or an S3 multipart upload from its header on.
# Beyond it a new upload is refused as UNAVAILABLE `UPLOADS_BUSY` (clients send it again after a pause), so that
# clients that open uploads and stall cannot use up the process's file descriptors.
MAX_OPEN_UPLOADS = 512
# An upload that receives nothing for this long is abandoned (its bytes removed) and its slot given back.
UPLOAD_IDLE_SECONDS = 300.0
_END = object()


async def _next_or_idle(requests: AsyncIterator[Any]) -> Any:
    """The upload's next message, or `_END`; refused once the client has sent nothing for UPLOAD_IDLE_SECONDS."""
    try:
        async with asyncio.timeout(UPLOAD_IDLE_SECONDS):  # in this task: a stop's cancel reaches the handler at once
            return await anext(requests, _END)
    except TimeoutError:
        raise Unavailable(
            f"nothing of the upload arrived for {UPLOAD_IDLE_SECONDS:g} s; it was abandoned: send it again",
            reason="UPLOAD_IDLE",
        ) from None


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, service: ArtifactService, executor: Executor) -> None:
        self._svc = service
        self._executor = executor
        self._cleanups: set[asyncio.Task[None]] = set()
        self._open_uploads = 0

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """A call on the pool that a cleanup can wait for: awaited through `asyncio.shield`, a cancelled RPC leaves
        it running (a pool thread cannot be interrupted) and its future keeps saying when it has ended."""
        return asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def _later(self, cleanup: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a cleanup past the end of its call; `drain` waits for it before the pool shuts down."""
        task = asyncio.ensure_future(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    @handle_errors
    async def UploadArtifact(
        self, request_iterator: AsyncIterator[pb.UploadArtifactRequest], context: grpc.aio.ServicerContext
    ) -> artifact_pb2.Artifact:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if isinstance(first, InvalidArgument):  # malformed bytes (see registration.py)
            raise first
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of an upload must be its header", field="header")
        if self._open_uploads >= MAX_OPEN_UPLOADS:
            raise Unavailable(
                f"{MAX_OPEN_UPLOADS} uploads are open on this server; send this one again shortly",
                reason="UPLOADS_BUSY",
            )
        self._open_uploads += 1
        try:
            return await self._upload(first.header, requests)
        finally:
            self._open_uploads -= 1

    async def _upload(self, h: pb.UploadArtifactHeader, requests: AsyncIterator[Any]) -> artifact_pb2.Artifact:
        begin = self._start(self._svc.begin_upload, h.run_id, h.path, h.size if h.HasField("size") else None, h.sha256)
        try:
            upload = await asyncio.shield(begin)
        except asyncio.CancelledError:  # a cancel or deadline while the upload opens: abort it once it is open
            self._later(self._abort_begun(begin))
            raise
        inflight: asyncio.Future[Any] | None = None  # the one call of this upload running on the pool
        try:
            batch: list[bytes] = []
            batched = 0
            while (req := await _next_or_idle(requests)) is not _END:
                if isinstance(req, InvalidArgument):
                    raise req
                if req.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first message of an upload may be a header", field="header")
                batch.append(req.chunk)
                batched += len(req.chunk) + CHUNK_OVERHEAD_BYTES
                if batched >= WRITE_BATCH_BYTES:
                    if inflight is not None:
                        await asyncio.shield(inflight)
                    inflight = self._start(upload.write, batch)
                    batch, batched = [], 0
            if inflight is not None:
                await asyncio.shield(inflight)
            if batch:
                inflight = self._start(upload.write, batch)
                await asyncio.shield(inflight)
            finish = self._start(upload.finish)
            inflight = finish
            record = await asyncio.shield(finish)
        except asyncio.CancelledError:
            self._later(self._cleanup(upload, inflight))
            raise
        except BaseException:
            await asyncio.shield(self._later(self._cleanup(upload, inflight)))  # gone before the refusal is sent
            raise
        return _artifact(record)

    async def _cleanup(self, upload: Upload, inflight: asyncio.Future[Any] | None) -> None:
        """Abort a failed upload once no call of it runs on the pool, so that its bytes disappear: an abort under a
        running write would close the file it writes to, or leave it waiting for an S3 upload that is gone."""
        if inflight is not None:
            await _settled(inflight)
        try:
            await self._call(upload.abort)
        except Exception:
            _LOGGER.exception("could not abort the upload of %s to run %s", upload.path, upload.run_id)

    async def _abort_begun(self, begin: asyncio.Future[Upload]) -> None:
        """The call ended while its upload was being opened: abort the upload the pool opens for nobody."""
        await _settled(begin)
        if not begin.cancelled() and begin.exception() is None:
            await self._cleanup(begin.result(), None)

    @handle_errors
    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        record, chunks, url = await self._call(
            functools.partial(self._svc.open_download, presign=request.accept_presigned_url),
            request.run_id,
            request.path,
            request.sha256,
            request.offset,
        )
        ahead: asyncio.Future[bytes | None] | None = None
        try:
            yield pb.DownloadArtifactResponse(artifact=_artifact(record), presigned_url=url or "")
            # Read the next chunk while the current one is being sent.
            ahead = self._start(_next_chunk, chunks)
            while True:
                chunk = await asyncio.shield(ahead)
                if chunk is None:
                    ahead = None
                    break
                ahead = self._start(_next_chunk, chunks)
                yield _chunk_message(chunk)  # type: ignore[misc]
        finally:
            self._close_later(chunks, ahead)

    def _close_later(self, chunks: Iterator[bytes], ahead: asyncio.Future[bytes | None] | None) -> None:
        close = getattr(chunks, "close", None)
        if close is None:
            return

        async def closer() -> None:
            if ahead is not None:  # a reader is closed only once no pool thread reads from it
                await _settled(ahead)
            await self._call(close)

        self._later(closer())

    async def drain(self) -> None:
        """Wait for the aborts and closes of calls that ended (cancelled ones at shutdown included): they run on
        the artifact pool, which must not shut down before them, or a cancelled upload's bytes stay behind."""
        for _ in range(100):
            await asyncio.sleep(0)  # let cancelled handlers reach their cleanup
            if not self._cleanups and not self._open_uploads:
                return
            if self._cleanups:
                await asyncio.gather(*self._cleanups, return_exceptions=True)

    @handle_errors
    async def ListArtifacts(self, request: pb.ListArtifactsRequest, context: Any) -> pb.ListArtifactsResponse:
        page = await self._call(self._svc.list, request.run_id, request.prefix, request.page_size, request.page_token)
        return pb.ListArtifactsResponse(
            artifacts=[_artifact(r) for r in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def GetArtifactManifest(
        self, request: pb.GetArtifactManifestRequest, context: Any
    ) -> artifact_pb2.ArtifactManifest:
        directory, manifest = await self._call(self._svc.published_manifest, request.run_id, request.path)
        return artifact_pb2.ArtifactManifest(
            run_id=request.run_id,
            path=directory,
            sha256=manifest.sha256,
            size=manifest.size,
            entries=[artifact_pb2.ManifestEntry(path=e.path, sha256=e.sha256, size=e.size) for e in manifest.entries],
        )


async def _settled(call: asyncio.Future[Any]) -> None:
    """Wait until a call on the pool has ended, whatever its outcome: its error, if any, went to the client or has
    no one left to go to."""
    await asyncio.wait([call])
    if not call.cancelled():
        call.exception()  # retrieved, so that it is not logged as lost


def add_to_server(servicer: ArtifactServicer, server: Any) -> None:
    """Register like the generated function (with checked decoding); DownloadArtifact's chunk messages are
    serialized by `_chunk_message` and go to the wire as they are."""

    def adjust(handlers: registration.Handlers) -> None:
        registration.pass_serialized(handlers, "DownloadArtifact")

    registration.register(artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server, servicer, server, adjust)


def _chunk_message(chunk: bytes) -> bytes:
    """A serialized DownloadArtifactResponse holding `chunk`: its bytes copied once, where building the message
    and serializing it copies them twice (a megabyte per message)."""
    return wire.length_delimited(_CHUNK_FIELD, chunk)


_CHUNK_FIELD = pb.DownloadArtifactResponse.DESCRIPTOR.fields_by_name["chunk"].number


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


def _artifact(record: ArtifactRecord) -> artifact_pb2.Artifact:
    return artifact_pb2.Artifact(
        name=f"runs/{record.run_id}/artifacts/{record.path}" if record.run_id else "",
        run_id=record.run_id,
        path=record.path,
        sha256=record.sha256,
        size=record.size,
        uri=record.uri,
        create_time=convert.timestamp(record.create_time_us) if record.create_time_us else None,
    )
