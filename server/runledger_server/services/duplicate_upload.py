"""Uploading content the store already holds: stored once, but only once the stored copy is known to be intact.

A blob damaged in place keeps its size (bit rot, a bad disk, an operator's mistake), so its size alone cannot
tell an intact copy from a damaged one. Deduplicating against it would record every later upload of the same
content against bytes that no longer match their digest, and the blob would never heal.

So the upload's bytes are compared with the stored copy as they arrive, at the same offsets. The upload itself
checks that its bytes hash to the digest; a stored copy equal to them byte for byte is therefore intact, and
nothing is written. At the first difference (or a stored copy that cannot be read, or that runs short or long),
the upload becomes a write of new content: the bytes before that offset, which matched, are copied from the
stored copy, the rest come from the upload, and the result replaces the stored copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np

from runledger_server.domain.errors import Aborted, DomainError, NotFound, Unavailable
from runledger_server.store.artifacts import BlobStore, BlobWriter

_LOGGER = logging.getLogger(__name__)


class DuplicateUpload:
    """A BlobWriter for content whose digest and size match a stored blob.

    `new_writer` opens the writer the upload would get as new content; it is opened only when the upload's
    bytes differ from the stored copy. Memory: at most one chunk of the stored copy beyond the upload's own."""

    def __init__(self, blobs: BlobStore, sha256: str, size: int, new_writer: Callable[[], BlobWriter]) -> None:
        self._blobs = blobs
        self._sha256 = sha256
        self._size = size
        self._new_writer = new_writer
        self._stored: Iterator[bytes] | None = None  # the stored copy, read as far as the upload has come
        self._pending = memoryview(b"")  # read from the stored copy, not compared yet
        self._matched = 0  # bytes of the upload equal to the stored copy so far
        self._writer: BlobWriter | None = None  # set once the upload differs: from then on its bytes are kept
        self._written = hashlib.sha256()  # what the replacement holds, once there is one
        self._closed = False
        self._lock = threading.Lock()  # write and abort may come from different pool threads

    def write(self, data: bytes) -> None:
        with self._lock:
            self._check_open()
            if self._writer is None:
                same = self._compare(memoryview(data))
                if same == len(data):
                    return
                self._diverge()
                data = data[same:]  # what matched is in the new write already
            self._write(data)

    def commit(self, sha256: str) -> str:
        with self._lock:
            self._check_open()
            self._closed = True
            if self._writer is None:
                if self._matched == self._size and self._at_end():
                    self._close_stored()
                    return self._blobs.uri(sha256)
                self._diverge()  # the stored copy is longer than the upload
            assert self._writer is not None
            if self._written.hexdigest() != sha256:  # the prefix read again changed under us (it matched)
                raise self._changed()
            return self._writer.commit(sha256)

    def abort(self) -> None:
        with self._lock:
            self._closed = True
            self._close_stored()
            if self._writer is not None:
                self._writer.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the upload was already committed or aborted")

    def _compare(self, data: memoryview) -> int:
        """How many of the upload's next bytes equal the stored copy at the same offsets: all, or those before
        the stretch that differs, the stored copy's end, or a read that failed."""
        at = 0
        try:
            while at < len(data):
                if not self._pending:
                    self._pending = memoryview(self._next_stored())
                    if not self._pending:
                        break  # the stored copy is shorter than the upload
                n = min(len(self._pending), len(data) - at)
                if not _same(self._pending[:n], data[at : at + n]):
                    break  # this stretch is written from the upload, with the rest
                self._pending = self._pending[n:]
                self._matched += n
                at += n
        except Exception as exc:  # unreadable: the upload's bytes are kept instead
            self._unreadable(exc)
        return at

    def _next_stored(self) -> bytes:
        if self._stored is None:
            self._stored = self._blobs.open_range(self._sha256, 0)
        return next(self._stored, b"")

    def _at_end(self) -> bool:
        """Whether the stored copy ends where the upload did (no bytes past its size)."""
        try:
            return not self._pending and not self._next_stored()
        except Exception as exc:
            return self._unreadable(exc)

    def _unreadable(self, exc: Exception) -> bool:
        """A stored copy that cannot be read counts as different: the upload's own bytes are kept."""
        _LOGGER.warning("stored blob sha256 %s could not be read to compare it: %s", self._sha256, exc)
        return False

    def _diverge(self) -> None:
        """From here on the upload's bytes are kept: start a new write with the matched prefix, read again from
        the stored copy (those bytes equal the upload's), and replace the stored copy with the result."""
        _LOGGER.warning(
            "stored blob sha256 %s differs from an upload of that content after %d bytes; the upload replaces it",
            self._sha256,
            self._matched,
        )
        self._close_stored()
        self._writer = writer = self._new_writer()
        try:
            copied = 0
            if self._matched:
                chunks = self._blobs.open_range(self._sha256, 0)
                try:
                    for chunk in chunks:
                        take = min(len(chunk), self._matched - copied)
                        self._write(chunk[:take])
                        copied += take
                        if copied == self._matched:
                            break
                finally:
                    _close_quietly(chunks)  # an S3 body goes back to its pool
            if copied != self._matched:
                raise self._changed()  # cut short since it was compared
        except BaseException as exc:
            self._writer = None
            writer.abort()
            if isinstance(exc, NotFound):  # gone since it was compared
                raise self._changed() from None
            if isinstance(exc, DomainError) or not isinstance(exc, Exception):
                raise
            raise Unavailable(
                f"the stored copy of sha256 {self._sha256} could not be read again ({exc}); nothing was stored",
                reason="ARTIFACT_STORE_UNAVAILABLE",
            ) from exc

    def _changed(self) -> Aborted:
        """The stored copy changed (damaged again, cut short, deleted) while this upload was replacing it: a
        conflict with whatever changed it, which the upload's bytes would settle if sent again."""
        return Aborted(
            f"the stored copy of sha256 {self._sha256} changed while an upload of that content replaced it; "
            "nothing was stored, upload it again",
            reason="BLOB_CHANGED",
            field="sha256",
        )

    def _write(self, data: bytes | memoryview) -> None:
        """Into the replacement, hashed on the way: what it holds is checked against the digest at commit."""
        assert self._writer is not None
        self._written.update(data)
        self._writer.write(bytes(data) if isinstance(data, memoryview) else data)

    def _close_stored(self) -> None:
        stored, self._stored = self._stored, None
        self._pending = memoryview(b"")
        _close_quietly(stored)


def _close_quietly(chunks: object) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _same(a: memoryview, b: memoryview) -> bool:
    """Byte-for-byte equality at memory speed (memoryview's own comparison goes element by element)."""
    return bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))
