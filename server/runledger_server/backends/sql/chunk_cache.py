"""Decoded metric chunks kept in memory, so that reading a curve skips the database's blob reads.

A stored chunk never changes: it is identified by (run, key, writer, seq), one per key of an accepted batch,
and its row is never updated. A cached chunk therefore can never be stale, on any replica; a replica that
has not seen a chunk simply reads it from the database. Chunks enter when this server commits them (so the
curve of a run being trained here is read from memory) and when they are read; the least recently used leave
beyond `max_bytes`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from runledger_server.domain.metrics import Series

ChunkKey = tuple[str, str, str, int]  # run_id, key, writer_id, seq

DEFAULT_MAX_BYTES = 128 << 20
# What an entry costs beyond its points, measured: three array headers, the Series, the key tuple and its
# strings, the dict node (~620 bytes with shared key strings, more without). A trainer logging every step in
# small batches makes chunks of a point or two, so the points alone would undercount memory 25-fold.
ENTRY_OVERHEAD = 768


class ChunkCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[ChunkKey, Series] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: ChunkKey) -> Series | None:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
            return chunk

    def put(self, key: ChunkKey, chunk: Series) -> None:
        size = _size(chunk)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._bytes -= _size(old)
            self._chunks[key] = chunk
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._chunks.popitem(last=False)
                self._bytes -= _size(evicted)


def _size(chunk: Series) -> int:
    return ENTRY_OVERHEAD + int(chunk.steps.nbytes + chunk.values.nbytes + chunk.timestamps_ms.nbytes)
