"""Group commit of metric batches: every stream's batches share few transactions; acks wait for commit.

One committer thread per server process drains a queue of pending batches, stores them in one
transaction, then resolves each batch's future. Under load many batches ride one commit (one
fsync), which is what lets one SQLite file take millions of points per second.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from runledger_server.domain.errors import ResourceExhausted, Unavailable
from runledger_server.domain.metrics import Batch
from runledger_server.store.tracking import TrackingStore

_LOGGER = logging.getLogger(__name__)

_STOP = object()
_Pending = tuple[Batch, "Future[bool]", "Callable[[], object] | None"]  # a batch, its result, its settle callback


class _Barrier:
    """A mark in the queue: its future resolves once every batch queued before it has been committed (or has
    failed), so that a reader of the ledger sees them."""

    def __init__(self) -> None:
        self.future: Future[None] = Future()

    def resolve(self) -> None:
        if self.future.set_running_or_notify_cancel():  # a waiter may have cancelled it
            self.future.set_result(None)


class MetricIngest:
    def __init__(
        self,
        store: TrackingStore,
        *,
        max_group_points: int = 2_000_000,
    ) -> None:
        self._store = store
        self._queue: queue.Queue[object] = queue.Queue()
        self._max_group_points = max_group_points
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued after the stop mark
        self._thread = threading.Thread(target=self._run, name="metric-group-commit", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch, settled: Callable[[], object] | None = None) -> Future[bool]:
        """Queue a batch; the future resolves to True for a duplicate, False when newly stored.

        `settled` is called once the batch has left the server's hands (its commit succeeded or failed, or it
        was refused at once), even when its future was cancelled meanwhile: a caller that goes away does not
        take its batch out of the queue, so whoever accounts for queued points must wait for this call.
        """
        fut: Future[bool] = Future()
        with self._closing:
            if not self._closed:
                self._queue.put((batch, fut, settled))
                return fut
        fut.set_exception(Unavailable("the server is shutting down", reason="SHUTTING_DOWN"))
        if settled is not None:
            settled()
        return fut

    def barrier(self) -> Future[None]:
        """Resolves once every batch submitted before this call has left the queue (committed or failed)."""
        mark = _Barrier()
        with self._closing:
            if not self._closed:
                self._queue.put(mark)
                return mark.future

        def after_the_last_commit() -> None:  # close() commits everything queued before it stops
            self._thread.join()
            mark.resolve()

        threading.Thread(target=after_the_last_commit, name="metric-barrier", daemon=True).start()
        return mark.future

    def close(self) -> None:
        """Commit everything queued, then stop (graceful shutdown finishes acknowledged writes)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        # No waiting for company: whatever queued up during the previous commit forms the next
        # group, so a lone writer pays no added latency and many writers share each commit.
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, _Barrier):  # everything before it is committed already
                item.resolve()
                continue
            group, barrier, stopping = self._group_from(item)  # type: ignore[arg-type]
            # Nothing of a committed group stays referenced while the next batch is awaited: its requests
            # (points, padding) were given back to the ingest budget at its commit.
            del item
            self._commit(group)
            del group
            if barrier is not None:
                barrier.resolve()

    def _group_from(self, first: _Pending) -> tuple[list[_Pending], _Barrier | None, bool]:
        """The group `first` starts: whatever else is queued, up to the group's points; and the barrier that
        ended it, and whether the stop mark did."""
        group = [first]
        points = first[0].points
        while points < self._max_group_points:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return group, None, True
            if isinstance(nxt, _Barrier):  # the group ends at the mark: batches after it are not awaited
                return group, nxt, False
            group.append(nxt)  # type: ignore[arg-type]
            points += nxt[0].points  # type: ignore[index]
        return group, None, False

    def _commit(self, group: list[_Pending]) -> None:
        # A caller that went away (its stream ended, its deadline passed) cancels its future while it waits
        # here; its batch is stored all the same (the client re-sends it with the same seq and learns it is a
        # duplicate), but only the futures still wanted get a result: resolving a cancelled one raises.
        wanted = [fut.set_running_or_notify_cancel() for _, fut, _ in group]
        try:
            results: list[bool | Exception] = self._store.commit_metric_batches([b for b, _, _ in group])
        except Exception as exc:  # the whole transaction failed: every batch learns why
            if not isinstance(exc, Unavailable | ResourceExhausted):  # logged where they are raised
                _LOGGER.exception("metric group commit failed")
            results = [exc] * len(group)
        finally:
            # Before any ack can go out: whoever accounts for held points sees them gone first.
            for _, _, settled in group:
                if settled is not None:
                    try:
                        settled()
                    except Exception:
                        _LOGGER.exception("metric batch settle callback failed")
        for (_, fut, _), want, result in zip(group, wanted, results, strict=True):
            if not want:
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)
