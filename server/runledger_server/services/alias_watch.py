"""Wakes WatchAlias streams when an alias may have changed, here or on another replica, without a thread each.

Changes made through this process wake the streams at once (`notify`, callable from any thread). Changes made
by other replicas sharing the database are found by one background poll of the watched aliases' revisions
(a single cheap query for all of them, every `poll_interval` seconds, only while someone watches).
A woken stream re-reads the alias and sends each change since the revision it last sent (those it missed from
the alias history), so spurious wake-ups are harmless.
When the server stops, `shut_down` ends every stream (UNAVAILABLE), so its clients move to another replica
at once instead of holding the graceful stop for its whole grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor

from runledger_server.domain.errors import Unavailable

_LOGGER = logging.getLogger(__name__)

Key = tuple[str, str]  # (model_id, alias)
RevisionReader = Callable[[Sequence[Key]], dict[Key, int]]

DEFAULT_POLL_INTERVAL = 0.5


class Subscription:
    """One stream's interest in one alias. Clear `dirty` before reading the alias, then wait on it."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.seen = -1  # the revision the stream last sent; -1 before the first read
        self.dirty = asyncio.Event()


class AliasWatchHub:
    def __init__(
        self, read_revisions: RevisionReader, executor: Executor, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> None:
        self._read_revisions = read_revisions
        self._executor = executor
        self._poll_interval = poll_interval
        self._subs: dict[Key, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._shutting_down = False

    @contextlib.asynccontextmanager
    async def subscribe(self, model_id: str, alias: str) -> AsyncIterator[Subscription]:
        """Register a stream for the alias; the first read happens after registration, so no change is lost."""
        self.check_serving()
        self._loop = asyncio.get_running_loop()
        sub = Subscription((model_id, alias))
        self._subs.setdefault(sub.key, set()).add(sub)
        if self._poller is None or self._poller.done():
            self._poller = self._loop.create_task(self._poll(), name="runledger-alias-poll")
        try:
            yield sub
        finally:
            subs = self._subs.get(sub.key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.key]
            if not self._subs and self._poller is not None:
                self._poller.cancel()
                self._poller = None

    @property
    def watching(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def notify(self, model_id: str, alias: str) -> None:
        """The alias changed through this process (thread-safe; cheap when nobody watches it)."""
        loop = self._loop
        if loop is None or (model_id, alias) not in self._subs or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(self._wake, (model_id, alias))

    def check_serving(self) -> None:
        """Raise UNAVAILABLE once the server is stopping: a watching client reconnects (to another replica)."""
        if self._shutting_down:
            raise Unavailable(
                "the server is shutting down; watch the alias again (on another replica, or this one restarted)",
                reason="SHUTTING_DOWN",
            )

    def shut_down(self) -> None:
        """End every stream (each raises UNAVAILABLE when woken) and refuse new ones; call on the loop."""
        self._shutting_down = True
        for subs in self._subs.values():
            for sub in subs:
                sub.dirty.set()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    def _wake(self, key: Key) -> None:
        for sub in self._subs.get(key, ()):
            sub.dirty.set()

    async def _poll(self) -> None:
        """While anyone watches: read every watched alias's revision, wake the streams that are behind."""
        loop = asyncio.get_running_loop()
        while self._subs:
            await asyncio.sleep(self._poll_interval)
            keys = list(self._subs)
            if not keys:
                break
            try:
                revisions = await loop.run_in_executor(self._executor, self._read_revisions, keys)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database hiccup must not end the streams; the next poll retries
                _LOGGER.warning("alias revision poll failed: %s", exc)
                continue
            for key in keys:
                revision = revisions.get(key, 0)
                for sub in self._subs.get(key, ()):
                    if sub.seen >= 0 and revision != sub.seen:
                        sub.dirty.set()
