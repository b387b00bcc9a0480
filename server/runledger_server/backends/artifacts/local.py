"""Blobs in a local directory (the embedded default): `<root>/sha256/ab/cd/<hex>`, published atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from runledger_server.backends.artifacts.verified_put import put_verified
from runledger_server.domain.errors import NotFound, ResourceExhausted, Unavailable

_LOGGER = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
# A partial upload no process holds (its lock is free) is removed at start-up once it is this old: younger, it
# may belong to an upload another server on this directory has just opened and not locked yet.
ORPHAN_TEMP_SECONDS = 60
# Where the file system cannot lock files, only age tells an abandoned upload from a live one.
STALE_TEMP_SECONDS = 24 * 3600
# While an upload streams in, what it has written so far goes to disk in the background every this many bytes,
# so the fsync before publishing has only the tail left (a 256 MiB file otherwise waits ~0.4 s on it here).
WRITEBACK_BYTES = 16 << 20
UNAVAILABLE = "ARTIFACT_STORE_UNAVAILABLE"
FULL = "ARTIFACT_STORE_FULL"
# A full disk, a quota, a file-size limit: no room for the bytes, which only an operator can change.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_writeback = ThreadPoolExecutor(max_workers=4, thread_name_prefix="runledger-writeback")


class LocalBlobStore:
    """Writes go to `<root>/tmp` (same filesystem), are fsynced, then renamed into place: a blob is
    either absent or complete, never partial, even across a crash."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._tmp = self.root / "tmp"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            (self.root / "sha256").mkdir(exist_ok=True)
        except OSError as exc:
            raise _store_error(self.root, exc) from exc
        self._sweep_stale_temp()

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def uri(self, sha256: str) -> str:
        return self.path(sha256).as_uri()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        """The stored blob's size; whoever deduplicates against it compares this with the content's size."""
        return _file_size(self.path(sha256))

    def presigned_get(self, sha256: str) -> str | None:
        return None  # a client reads a local store only through the server

    def writer(self, sha256: str | None = None, size: int | None = None) -> LocalBlobWriter:
        del sha256, size  # the final name is decided at commit time either way
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        except OSError as exc:  # a full, read-only or unreachable volume: a refusal naming the store
            raise _store_error(self.root, exc) from exc
        with contextlib.suppress(OSError):  # held until the file is closed, or its process dies
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return LocalBlobWriter(self, os.fdopen(fd, "wb", buffering=0), Path(name))

    def put(self, sha256: str, stream: BinaryIO, size: int) -> str:
        """Store content whose digest is known; the bytes are checked against it on the way in."""
        return put_verified(self, sha256, stream, size)

    def open_range(self, sha256: str, offset: int) -> Iterator[bytes]:
        try:
            f = self.path(sha256).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob sha256 {sha256} is missing from {self.root}", field="sha256") from exc
        return _read_from(f, offset)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def count(self) -> int:
        """How many blobs are stored (for tests and operators)."""
        return sum(1 for p in (self.root / "sha256").glob("*/*/*") if p.is_file())

    def _sweep_stale_temp(self) -> None:
        """Remove the partial uploads of processes that died (kill -9, a crash) while they were being written.

        Each upload holds a lock on its temp file while it is open; the kernel drops it with the process. So a
        server restarted after a kill reclaims that space at once, while the uploads of other servers that
        share this directory, still running, keep their files."""
        now = time.time()
        for p in self._tmp.glob("upload-*"):
            with contextlib.suppress(OSError):
                age = now - p.stat().st_mtime
                if age >= ORPHAN_TEMP_SECONDS and (age >= STALE_TEMP_SECONDS or _unheld(p)):
                    p.unlink()
                    _LOGGER.info("removed the partial upload %s, which no process holds", p)


class LocalBlobWriter:
    """One upload in progress: a temp file that becomes `<root>/sha256/...` on commit, or disappears.

    Calls may come from different pool threads; a lock keeps `abort` from closing the file while a write
    still uses its descriptor (the number could be reused by another upload's file meanwhile)."""

    def __init__(self, store: LocalBlobStore, f: BinaryIO, tmp: Path) -> None:
        self._store = store
        self._f = f
        self._tmp = tmp
        self._lock = threading.Lock()
        self._received = 0
        self._unsynced = 0
        self._syncing: Future[None] | None = None

    def write(self, data: bytes) -> None:
        with self._lock:
            try:
                _write_all(self._f, data)
            except OSError as exc:
                raise _store_error(self._store.root, exc) from exc
            self._received += len(data)
            self._unsynced += len(data)
            if self._unsynced >= WRITEBACK_BYTES and (self._syncing is None or self._syncing.done()):
                self._unsynced = 0
                self._syncing = _writeback.submit(os.fdatasync, self._f.fileno())

    def _settle(self) -> None:
        """Wait for the background writeback; its errors do not matter, the final fsync reports them."""
        if self._syncing is not None:
            with contextlib.suppress(OSError):
                self._syncing.result()
            self._syncing = None

    def commit(self, sha256: str) -> str:
        final = self._store.path(sha256)
        with self._lock:
            try:
                self._f.flush()
                self._settle()
                self._check_complete()
                os.fsync(self._f.fileno())
                self._f.close()
                if _file_size(final) == self._received and _same_content(self._tmp, final):
                    self._tmp.unlink()  # identical content is stored once
                else:  # absent, or other bytes (damaged in place, or cut short by an old failure): replaced
                    _make_dirs(final.parent)
                    os.replace(self._tmp, final)
                    _fsync_dir(final.parent)
            except OSError as exc:
                self._discard()
                raise _store_error(self._store.root, exc) from exc
            except BaseException:
                self._discard()
                raise
        return self._store.uri(sha256)

    def _check_complete(self) -> None:
        """Publish only a temp file that holds every byte received, whatever a write reported."""
        kept = os.fstat(self._f.fileno()).st_size
        if kept != self._received:
            raise Unavailable(
                f"the artifact directory {self._store.root} kept {kept} of the {self._received} bytes received; "
                "nothing was stored",
                reason=UNAVAILABLE,
            )

    def abort(self) -> None:
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        self._settle()  # the file descriptor stays open until no writeback uses it
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def _write_all(f: BinaryIO, data: bytes) -> None:
    """An unbuffered write may store only part of the bytes (a file-size limit, a filling disk): write the rest,
    so that the failure, if there is one, is raised instead of leaving the file short."""
    view = memoryview(data)
    while view:
        written = f.write(view)
        if not written:  # nothing stored and no error reported: still no room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _unheld(path: Path) -> bool:
    """Whether no process holds the upload lock of this temp file (False when locks are not supported)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (EWOULDBLOCK), or a file system without locks
        return False
    finally:
        os.close(fd)
    return True


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _same_content(new: Path, stored: Path) -> bool:
    """Whether a stored blob holds the same bytes as a new file (its size alone does not say it is intact);
    one that cannot be read (a bad sector, gone meanwhile) does not, and is replaced."""
    with new.open("rb") as fa:
        try:
            fb = stored.open("rb")
        except OSError as exc:
            return _unreadable(stored, exc)
        with fb:
            while True:
                chunk = fa.read(READ_CHUNK)  # the new file's errors are the upload's, raised as such
                try:
                    same = chunk == fb.read(READ_CHUNK)
                except OSError as exc:
                    return _unreadable(stored, exc)
                if not same:
                    return False
                if not chunk:
                    return True


def _unreadable(stored: Path, exc: OSError) -> bool:
    _LOGGER.warning("stored blob %s could not be read to compare it: %s; it is replaced", stored, exc)
    return False


def _store_error(root: Path, exc: OSError) -> Unavailable | ResourceExhausted:
    if exc.errno in _NO_ROOM:
        return ResourceExhausted(f"the artifact directory {root} has no room: {exc}; nothing was stored", reason=FULL)
    return Unavailable(f"the artifact directory {root} failed: {exc}", reason=UNAVAILABLE)


def _read_from(f: BinaryIO, offset: int) -> Iterator[bytes]:
    with f:
        f.seek(offset)
        while chunk := f.read(READ_CHUNK):
            yield chunk


def _make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories are each flushed into their parent: a blob renamed into a directory
    whose own entry never reached the disk could vanish with it after a power loss, its record kept."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another commit: flushed here as well
            d.mkdir()
        _fsync_dir(d.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
