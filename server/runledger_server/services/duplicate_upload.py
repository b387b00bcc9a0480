"""Uploading content the store already holds: stored once, but only once the stored copy is known to be intact.

A blob damaged in place keeps its size (bit rot, a bad disk, an operator's mistake), so its size alone cannot
tell an intact copy from a damaged one. Deduplicating against it would record every later upload of the same
content against bytes that no longer match their digest, and the blob would never heal. So the stored blob is
re-hashed while the upload streams in (reading it costs less than receiving it), and the upload's own verified
bytes replace it when it does not match.

Until the check ends, incoming bytes are held in memory up to a bound; past it they go to a real blob writer,
as for new content, and whichever way the check ends the upload is stored correctly.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from runledger_server.store.artifacts import BlobStore, BlobWriter

_LOGGER = logging.getLogger(__name__)

# Incoming bytes held while the stored copy is checked; past this they are written out.
HOLD_BYTES = 8 << 20


class DuplicateUpload:
    """A BlobWriter for content whose digest and size match a stored blob.

    `new_writer` opens the writer the upload would get as new content; it is opened only when the stored copy
    turns out damaged, or when the check takes longer than `hold_bytes` of the upload."""

    def __init__(
        self,
        blobs: BlobStore,
        sha256: str,
        size: int,
        new_writer: Callable[[], BlobWriter],
        hold_bytes: int = HOLD_BYTES,
    ) -> None:
        self._blobs = blobs
        self._sha256 = sha256
        self._size = size
        self._new_writer = new_writer
        self._hold_bytes = hold_bytes
        self._held: list[bytes] = []
        self._held_size = 0
        self._writer: BlobWriter | None = None
        self._lock = threading.Lock()  # write and abort may come from different pool threads
        self._cancelled = threading.Event()
        self._intact: Future[bool] = Future()
        threading.Thread(target=self._check, name="runledger-blob-check", daemon=True).start()

    def _check(self) -> None:
        """Whether the stored blob hashes to its digest. A blob that cannot be read counts as damaged: the
        upload's bytes are then stored, and a store that is down fails that write with its own error."""
        digest = hashlib.sha256()
        seen = 0
        try:
            chunks = self._blobs.open_range(self._sha256, 0)
            try:
                for chunk in chunks:
                    if self._cancelled.is_set():
                        break
                    digest.update(chunk)
                    seen += len(chunk)
                    if seen > self._size:
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            intact = not self._cancelled.is_set() and seen == self._size and digest.hexdigest() == self._sha256
        except Exception as exc:  # the verdict is what matters; the write that follows reports a real failure
            _LOGGER.warning("stored blob sha256 %s could not be read to check it: %s", self._sha256, exc)
            intact = False
        if not intact and not self._cancelled.is_set():
            _LOGGER.warning(
                "stored blob sha256 %s does not match its digest; the upload's verified bytes replace it", self._sha256
            )
        self._intact.set_result(intact)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.write(data)
            elif self._intact.done() and self._intact.result():
                self._release()  # the stored copy is intact: these bytes are verified by the upload, not kept
            else:
                self._held.append(data)
                self._held_size += len(data)
                if self._intact.done() or self._held_size > self._hold_bytes:
                    self._spill()

    def commit(self, sha256: str) -> str:
        with self._lock:
            if self._writer is None:
                if self._intact.result():
                    self._release()
                    return self._blobs.uri(sha256)
                self._spill()
            elif self._intact.done() and self._intact.result():
                self._writer.abort()  # written out while the check ran, which then found the stored copy intact
                return self._blobs.uri(sha256)
            self._cancelled.set()  # the verified bytes replace the stored copy, whatever the check would find
            assert self._writer is not None
            return self._writer.commit(sha256)

    def abort(self) -> None:
        self._cancelled.set()
        with self._lock:
            self._release()
            if self._writer is not None:
                self._writer.abort()

    def _spill(self) -> None:
        """From here on the upload's bytes are kept, those held so far first."""
        self._writer = self._new_writer()
        for chunk in self._held:
            self._writer.write(chunk)
        self._release()

    def _release(self) -> None:
        self._held.clear()
        self._held_size = 0
