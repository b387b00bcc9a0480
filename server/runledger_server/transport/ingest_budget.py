"""How many metric points a server holds between receiving them and committing them, across all streams.

A batch is charged for its points (24 bytes each), or for its whole message when that is larger: its arrays
are views that keep the message alive until the commit.

Each stream already limits its batches in flight, but not their size, and the number of streams is open:
without a server-wide bound, many trainers (or one sending huge batches) could fill memory while a slow
commit is under way. A reader that would go beyond the budget waits before taking its batch, so it stops
reading its stream and gRPC flow control slows that sender; everyone else's batches keep flowing in the
order they asked. A batch larger than the whole budget is let through alone rather than refused.
"""

from __future__ import annotations

import asyncio
from collections import deque

POINT_BYTES = 24  # step, value and timestamp: 8 bytes each


class PointBudget:
    """A first-come, first-served counting budget for the event loop (not thread-safe: release on the loop)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the ingest budget needs at least one point")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waiting = 0  # points asked for by callers still waiting (each holds its batch meanwhile)
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    async def acquire(self, points: int) -> int:
        """Wait until `points` fit (at most the whole budget); return what was taken, for `release`."""
        need = min(max(points, 0), self.limit)
        if not self._waiters and self.used + need <= self.limit:
            self._take(need)
            return need
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, need))
        self.waiting += need
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as we were cancelled: hand it on
                self.release(need)
            else:
                self.waiting -= need  # its entry stays queued, done, until _grant drops it
                self._grant()  # our place in the queue may have held back smaller requests behind us
            raise
        return need

    def release(self, points: int) -> None:
        self.used -= points
        self._grant()

    def _take(self, points: int) -> None:
        self.used += points
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters:
            fut, need = self._waiters[0]
            if fut.done():  # its caller was cancelled while waiting
                self._waiters.popleft()
                continue
            if self.used + need > self.limit:
                return
            self._waiters.popleft()
            self.waiting -= need
            self._take(need)
            fut.set_result(None)
