"""Moving files in and out of runledger's artifact store: hashed before upload, verified after download.

Uploads declare their size and sha256 in the header, so the server verifies the bytes it stores and
can skip storing content it already holds. Downloads land in a partial file next to their destination
(see `partial_path`), resume from it, and are renamed into place only once their sha256 matches.

Artifact paths follow the server's rule (`path_problem`), checked here too: a directory is refused before
any of it is uploaded, and a path the server lists is checked before anything is written for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import logging
import os
import queue
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc

from runledger.artifact_paths import (
    LOCK_SUFFIX,
    check_path,
    check_upload_plan,
    local_target,
    nfc,
    partial_path,
    refuse_collisions,
    refuse_own_names,
)
from runledger.errors import AlreadyExists, DataLoss, LocalFileError, NotFound, RunledgerError, from_rpc_error
from runledger.v1 import artifact_pb2, artifact_service_pb2 as pb, artifact_service_pb2_grpc, registry_pb2

_LOGGER = logging.getLogger(__name__)

CHUNK = 1 << 20  # the server's limit per upload message
BLOB_CHANGED_RESENDS = 2  # an upload whose stored copy changed under it is sent again this many times
T = TypeVar("T")

# How a unary call is made: (method, request) -> response, raising typed errors.
Unary = Callable[[Callable[..., Any], Any], Any]
# Runs `attempt(remaining seconds)` with a deadline and retries (the Client's), returning its result.
Retrying = Callable[[Callable[[float], Any]], Any]


def _plain(method: Callable[..., Any], request: Any) -> Any:
    try:
        return method(request)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


# None: a progress bar when tqdm is installed and stderr is a terminal; False: none; True: tqdm if installed;
# a callable: called with (bytes done, bytes total) as the transfer advances.
Progress = bool | Callable[[int, int], None] | None


def upload_file(
    channel: grpc.Channel,
    run_id: str,
    local_path: str | os.PathLike[str],
    artifact_path: str | None = None,
    *,
    progress: Progress = None,
    retrying: Retrying | None = None,
) -> artifact_pb2.Artifact:
    """Upload one file as `artifact_path` (default: its file name, in NFC) of the run; returns the recorded
    artifact. The path is checked before the file is read, so a refused name costs no hashing. `retrying(attempt)`
    runs `attempt(remaining seconds)` with the caller's deadline and retries (the Client's: a server restarting
    meanwhile is waited for, and the file sent again from its start); one plain attempt by default. Either way, an
    upload refused because the stored copy it was replacing changed meanwhile (ABORTED BLOB_CHANGED) is sent again,
    up to twice."""
    local = Path(local_path)
    target = check_path(artifact_path if artifact_path is not None else nfc(local.name))
    size, digest = file_digest(local)
    with _Meter(progress, size, target) as meter:
        return _upload(
            artifact_service_pb2_grpc.ArtifactServiceStub(channel), run_id, local, target, size, digest, meter, retrying
        )


def upload_dir(
    channel: grpc.Channel,
    run_id: str,
    local_dir: str | os.PathLike[str],
    artifact_path: str | None = None,
    *,
    progress: Progress = None,
    retrying: Retrying | None = None,
    unary: Unary | None = None,
) -> list[artifact_pb2.Artifact]:
    """Upload every file below `local_dir` under `artifact_path` (default: the directory's name; "" for the
    run's root), keeping relative paths. Files are sent in path order; `retrying` and `unary` as for
    upload_file and list_artifacts.

    Local names are normalised to NFC (macOS spells them decomposed), and every path is checked before the
    first file is sent: one name the server would refuse must not leave the rest of the directory recorded.
    So is what the run already holds there: a path recorded with other content is refused (AlreadyExists
    ARTIFACT_IMMUTABLE, nothing sent), and a file recorded with the same content is not sent again (an upload
    that failed half way is simply repeated).
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    base = nfc(root.resolve().name) if artifact_path is None else artifact_path.strip("/")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    plan = [(p, "/".join(filter(None, [base, nfc(p.relative_to(root).as_posix())]))) for p in files]
    check_upload_plan(root, plan)
    digests = [file_digest(p) for p, _ in plan]
    held = {a.path: a for a in list_artifacts(channel, run_id, prefix=base, unary=unary)}
    for (_, target), (_, digest) in zip(plan, digests, strict=True):
        if target in held and held[target].sha256 != digest:
            raise AlreadyExists(
                f"runs/{run_id} already records {target} with other content (sha256 {held[target].sha256}); "
                "artifacts are immutable: upload the directory under another path. Nothing was sent",
                reason="ARTIFACT_IMMUTABLE",
                metadata={"field": "path", "path": target},
            )
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    with _Meter(progress, sum(size for size, _ in digests), base or "artifacts") as meter:
        out = []
        for (p, target), (size, digest) in zip(plan, digests, strict=True):
            if target in held:
                meter.advance(size)
                out.append(held[target])
            else:
                out.append(_upload(stub, run_id, p, target, size, digest, meter, retrying))
        return out


def download(
    channel: grpc.Channel,
    run_id: str,
    path: str,
    dest: str | os.PathLike[str],
    *,
    resume: bool = True,
    presigned: bool = True,
    progress: Progress = None,
    unary: Unary | None = None,
) -> Path:
    """Download a file or a whole directory (every artifact below `path`; "" is the whole run) to `dest`.

    A file goes to `dest` (or into it, when `dest` is an existing directory); a directory's files go below
    `dest` at their relative paths. Each file is checked against its sha256 (DataLoss on mismatch); files
    already present with the right content are skipped, and the partial file (`partial_path`) left by an
    interrupted download is resumed from where it stopped (and the file fetched again from the start if the
    result does not match; progress then goes back by what it had counted for that file). With `presigned`
    (the default), when the server's artifact store is S3 the bytes are fetched straight from it through a
    short-lived URL the server signs, and through the server otherwise (or when that URL cannot be reached).
    Returns the file or directory written.

    Before anything is written, every listed path is checked (FailedPrecondition UNSAFE_ARTIFACT_PATH when
    it could land outside `dest`), and a directory whose paths differ only in case is refused when `dest`
    is on a file system that ignores case (ARTIFACT_PATHS_COLLIDE): one file would overwrite another. A
    local failure to write (a full disk, no permission) is raised as LocalFileError naming the file.
    """
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    path = path.strip("/") if path not in ("", "/") else ""
    if path:
        check_path(path, "path")  # named as the caller passed it, before the listing would name its prefix
    found = [a for a in list_artifacts(channel, run_id, prefix=path, unary=unary) if _is_below(a.path, path)]
    if not found:
        raise NotFound(f"runs/{run_id} has no artifact at {path!r}", reason="ARTIFACT_NOT_FOUND", metadata={})
    destination = Path(dest)
    single = len(found) == 1 and found[0].path == path and path != ""
    if single:
        name = path.rsplit("/", 1)[-1]
        plan = [(found[0], local_target(destination, name) if destination.is_dir() else destination)]
    else:
        prefix = f"{path}/" if path else ""
        below = [a.path[len(prefix) :] for a in found]
        plan = [(a, local_target(destination, rel)) for a, rel in zip(found, below, strict=True)]
        refuse_collisions(destination, below)
        refuse_own_names([local for _, local in plan])
    _fetch(stub, plan, path or run_id, resume=resume, presigned=presigned, progress=progress)
    return plan[0][1] if single else destination


def _fetch(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    plan: list[tuple[artifact_pb2.Artifact, Path]],
    label: str,
    *,
    resume: bool,
    presigned: bool,
    progress: Progress,
) -> None:
    """Download each planned artifact to its local path, with one progress meter for them all."""
    direct = _Direct(presigned)
    with _Meter(progress, sum(a.size for a, _ in plan), label) as meter, contextlib.closing(direct):
        for artifact, local in plan:
            try:
                _download(stub, artifact, local, resume, meter, direct)
            except RunledgerError:
                raise  # DeadlineExceeded is an OSError too, but it is the call's failure, not the disk's
            except OSError as exc:  # the local file system's: a full disk, no permission, a name it refuses
                raise LocalFileError.wrap(exc, artifact.path, local) from exc


def download_version(
    channel: grpc.Channel,
    version: registry_pb2.ModelVersion,
    dest: str | os.PathLike[str],
    *,
    resume: bool = True,
    presigned: bool = True,
    progress: Progress = None,
    unary: Unary | None = None,
) -> Path:
    """Download exactly what a model version registered, fetched by content address: its file, or the files of
    its directory's manifest (the version's sha256 is the manifest's). Files added to the run's directory after
    registration are not part of the version and are not fetched; every file is checked against its sha256.

    A file goes to `dest` (or into it, when `dest` is an existing directory); a directory's files go below
    `dest` at their paths in the manifest. Returns the file or directory written.
    """
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    path, digest = version.artifact_path, version.artifact_sha256
    listed = [a for a in list_artifacts(channel, version.run_id, prefix=path, unary=unary) if a.path == path]
    destination = Path(dest)
    if listed and listed[0].sha256 == digest:  # a file version: the run's record at the path is immutable
        name = path.rsplit("/", 1)[-1]
        pinned = artifact_pb2.Artifact(path=path, sha256=digest, size=listed[0].size)
        plan = [(pinned, local_target(destination, name) if destination.is_dir() else destination)]
        single = True
    else:
        entries = _manifest(stub, digest, path)
        plan = [
            (
                artifact_pb2.Artifact(path=f"{path}/{e['path']}", sha256=e["sha256"], size=e["size"]),
                local_target(destination, e["path"]),
            )
            for e in entries
        ]
        refuse_collisions(destination, [e["path"] for e in entries])
        refuse_own_names([local for _, local in plan])
        single = False
    _fetch(stub, plan, f"{path}@{digest[:12]}", resume=resume, presigned=presigned, progress=progress)
    return plan[0][1] if single else destination


def _manifest(stub: artifact_service_pb2_grpc.ArtifactServiceStub, digest: str, path: str) -> list[dict[str, Any]]:
    """A directory's manifest, fetched by its digest and checked against it: the entries' paths and digests."""
    try:
        body = b"".join(m.chunk for m in stub.DownloadArtifact(pb.DownloadArtifactRequest(sha256=digest)))
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    if hashlib.sha256(body).hexdigest() != digest:
        raise DataLoss(f"the manifest of {path} does not match its sha256 {digest}", reason="DIGEST_MISMATCH")
    try:
        entries = json.loads(body)
        checked = [{"path": str(e["path"]), "sha256": str(e["sha256"]), "size": int(e["size"])} for e in entries]
    except (ValueError, TypeError, KeyError) as exc:
        raise DataLoss(f"the manifest of {path} ({digest}) is not a manifest: {exc}", reason="BAD_MANIFEST") from None
    return checked


def list_artifacts(
    channel: grpc.Channel, run_id: str, *, prefix: str = "", unary: Unary | None = None
) -> Iterator[artifact_pb2.Artifact]:
    """Every artifact of the run whose path starts with `prefix`, in path order (all pages). `unary(method,
    request)` makes each page's call (the Client's, with its deadline and retries); a plain call by default."""
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    call = unary or _plain
    token = ""
    while True:
        page = call(stub.ListArtifacts, pb.ListArtifactsRequest(run_id=run_id, prefix=prefix, page_token=token))
        yield from page.artifacts
        token = page.next_page_token
        if not token:
            return


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _upload(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    run_id: str,
    local: Path,
    target: str,
    size: int,
    digest: str,
    meter: _Meter,
    retrying: Retrying | None = None,
) -> artifact_pb2.Artifact:
    sent = [0]  # bytes the meter counted in this attempt: taken back when it is repeated

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        yield pb.UploadArtifactRequest(
            header=pb.UploadArtifactHeader(run_id=run_id, path=target, size=size, sha256=digest)
        )
        with local.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield pb.UploadArtifactRequest(chunk=chunk)
                meter.advance(len(chunk))
                sent[0] += len(chunk)

    def send(**kw: Any) -> artifact_pb2.Artifact:
        meter.advance(-sent[0])
        sent[0] = 0
        return stub.UploadArtifact(requests(), **kw)

    def attempt(remaining: float) -> artifact_pb2.Artifact:
        return _sent_again_on_conflict(lambda: send(timeout=remaining, wait_for_ready=True))

    if retrying is None:
        try:
            return _sent_again_on_conflict(send)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
    return retrying(attempt)


def _sent_again_on_conflict(send: Callable[[], T]) -> T:
    """An upload refused as ABORTED BLOB_CHANGED met a stored copy that changed while the upload replaced it
    (damaged again, cut short, deleted): that conflict is over by then, and the same bytes sent again are stored."""
    for conflicts in itertools.count():
        try:
            return send()
        except grpc.RpcError as err:
            if conflicts >= BLOB_CHANGED_RESENDS or from_rpc_error(err).reason != "BLOB_CHANGED":
                raise
    raise AssertionError("unreachable")


def _download(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    artifact: artifact_pb2.Artifact,
    target: Path,
    resume: bool,
    meter: _Meter,
    direct: _Direct,
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _one_download_at_a_time(target):
        _download_here(stub, artifact, target, resume, meter, direct)


# Download locks this process holds: a forked child closes its copies, so that it does not keep holding them.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def _one_download_at_a_time(target: Path) -> Iterator[None]:
    """Downloads of one file take turns, across threads and processes (the ranks of a node fetching one
    adapter into a shared cache): they share its partial file, and one would rename the other's unfinished
    bytes into place. Taking turns, the next one finds the file complete and keeps it. The lock is a file next
    to the partial one, removed by its holder; a waiter that then holds a removed file tries again."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): downloads there do not coordinate
        yield
        return
    lock = partial_path(target, LOCK_SUFFIX)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some network mounts): no coordination there
            os.close(fd)
            _LOGGER.debug("cannot lock %s for downloading (%s); going ahead without", lock, exc)
            yield
            return
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the lock file still in place: ours
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we waited: lock the one in place now
    _held_locks.add(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        _held_locks.discard(fd)
        os.close(fd)


def _download_here(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    artifact: artifact_pb2.Artifact,
    target: Path,
    resume: bool,
    meter: _Meter,
    direct: _Direct,
) -> None:
    """`_download` once its turn for the target has come."""
    if target.is_file() and target.stat().st_size == artifact.size and file_digest(target)[1] == artifact.sha256:
        meter.advance(artifact.size)
        return
    partial = partial_path(target)
    digest = hashlib.sha256()
    offset = 0
    if resume and partial.is_file() and partial.stat().st_size <= artifact.size:
        with partial.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                offset += len(chunk)
    meter.advance(offset)
    resumed = offset > 0
    if not offset:
        # A new file rather than an emptied one: ext4 writes back a file truncated to zero when it is closed
        # (its auto_da_alloc heuristic), which stalls the close for ~0.1 s per 256 MiB.
        partial.unlink(missing_ok=True)
    with partial.open("r+b" if offset else "wb") as out:
        if offset:
            out.seek(offset)
            out.truncate()
        sink = _Sink(out, digest)  # hashing overlaps with writing and with receiving the next chunk
        try:
            offset = _receive(stub, artifact, offset, sink, meter, direct)
        finally:
            sink.close()
    if offset != artifact.size or digest.hexdigest() != artifact.sha256:
        partial.unlink(missing_ok=True)
        if resumed:  # the partial file was not (all) this artifact's: another download's, or damaged
            _LOGGER.info("%s: the partial file did not match; downloading it again from the start", artifact.path)
            meter.advance(-offset)  # the bytes counted for this file so far are counted again from zero
            return _download_here(stub, artifact, target, False, meter, direct)
        raise DataLoss(
            f"downloaded {artifact.path} ({offset} bytes, sha256 {digest.hexdigest()}) does not match "
            f"its recorded sha256 {artifact.sha256} ({artifact.size} bytes); the partial file was removed",
            reason="DIGEST_MISMATCH",
            metadata={"path": artifact.path, "expectedSha256": artifact.sha256, "actualSha256": digest.hexdigest()},
        )
    os.replace(partial, target)


def _receive(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub,
    artifact: artifact_pb2.Artifact,
    offset: int,
    sink: _Sink,
    meter: _Meter,
    direct: _Direct,
) -> int:
    """Stream the bytes from `offset` into the sink, through the server or straight from its store."""
    if artifact.run_id:
        request = pb.DownloadArtifactRequest(
            run_id=artifact.run_id, path=artifact.path, offset=offset, accept_presigned_url=direct.enabled
        )
    else:  # pinned by content: a model version's file
        request = pb.DownloadArtifactRequest(sha256=artifact.sha256, offset=offset, accept_presigned_url=direct.enabled)
    url = None
    try:
        call = stub.DownloadArtifact(request)
        for message in call:
            if message.WhichOneof("payload") == "artifact":
                if message.artifact.sha256 != artifact.sha256:
                    raise DataLoss(
                        f"{artifact.path} changed while downloading (sha256 {message.artifact.sha256})",
                        reason="DIGEST_MISMATCH",
                    )
                url = message.presigned_url or None
                continue
            chunk = message.chunk
            sink.put(chunk)
            offset += len(chunk)
            meter.advance(len(chunk))
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None  # the partial file stays for a resumed attempt
    if not isinstance(url, str):
        return offset
    try:
        offset = direct.fetch(url, offset, artifact.size, sink, meter)
        _LOGGER.debug("fetched %s straight from the artifact store", artifact.path)
        return offset
    except _FetchFailed as exc:
        _LOGGER.info("the artifact store is not reachable from here (%s): downloading through the server", exc)
        direct.enabled = False
        return _receive(stub, artifact, exc.offset, sink, meter, direct)


class _FetchFailed(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset


class _Direct:
    """The presigned-URL fast path of one download() call; after one failure the rest goes through the server.

    The bytes are read with the standard library's HTTP client straight into the sink's buffers: an HTTP
    library that hands out each chunk as new bytes copies every byte once or twice more, which on a
    machine whose cores also hash the file and serve it costs a tenth of the download's rate.
    """

    CONNECT_TIMEOUT = 3.0
    READ_TIMEOUT = 60.0

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._connection: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str] | None = None

    def fetch(self, url: str, offset: int, size: int, sink: _Sink, meter: _Meter) -> int:
        """Receive the bytes from `offset` to `size` into the sink; return the offset reached."""
        try:
            response = self._get(url, offset)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            raise _FetchFailed(offset, str(exc) or type(exc).__name__) from exc
        try:
            if response.status != (206 if offset else 200):
                raise _FetchFailed(offset, f"HTTP {response.status} from the artifact store")
            while True:
                buffer = sink.buffer()
                try:
                    n = response.readinto(buffer)
                except (OSError, http.client.HTTPException) as exc:  # a connection cut short: IncompleteRead
                    raise _FetchFailed(offset, str(exc) or type(exc).__name__) from exc
                if not n:
                    break
                sink.put(memoryview(buffer)[:n], buffer)
                offset += n
                meter.advance(n)
            if offset < size:  # the standard library's client reports a body cut short as its end
                raise _FetchFailed(offset, f"the artifact store's response ended at byte {offset} of {size}")
            return offset
        except BaseException:
            self.close()  # the rest of the body is unread: this connection cannot carry another request
            raise
        finally:
            response.close()

    def _get(self, url: str, offset: int) -> http.client.HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.netloc}")
        origin = (parts.scheme, parts.netloc)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        # The previous file's connection, unless its response said it would close (then http.client would open
        # the next one itself, with the connect timeout as the read timeout).
        if self._connection is not None and self._origin == origin and self._connection.sock is not None:
            try:  # the store may have closed it since
                self._connection.request("GET", target, headers=headers)
                return self._connection.getresponse()
            except (OSError, http.client.HTTPException):
                pass
        self.close()
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=self.CONNECT_TIMEOUT)
        self._connection, self._origin = connection, origin
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(self.READ_TIMEOUT)
        connection.request("GET", target, headers=headers)
        return connection.getresponse()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = self._origin = None


class _Sink:
    """Writes received bytes on the receiving thread and hashes them on another, a few chunks behind.

    Writing and hashing both release the GIL, so they run in parallel with each other and with the next
    receive: a verified download takes about as long as the slowest of them, not their sum. Writing stays
    on the receiving thread because a write error must stop the download at once, and a third thread only
    adds hand-offs. Buffers from `buffer()` go back to a small pool once hashed.
    """

    POOL = 8

    def __init__(self, out: BinaryIO, digest: Any) -> None:
        self._out = out
        self._digest = digest
        self._failure: BaseException | None = None
        self._hashing: queue.Queue[tuple[bytes | memoryview, bytearray | None] | None] = queue.Queue(maxsize=16)
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._allocated = 0
        self._thread = threading.Thread(target=self._hash, name="runledger-download-hash", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (item := self._hashing.get()) is not None:
            data, buffer = item
            if self._failure is None:
                try:
                    self._digest.update(data)
                except BaseException as exc:
                    self._failure = exc
            if buffer is not None:
                self._free.put(buffer)

    def buffer(self) -> bytearray:
        """A buffer to receive into; pass it to `put` with the bytes received."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._allocated < self.POOL:
                self._allocated += 1
                return bytearray(CHUNK)
            return self._free.get()  # the hashing thread gives every buffer back, failed or not

    def put(self, data: bytes | memoryview, buffer: bytearray | None = None) -> None:
        """Write `data` now and hash it soon; `data` is a view of `buffer` if it came from `buffer()`."""
        if self._failure is not None:
            raise self._failure
        self._out.write(data)
        self._hashing.put((data, buffer))

    def close(self) -> None:
        """Wait until every chunk is hashed; raise what hashing raised."""
        self._hashing.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure


def _is_below(candidate: str, path: str) -> bool:
    return not path or candidate == path or candidate.startswith(f"{path}/")


class _Meter:
    """Progress of one transfer: a tqdm bar on a terminal, a user callback, or nothing."""

    def __init__(self, progress: Progress, total: int, label: str) -> None:
        self._total = total
        self._done = 0
        self._callback: Callable[[int, int], None] | None = None
        self._bar: Any = None
        if callable(progress):
            self._callback = progress
        elif progress or (progress is None and _stderr_is_terminal()):
            try:
                from tqdm import tqdm  # optional: progress bars only when it is installed
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)

    def advance(self, n: int) -> None:
        if not n:
            return
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(self._done, self._total)

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()
