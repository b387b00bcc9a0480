"""A cache of last answers bounded by entries and by their size, for answers that are cheap to rebuild."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """The last value per key. Past `max_entries` entries or `max_size` in all (sizes as the caller measures
    them, e.g. bytes of a message), it starts over: simpler than LRU and just as bounded, which is what a cache
    of answers that may each hold megabytes (a version's lineage config) needs. A value larger than an eighth
    of the budget is not kept at all: it would push out everything else for one key.

    Thread-safe: the serving path reads on worker threads when the database is not local.
    """

    def __init__(self, max_entries: int, max_size: int) -> None:
        self.max_entries = max_entries
        self.max_size = max_size
        self._items: dict[K, tuple[V, int]] = {}
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            if size > self.max_size // 8:
                return
            if len(self._items) >= self.max_entries or self._size + size > self.max_size:
                self._items.clear()
                self._size = 0
            self._items[key] = (value, size)
            self._size += size

    @property
    def size(self) -> int:
        """The sum of the sizes of the values held."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)
