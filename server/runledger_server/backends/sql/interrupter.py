"""Stopping SQLite statements that run past a deadline, at no cost to statements that do not.

One thread keeps the deadlines of the bounded reads in progress and interrupts a connection whose deadline
passes (`sqlite3.Connection.interrupt`, safe from another thread): SQLite then ends the running statement
at its next step with "interrupted". A progress handler would do the same from inside the statement, but it
calls back into Python (taking the GIL) every few steps of every bounded statement, and steps that are each a
costly LIKE on a long value come too rarely for any fixed interval.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import threading
import time
from dataclasses import dataclass, field


@dataclass(order=True)
class Deadline:
    at: float
    order: int
    conn: sqlite3.Connection = field(compare=False)
    fired: bool = field(default=False, compare=False)
    done: bool = field(default=False, compare=False)


class _Worker:
    """One run of the deadline thread; `close` stops it for good, and a later `arm` starts another."""

    def __init__(self) -> None:
        self.stopped = False
        self.thread: threading.Thread | None = None


class Interrupter:
    def __init__(self) -> None:
        self._pending: list[Deadline] = []
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._worker: _Worker | None = None

    def arm(self, conn: sqlite3.Connection, seconds: float) -> Deadline:
        """Interrupt `conn` `seconds` from now, unless `disarm` comes first."""
        deadline = Deadline(time.monotonic() + seconds, next(self._order), conn)
        with self._cond:
            if self._worker is None:  # first use, or used again after close()
                worker = self._worker = _Worker()
                worker.thread = threading.Thread(
                    target=self._run, args=(worker,), name="runledger-sqlite-deadlines", daemon=True
                )
                worker.thread.start()
            heapq.heappush(self._pending, deadline)
            self._cond.notify_all()
        return deadline

    def disarm(self, deadline: Deadline) -> bool:
        """Whether the deadline had fired. After this returns, it never fires."""
        with self._cond:
            deadline.done = True
            return deadline.fired

    def close(self) -> None:
        with self._cond:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.stopped = True
            self._cond.notify_all()
        if worker is not None and worker.thread is not None:
            worker.thread.join()

    def _run(self, worker: _Worker) -> None:
        with self._cond:
            while not worker.stopped:
                while self._pending and self._pending[0].done:
                    heapq.heappop(self._pending)
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                wait = first.at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._pending)
                first.fired = True
                # Under the lock, which disarm takes too: a connection whose read has ended (back in the pool,
                # perhaps serving another call) is never interrupted. Between statements, an interrupt is a no-op.
                first.conn.interrupt()
