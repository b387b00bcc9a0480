"""Artifact uploads under storage faults, on the real server: a disk that takes only part of a write, a blob
cut short by an old failure, an S3 store that stalls, calls cancelled (or timed out) at the worst moment.
Whatever happens, nothing broken is published or recorded, nothing stays behind, and no thread is left stuck."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from runledger.v1 import artifact_service_pb2 as pb
from runledger_server.backends.artifacts import minio as s3_backend
from runledger_server.backends.artifacts.local import LocalBlobStore
from runledger_server.backends.artifacts.minio import S3BlobStore
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer
from runledger_server.services.artifacts import ArtifactService
from tests.fixtures.s3 import S3Server
from tests.integration.test_artifacts import (
    MiB,
    Stub,
    _blob,
    _count_s3,
    _download,
    _new_run,
    _paths,
    _requests,
    _tracking,
    _upload,
    _wait_until,
)
from tests.support import refusal

UPLOAD_THREAD = "runledger-s3-upload"


# ---- a stalling S3: a relay on loopback in front of the test S3 server ---------------------------------
class _S3Relay:
    """A TCP relay to the test S3 server that can hold requests (chosen by their request line) until released:
    an S3 endpoint that stalls, seen by the SDK through real sockets."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._hold: Callable[[bytes], bool] | None = None
        self._released = threading.Event()
        self.holding = threading.Event()  # set once a request is held
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="s3-relay", daemon=True).start()

    def hold(self, request_line: Callable[[bytes], bool]) -> None:
        self._released.clear()
        self.holding.clear()
        self._hold = request_line

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def close(self) -> None:
        self.release()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        # HTTP/1.1 without pipelining: a request starts at the start of a read, after the previous response.
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                hold = self._hold
                if requests and hold is not None and hold(data.split(b"\r\n", 1)[0]):
                    self.holding.set()
                    self._released.wait(60)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)


def _part_upload(line: bytes) -> bool:
    return line.startswith(b"PUT ") and b"partNumber=" in line


def _blob_lookup(line: bytes) -> bool:
    return line.startswith(b"HEAD ") and b"/sha256/" in line


@pytest.fixture
def relay(s3_server: S3Server) -> Iterator[_S3Relay]:
    r = _S3Relay(s3_server.endpoint)
    yield r
    r.close()


def _s3_settings(tmp_path: Path, s3: S3Server, prefix: str, endpoint: str | None = None) -> Settings:
    base = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    return replace(s3, endpoint=endpoint or s3.endpoint).settings(base, prefix)


# ---- what a stuck upload looks like ------------------------------------------------------------------
def _upload_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == UPLOAD_THREAD}


def _threads_in(fn: Callable[..., object]) -> int:
    """How many threads are running `fn` now (e.g. waiting inside it)."""
    code = getattr(fn, "__code__", None)
    inside = 0
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None and f.f_code is not code:
            f = f.f_back
        inside += f is not None
    return inside


def _waiting_in_pipe_write() -> int:
    """Threads inside an S3 upload's `write`, waiting for room in its pipe."""
    return _threads_in(s3_backend._Pipe.write)


def _opening_uploads() -> int:
    return _threads_in(ArtifactService.begin_upload)


def _stops_promptly(server: EmbeddedServer, within: float = 15.0) -> bool:
    """Stop on another thread: `stop` waits for the artifact pool, so a pool thread stuck for good hangs it."""
    stopper = threading.Thread(target=server.stop, name="stopper", daemon=True)
    stopper.start()
    stopper.join(within)
    return not stopper.is_alive()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# ---- 1. a write the disk takes only part of ------------------------------------------------------------
@contextlib.contextmanager
def _server_process(data_dir: Path, log: Path) -> Iterator[tuple[int, str]]:
    """`runledger serve` in a child process (its file-size limit can then be lowered alone): (pid, address)."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runledger_server",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("runledger listening on "), (line, log.read_text())
        yield proc.pid, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_a_short_write_is_refused_and_a_later_upload_stores_the_whole_blob(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs prlimit (Linux) to lower one process's file-size limit")
    data = _blob(2 * MiB, seed=21)
    digest = hashlib.sha256(data).hexdigest()
    root = tmp_path / "data" / "artifacts"
    with _server_process(tmp_path / "data", tmp_path / "server.log") as (pid, address):
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        with grpc.insecure_channel(address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            # Like a disk filling up: the last write of the upload stores only part of its bytes.
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (3 * MiB // 2, hard))
            r = refusal(lambda: _upload(stub, run, "ckpt.bin", data))
            assert (r.code, r.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "ARTIFACT_STORE_FULL")
            assert str(root) in r.message
            assert _paths(stub, run) == [] and _files(root) == []  # no record, no blob, no temp file

            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
            art = _upload(stub, run, "ckpt.bin", data)
            assert (art.sha256, art.size) == (digest, len(data))
            (blob,) = _files(root)
            assert blob.name == digest and blob.read_bytes() == data
            assert _download(stub, run_id=run, path="ckpt.bin")[1] == data


# ---- 1. a blob of the wrong size under a digest is replaced, not trusted ------------------------------
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    if backend == "local":
        return Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    s3: S3Server = request.getfixturevalue("s3_server")
    return _s3_settings(tmp_path, s3, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def plant(
    backend: str, store_settings: Settings, request: pytest.FixtureRequest
) -> Callable[[str, bytes | None], bytes | None]:
    """`plant(digest, content)` puts content at a digest's address behind the server's back; `plant(digest,
    None)` reads what is there."""
    if backend == "local":
        store = LocalBlobStore(Path(store_settings.artifact_location))

        def local(digest: str, content: bytes | None) -> bytes | None:
            path = store.path(digest)
            if content is None:
                return path.read_bytes()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            return None

        return local
    s3: S3Server = request.getfixturevalue("s3_server")
    client = s3.client()
    key_prefix = store_settings.artifacts.removeprefix(f"s3://{s3.bucket}/")

    def remote(digest: str, content: bytes | None) -> bytes | None:
        key = f"{key_prefix}/sha256/{digest[:2]}/{digest[2:4]}/{digest}"
        if content is None:
            response = client.get_object(s3.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()
        if not client.bucket_exists(s3.bucket):
            client.make_bucket(s3.bucket)
        client.put_object(s3.bucket, key, io.BytesIO(content), len(content))
        return None

    return remote


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
def test_a_blob_cut_short_under_a_digest_is_replaced_by_the_next_upload(
    store_settings: Settings, plant: Callable[[str, bytes | None], bytes | None], declared: bool
) -> None:
    data = _blob(3 * MiB + 7, seed=22)
    digest = hashlib.sha256(data).hexdigest()
    plant(digest, data[:MiB])  # what a short write used to leave, under the full content's digest
    with EmbeddedServer(store_settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        kw: dict[str, Any] = {} if declared else {"size": None, "sha256": None}
        art = _upload(stub, run, "ckpt.bin", data, **kw)
        assert (art.sha256, art.size) == (digest, len(data))
        assert _download(stub, run_id=run, path="ckpt.bin")[1] == data
        assert _download(stub, sha256=digest)[1] == data
    assert plant(digest, None) == data


def _s3_store(s3: S3Server, endpoint: str) -> S3BlobStore:
    """A store of its own under a fresh prefix of the test bucket, reached at `endpoint` (the server or a relay)."""
    return S3BlobStore(
        endpoint=endpoint,
        bucket=s3.bucket,
        prefix=f"t-{uuid.uuid4().hex[:12]}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=s3.secure,
        region=s3.region,
    )


def test_put_replaces_a_blob_cut_short(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The way directory manifests (content of known digest) are stored checks the stored size as well."""
    data = b'[{"path":"a","sha256":"00","size":1}]'
    digest = hashlib.sha256(data).hexdigest()
    store: LocalBlobStore | S3BlobStore
    if backend == "local":
        store = LocalBlobStore(tmp_path / "blobs")
        store.path(digest).parent.mkdir(parents=True)
        store.path(digest).write_bytes(data[:10])
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        store = _s3_store(s3, s3.endpoint)
        store.ensure_bucket()
        store.client.put_object(store.bucket, store.key(digest), io.BytesIO(data[:10]), 10)
    assert store.put(digest, io.BytesIO(data), len(data)) == store.uri(digest)
    assert b"".join(store.open_range(digest, 0)) == data


@pytest.mark.s3
def test_an_s3_read_closed_before_its_first_chunk_gives_its_connection_back(s3_server: S3Server) -> None:
    """A download cancelled at once closes its chunks unread: the GET's connection must go back to the pool."""
    store = _s3_store(s3_server, s3_server.endpoint)
    data = _blob(3 * MiB, seed=5)
    digest = hashlib.sha256(data).hexdigest()
    store.put(digest, io.BytesIO(data), len(data))
    pool = store.client._http.connection_from_url(f"{'https' if s3_server.secure else 'http'}://{s3_server.endpoint}")

    def idle() -> int:
        return sum(conn is not None for conn in list(pool.pool.queue))

    before = idle()
    assert before >= 1
    for offset in (0, 0, MiB):
        chunks = store.open_range(digest, offset)
        chunks.close()  # type: ignore[attr-defined]
        assert idle() == before
    assert b"".join(store.open_range(digest, MiB)) == data[MiB:]  # read to the end: given back as well
    assert idle() == before


# ---- 2. an upload cancelled while its last write waits on a stalled S3 --------------------------------------
@pytest.mark.s3
def test_a_cancel_during_the_last_write_to_a_stalled_s3_leaves_no_thread_stuck(
    tmp_path: Path, s3_server: S3Server, relay: _S3Relay
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    # The SDK takes the first part, then stalls sending it; the pipe fills, and the last chunk (the final
    # write of the upload: an odd number of MiB after the 2 MiB batches) waits for room in it.
    data = _blob(s3_backend.PART_SIZE + s3_backend.PIPE_BYTES + MiB, seed=23)
    before = _upload_threads()
    server = EmbeddedServer(_s3_settings(tmp_path, s3_server, prefix, relay.endpoint)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            relay.hold(_part_upload)
            call = stub.UploadArtifact.future(_requests(run, "stalled.bin", data))
            assert relay.holding.wait(30) and _wait_until(lambda: _waiting_in_pipe_write() > 0)
            call.cancel()
            time.sleep(0.3)  # the cleanup starts; the store then answers again
            relay.release()
            assert _wait_until(lambda: _waiting_in_pipe_write() == 0 and not _upload_threads() - before, 15), (
                "a thread is still stuck in the cancelled upload"
            )
            assert _paths(stub, run) == []
        assert _wait_until(lambda: _count_s3(s3_server.client(), s3_server, f"{prefix}/") == 0)
    finally:
        relay.release()
        assert _stops_promptly(server), "the server's stop hangs on the artifact pool"


@pytest.mark.s3
def test_an_s3_write_waiting_for_room_is_woken_by_abort(s3_server: S3Server, relay: _S3Relay) -> None:
    """Whoever aborts an upload while a write waits on a stalled store: the write fails at once, not never."""
    store = _s3_store(s3_server, relay.endpoint)
    data = _blob(s3_backend.PART_SIZE + s3_backend.PIPE_BYTES + MiB, seed=25)
    before = _upload_threads()
    relay.hold(_part_upload)
    writer = store.writer(hashlib.sha256(data).hexdigest(), len(data))
    failed: list[BaseException] = []

    def write_all() -> None:
        try:
            for i in range(0, len(data), MiB):
                writer.write(data[i : i + MiB])
        except BaseException as exc:
            failed.append(exc)

    writing = threading.Thread(target=write_all, daemon=True)
    writing.start()
    assert relay.holding.wait(30) and _wait_until(lambda: _waiting_in_pipe_write() > 0)
    aborting = threading.Thread(target=writer.abort, daemon=True)
    aborting.start()
    writing.join(5)  # while the store still stalls
    assert not writing.is_alive() and len(failed) == 1, "the write still waits for room in an aborted upload"
    relay.release()
    aborting.join(15)
    assert not aborting.is_alive() and not _upload_threads() - before
    assert _count_s3(s3_server.client(), s3_server, store.prefix) == 0


# ---- 3. a cancel or deadline while an upload is being opened --------------------------------------------
def _expire_while_opening(stub: Stub, run: str, n: int = 2) -> None:
    """Uploads whose deadline passes while the server opens them (a header only: they would be empty)."""
    for i in range(n):
        header = pb.UploadArtifactHeader(
            run_id=run, path=f"late-{i}.bin", size=5, sha256=hashlib.sha256(b"late!").hexdigest()
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadArtifact(iter([pb.UploadArtifactRequest(header=header)]), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.s3
def test_a_deadline_while_an_s3_upload_opens_leaves_no_upload_thread(
    tmp_path: Path, s3_server: S3Server, relay: _S3Relay
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    before = _upload_threads()
    server = EmbeddedServer(_s3_settings(tmp_path, s3_server, prefix, relay.endpoint)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            relay.hold(_blob_lookup)  # the store is slow to say whether the content is there already
            _expire_while_opening(stub, run)
            assert relay.holding.is_set()
            relay.release()
            assert _wait_until(lambda: _opening_uploads() == 0)  # each upload is open now, its call long over
            assert _wait_until(lambda: not _upload_threads() - before, 15), "an opened upload was never aborted"
            assert _paths(stub, run) == []
        assert _count_s3(s3_server.client(), s3_server, f"{prefix}/") == 0
    finally:
        relay.release()
        assert _stops_promptly(server)


class _SlowTempFiles:
    """The local store's temp files on a slow disk: creating one, or writing from `hold_write_at` bytes on, waits
    until released. Every file is watched for a `close` that comes while a write still runs."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.hold_open = False
        self.hold_write_at: int | None = None
        self.held = threading.Event()
        self.released = threading.Event()
        self.closed_mid_write: list[int] = []
        self._fds: set[int] = set()
        self._mkstemp = tempfile.mkstemp
        self._fdopen = os.fdopen

    def mkstemp(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
        ours = Path(str(kwargs.get("dir", ""))) == self.tmp_dir
        if ours and self.hold_open:
            self.held.set()
            self.released.wait(30)
        fd, name = self._mkstemp(*args, **kwargs)
        if ours:
            self._fds.add(fd)
        return fd, name

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        if fd in self._fds:
            self._fds.discard(fd)
            return _WatchedFile(fd, self)
        return self._fdopen(fd, *args, **kwargs)


class _WatchedFile(io.FileIO):
    def __init__(self, fd: int, disk: _SlowTempFiles) -> None:
        super().__init__(fd, "wb")
        self._disk = disk
        self._writing = 0
        self._written = 0

    def write(self, data: Any) -> int:
        self._writing += 1
        try:
            at = self._disk.hold_write_at
            if at is not None and self._written >= at:
                self._disk.held.set()
                self._disk.released.wait(30)
            written = super().write(data) or 0
            self._written += written
            return written
        finally:
            self._writing -= 1

    def close(self) -> None:
        if self._writing:
            self._disk.closed_mid_write.append(self._written)
        super().close()


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")).start()
    try:
        yield server
    finally:
        assert _stops_promptly(server)


@pytest.fixture
def slow_disk(local_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[_SlowTempFiles]:
    disk = _SlowTempFiles(Path(local_server.settings.artifact_location) / "tmp")
    monkeypatch.setattr(tempfile, "mkstemp", disk.mkstemp)
    monkeypatch.setattr(os, "fdopen", disk.fdopen)
    yield disk
    disk.released.set()


def test_a_deadline_while_a_local_upload_opens_leaves_no_temp_file(
    local_server: EmbeddedServer, slow_disk: _SlowTempFiles
) -> None:
    with grpc.insecure_channel(local_server.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        slow_disk.hold_open = True
        _expire_while_opening(stub, run, n=1)
        assert slow_disk.held.is_set()
        slow_disk.released.set()
        assert _wait_until(lambda: _opening_uploads() == 0)  # the upload is open now, its call long over
        assert _wait_until(lambda: _files(slow_disk.tmp_dir) == []), "an opened upload was never aborted"
        assert _paths(stub, run) == []


def test_a_cancelled_local_upload_is_aborted_only_after_its_last_write(
    local_server: EmbeddedServer, slow_disk: _SlowTempFiles
) -> None:
    """Closing the temp file under a running write would let the write (or a later one on a reused descriptor
    number) land in another upload's file."""
    data = _blob(5 * MiB, seed=24)  # two 2 MiB batches, then a final write of 1 MiB
    root = Path(local_server.settings.artifact_location)
    with grpc.insecure_channel(local_server.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        slow_disk.hold_write_at = 4 * MiB
        call = stub.UploadArtifact.future(_requests(run, "slow.bin", data))
        assert slow_disk.held.wait(30)
        call.cancel()
        time.sleep(0.3)  # the cleanup starts while the final write is still on the disk
        slow_disk.released.set()
        assert _wait_until(lambda: _files(root) == [])
        assert slow_disk.closed_mid_write == [], "the upload's file was closed while a write still used it"
        assert _paths(stub, run) == []


# ---- an upload without a declared size, beyond what its fixed part size allows ------------------------------
def test_an_undeclared_size_beyond_the_s3_part_limit_is_invalid_argument_and_leaves_nothing(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two parts instead of S3's 10,000, so that the limit (parts x 16 MiB) is reached with 33 MiB instead of 156 GiB.
    monkeypatch.setattr(s3_backend, "MAX_PARTS", 2)
    limit = 2 * s3_backend.UNKNOWN_SIZE_PART
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    with (
        EmbeddedServer(_s3_settings(tmp_path, s3_server, prefix)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        r = refusal(lambda: _upload(stub, run, "big.bin", _blob(limit + MiB, seed=5), size=None, sha256=None))
        assert (r.code, r.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SIZE_REQUIRED")
        assert r.metadata["field"] == "size"
        assert "declare its size" in r.message
        assert _paths(stub, run) == []
        data = _blob(limit, seed=6)  # at the limit: stored, declared or not
        art = _upload(stub, run, "fits.bin", data, size=None, sha256=None)
        assert (art.size, art.sha256) == (limit, hashlib.sha256(data).hexdigest())
        assert _download(stub, run_id=run, path="fits.bin")[1] == data
        declared = _blob(limit + MiB, seed=7)  # a declared size chooses its own part size
        assert _upload(stub, run, "declared.bin", declared).size == len(declared)
    # The refused upload left no object or unfinished multipart upload; the two stored blobs remain.
    assert _wait_until(lambda: _count_s3(s3_server.client(), s3_server, f"{prefix}/") == 2)
