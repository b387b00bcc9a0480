"""Blobs in S3/MinIO through the minio SDK: `<prefix>/sha256/ab/cd/<hex>`, streamed as multipart uploads.

An upload never holds the file in memory: bytes flow through a bounded pipe into the SDK's multipart
upload (`put_object`, given the declared length when there is one), one part at a time. Nothing becomes
visible before the service has verified the digest: when the digest is declared up front the upload goes straight to its
final key but is completed only after verification (an aborted multipart upload leaves no object); when
it is not, the bytes land under `<prefix>/tmp/` and are copied server-side to their address.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, LifecycleConfig, Rule

from runledger_server.backends.artifacts.verified_put import put_verified
from runledger_server.domain.errors import (
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

_LOGGER = logging.getLogger(__name__)

ABORT_RULE_ID = "runledger-abort-incomplete-uploads"
PART_SIZE = 8 << 20  # parts in flight are what an upload holds in memory
MAX_PARTS = 10_000  # S3's limit per multipart upload
MAX_OBJECT_BYTES = 5 << 40  # S3's limit per object
UNKNOWN_SIZE_PART = 16 << 20  # without a declared size: objects up to 156 GiB
PIPE_BYTES = 4 << 20  # received bytes waiting while a part is sent; the network side is far faster than S3
READ_CHUNK = 1 << 20
STALE_TEMP = datetime.timedelta(hours=24)
PRESIGNED_EXPIRY = datetime.timedelta(minutes=15)  # long enough to start a transfer, checked when it starts
UNAVAILABLE = "ARTIFACT_STORE_UNAVAILABLE"
ACCESS_DENIED = "ARTIFACT_STORE_ACCESS_DENIED"
FULL = "ARTIFACT_STORE_FULL"
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
)
# MinIO out of drive space, or over the bucket's quota: no room until an operator makes some.
_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"})
PROBE_INTERVAL = 2.0  # seconds a failed probe of the store answers for, before the next one


def _again(exc: DomainError) -> DomainError:
    """A fresh copy of a refusal, for another caller (one exception object raised in many threads would share
    its traceback)."""
    copy = type(exc)(exc.message, reason=exc.reason, metadata=exc.metadata)
    copy.field = exc.field
    return copy


_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})


def parse_location(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (`bucket`, `some/prefix/`); the prefix is empty or ends with `/`."""
    if not location.startswith("s3://"):
        raise InvalidArgument(f"artifact location {location!r} is not s3://bucket/prefix", field="artifacts")
    bucket, _, prefix = location[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidArgument(f"artifact location {location!r} names no bucket", field="artifacts")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class _Body:
    """The bytes of one GET in chunks. `close()` gives its connection back to the pool even before the first
    chunk is read: a generator's `finally` would not run then, and a download cancelled at once would leave
    the connection to the garbage collector (taken from the pool for good)."""

    def __init__(self, store: S3BlobStore, response: urllib3.BaseHTTPResponse) -> None:
        self._store = store
        self._response: urllib3.BaseHTTPResponse | None = response
        self._chunks = response.stream(READ_CHUNK)

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        if self._response is None:
            raise StopIteration
        try:
            with self._store.errors("reading a blob"):
                chunk = next(self._chunks, None)
        except BaseException:
            self.close()
            raise
        if chunk is None:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()
            response.release_conn()


class S3BlobStore:
    """Content-addressed blobs in one bucket under one prefix. The bucket is created if missing."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        prefix: str = "",
        access_key: str = "",
        secret_key: str = "",
        secure: bool = False,
        region: str = "",
        session_token: str = "",
        part_size: int = PART_SIZE,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        for scheme, is_tls in (("https://", True), ("http://", False)):
            if endpoint.startswith(scheme):
                endpoint, secure = endpoint[len(scheme) :].rstrip("/"), is_tls
        self.endpoint = f"{'https' if secure else 'http'}://{endpoint}"
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        # Bounded: a dead endpoint fails within a few seconds instead of minio's default five-minute timeouts.
        http = urllib3.PoolManager(
            num_pools=4,
            maxsize=32,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(
                total=retries, connect=retries, read=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
            cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        )
        # No region: the SDK asks the bucket for its own (GetBucketLocation through the bounded pool above, then
        # cached) and signs for it; a fixed guess such as us-east-1 would sign for the wrong region elsewhere.
        self.client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            session_token=session_token or None,
            secure=secure,
            region=region or None,
            http_client=http,
        )
        self._ready = False
        self._ready_lock = threading.Lock()
        self._failed_probe: tuple[float, DomainError] | None = None  # (when, why) the last probe failed

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    # ---- bucket ------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the bucket if missing and clear stale temporary uploads; raises a DomainError.

        While the store is unreachable one thread probes it at a time, and calls within PROBE_INTERVAL of a
        failed probe get its answer at once: each probe may wait out its timeouts, and calls queued behind one
        another's probes would hold the artifact pool for their sum.
        """
        with self._ready_lock:
            if self._ready:
                return
            failed = self._failed_probe
            if failed is not None and time.monotonic() - failed[0] < PROBE_INTERVAL:
                raise _again(failed[1])
            try:
                self._probe()
            except DomainError as exc:
                self._failed_probe = (time.monotonic(), exc)
                raise
            self._failed_probe = None
            self._ready = True

    def _probe(self) -> None:
        """Under the lock: the bucket exists (created if missing), and stale temporary uploads are gone."""
        with self.errors("creating the bucket"):
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                    _LOGGER.info("created bucket %s at %s", self.bucket, self.endpoint)
                    self._abort_incomplete_uploads()
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._sweep_stale_temp()

    def _abort_incomplete_uploads(self) -> None:
        """On a bucket this server created: S3 itself aborts multipart uploads left unfinished for a day
        (an abort that failed while the store was down would otherwise keep their parts forever). A bucket
        that existed before keeps the lifecycle its owner gave it."""
        rule = Rule(
            ENABLED,
            rule_filter=Filter(prefix=self.prefix),
            rule_id=ABORT_RULE_ID,
            abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days_after_initiation=1),
        )
        try:
            self.client.set_bucket_lifecycle(self.bucket, LifecycleConfig([rule]))
        except S3Error as exc:  # e.g. a server without lifecycle support: uploads still work
            _LOGGER.warning("could not set the bucket's lifecycle rule for unfinished uploads: %s", exc)

    def try_ensure_bucket(self) -> bool:
        """At startup: a store that is down is reported, not fatal (artifact calls answer UNAVAILABLE)."""
        try:
            self.ensure_bucket()
            return True
        except DomainError as exc:
            _LOGGER.error("artifact store not ready: %s", exc.message)
            return False

    def _sweep_stale_temp(self) -> None:
        cutoff = datetime.datetime.now(datetime.UTC) - STALE_TEMP
        for obj in self.client.list_objects(self.bucket, prefix=f"{self.prefix}tmp/", recursive=True):
            if obj.last_modified is not None and obj.last_modified < cutoff and obj.object_name:
                with contextlib.suppress(MinioException):
                    self.client.remove_object(self.bucket, obj.object_name)
                    _LOGGER.info("removed stale temporary upload %s", obj.object_name)

    # ---- addressing --------------------------------------------------------------------------
    def key(self, sha256: str) -> str:
        return f"{self.prefix}sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    # ---- blob operations ---------------------------------------------------------------------
    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def size(self, sha256: str) -> int | None:
        self.ensure_bucket()
        with self.errors("looking up a blob"):
            return self._size(self.key(sha256))

    def _size(self, key: str) -> int | None:
        try:
            return self.client.stat_object(self.bucket, key).size
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise

    def presigned_get(self, sha256: str) -> str:
        """A GET URL for the blob, valid for PRESIGNED_EXPIRY; signed locally once ensure_bucket has learned the
        bucket's region (without a configured region, signing needs it)."""
        self.ensure_bucket()
        with self.errors("signing a download URL"):
            return self.client.presigned_get_object(self.bucket, self.key(sha256), expires=PRESIGNED_EXPIRY)

    def writer(self, sha256: str | None = None, size: int | None = None) -> S3BlobWriter:
        if size is not None and size > MAX_OBJECT_BYTES:  # refused before a byte moves, not by the SDK midway
            raise InvalidArgument(
                f"size {size} is beyond the largest object S3 stores ({MAX_OBJECT_BYTES} bytes, 5 TiB)", field="size"
            )
        self.ensure_bucket()
        return S3BlobWriter(self, sha256, size, self.part_size_for(size))

    def part_size_for(self, size: int | None) -> int:
        """The configured part size, or larger when the object would otherwise need more than 10,000 parts."""
        if size is None:
            return max(self.part_size, UNKNOWN_SIZE_PART)
        needed = -(-size // (MAX_PARTS - 1))
        return max(self.part_size, -(-needed // (1 << 20)) * (1 << 20))

    def put(self, sha256: str, stream: BinaryIO, size: int) -> str:
        """Store content whose digest is known; the bytes are checked against it before they are published."""
        return put_verified(self, sha256, stream, size)

    def open_range(self, sha256: str, offset: int) -> Iterator[bytes]:
        self.ensure_bucket()
        with self.errors("reading a blob"):
            try:
                response = self.client.get_object(self.bucket, self.key(sha256), offset=offset)
            except S3Error as exc:
                if exc.code in _MISSING_CODES or exc.code == "InvalidRange":
                    raise NotFound(f"blob sha256 {sha256} is missing from {self.location}", field="sha256") from exc
                raise
        return _Body(self, response)

    def delete(self, sha256: str) -> None:
        self.ensure_bucket()
        with self.errors("deleting a blob"):
            self.client.remove_object(self.bucket, self.key(sha256))

    # ---- errors ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Turn SDK and connection failures into UNAVAILABLE / PERMISSION_DENIED naming the endpoint."""
        try:
            yield
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.translate(exc, action) from exc

    def translate(self, exc: BaseException, action: str) -> BaseException:
        if isinstance(exc, DomainError):
            return exc
        meta = {"endpoint": self.endpoint, "bucket": self.bucket}
        if isinstance(exc, S3Error):
            if exc.code in _DENIED_CODES:
                return PermissionDenied(
                    f"the artifact store at {self.endpoint} denied access to bucket {self.bucket!r} while {action} "
                    f"({exc.code}); check the S3 access key and secret",
                    reason=ACCESS_DENIED,
                    metadata={**meta, "s3Code": exc.code or ""},
                )
            if exc.code in _FULL_CODES:
                return ResourceExhausted(
                    f"the artifact store at {self.endpoint} has no room in bucket {self.bucket!r} while {action} "
                    f"({exc.code}: {exc.message}); nothing was stored",
                    reason=FULL,
                    metadata={**meta, "s3Code": exc.code or ""},
                )
            if exc.code == "NoSuchBucket":
                self._ready = False  # re-created on the next call
            detail = f"{exc.code}: {exc.message}"
        elif isinstance(exc, urllib3.exceptions.MaxRetryError):
            detail = str(exc.reason)
        elif isinstance(exc, ServerError | InvalidResponseError):
            detail = str(exc).splitlines()[0]
        elif isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            detail = f"{type(exc).__name__}: {exc}"
        else:
            return exc
        return Unavailable(
            f"the artifact store at {self.endpoint} is unavailable while {action}: {detail}",
            reason=UNAVAILABLE,
            metadata=meta,
        )


class _Cancelled(Exception):
    """Raised into the SDK's reader so that it abandons (and aborts) the multipart upload."""


class _Pipe:
    """A bounded hand-off of bytes from the request stream to the SDK reading on its own thread.

    The SDK completes the object as soon as it has read the last byte, so the last byte is handed over
    only once the service has verified the upload and closed the pipe (`total`, when known, says which
    byte is the last); a cancelled pipe raises instead, and the SDK abandons the object.
    """

    def __init__(self, limit: int, total: int | None = None) -> None:
        self._cond = threading.Condition()
        self._total = total
        self._delivered = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._limit = limit
        self._closed = False
        self._cancel: BaseException | None = None
        self._reader_failure: BaseException | None = None

    def write(self, data: bytes) -> None:
        """Wait for room; a pipe that is cancelled, or that the SDK no longer reads, raises instead of waiting."""
        with self._cond:
            while self._buffered >= self._limit and self._reader_failure is None and self._cancel is None:
                self._cond.wait()
            if self._reader_failure is not None:
                raise self._reader_failure
            if self._cancel is not None:
                raise self._cancel
            self._chunks.append(data)
            self._buffered += len(data)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self, exc: BaseException) -> None:
        with self._cond:
            self._cancel = exc
            self._cond.notify_all()

    def reader_failed(self, exc: BaseException) -> None:
        with self._cond:
            self._reader_failure = exc
            self._chunks.clear()
            self._buffered = 0
            self._cond.notify_all()

    def read(self, size: int = -1) -> bytes:
        """Block until `size` bytes (or the end) are there: the SDK gets whole parts, joined once."""
        out: list[bytes] = []
        got = 0
        with self._cond:
            while True:
                if self._cancel is not None:
                    raise self._cancel
                while self._chunks and (size < 0 or got < size):
                    chunk = self._chunks.popleft()
                    self._buffered -= len(chunk)
                    if size >= 0 and got + len(chunk) > size:
                        rest = chunk[size - got :]
                        chunk = chunk[: size - got]
                        self._chunks.appendleft(rest)
                        self._buffered += len(rest)
                    out.append(chunk)
                    got += len(chunk)
                self._cond.notify_all()
                if self._total is not None and self._delivered + got >= self._total:
                    if self._closed:  # the last bytes: only once verified
                        break
                elif (size >= 0 and got >= size) or (self._closed and not self._chunks):
                    break
                self._cond.wait()
            self._delivered += got
        return b"".join(out)


class S3BlobWriter:
    """One upload in progress, fed chunk by chunk; `commit` publishes it under its digest, `abort` drops it."""

    def __init__(self, store: S3BlobStore, sha256: str | None, size: int | None, part_size: int) -> None:
        self._store = store
        self._expected = sha256
        self._key = store.key(sha256) if sha256 else f"{store.prefix}tmp/{uuid.uuid4().hex}"
        self._part_size = part_size
        # A known length spares the SDK two copies of every part; an empty object is never sent before
        # commit either way, but with a known length of 0 the SDK would not wait for the pipe at all.
        self._length = size if size else -1
        self._pipe = _Pipe(PIPE_BYTES, size if size else None)
        self._received = 0
        # Without a declared size the part size is fixed up front, and with it the largest object possible.
        self._max_bytes = min(part_size * MAX_PARTS, MAX_OBJECT_BYTES) if size is None else None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._upload, name="runledger-s3-upload", daemon=True)
        self._thread.start()

    def _upload(self) -> None:
        try:
            self._store.client.put_object(
                self._store.bucket,
                self._key,
                self._pipe,  # type: ignore[arg-type]
                length=self._length,
                part_size=self._part_size,
                num_parallel_uploads=1,  # parallel parts are no faster here, and the SDK leaks their threads on abort
            )
        except _Cancelled as exc:
            self._failure = exc
            self._pipe.reader_failed(exc)  # nothing reads the pipe any more: a writer waiting for room is woken
        except BaseException as exc:
            self._failure = self._store.translate(exc, "storing an upload")
            self._pipe.reader_failed(self._failure)

    def write(self, data: bytes) -> None:
        if self._max_bytes is not None and self._received + len(data) > self._max_bytes:
            # Refused by us, naming what to do, rather than by the SDK at part 10,001 (which surfaced as UNAVAILABLE).
            raise InvalidArgument(
                f"an upload without a declared size can hold at most {self._max_bytes} bytes on this S3 store "
                f"({MAX_PARTS} parts of {self._part_size >> 20} MiB); declare its size in the header",
                field="size",
                reason="SIZE_REQUIRED",
            )
        self._pipe.write(data)
        self._received += len(data)

    def commit(self, sha256: str) -> str:
        if self._expected is not None and sha256 != self._expected:
            self.abort()
            raise ValueError("commit digest differs from the declared one the upload was addressed by")
        self._pipe.close()
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        if self._expected is not None:
            return self._store.uri(sha256)
        store = self._store
        try:
            with store.errors("publishing an upload"):
                # Copied over whatever the address holds: these bytes match the digest, a stored copy may not
                # (damaged in place, or cut short); S3 replaces the object whole.
                store.client.copy_object(store.bucket, store.key(sha256), CopySource(store.bucket, self._key))
        finally:
            self._remove_temp()
        return store.uri(sha256)

    def abort(self) -> None:
        self._pipe.cancel(_Cancelled())
        self._thread.join()

    def _remove_temp(self) -> None:
        try:
            self._store.client.remove_object(self._store.bucket, self._key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _LOGGER.warning("could not remove temporary upload %s (swept after %s): %s", self._key, STALE_TEMP, exc)
