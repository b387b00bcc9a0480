"""Process lifecycle: a forked child (e.g. a DataLoader worker) gets fresh channels and senders; exit flushes."""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from typing import Any, Protocol

_LOGGER = logging.getLogger(__name__)

EXIT_FLUSH_TIMEOUT = 30.0


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


class _Flushable(Protocol):
    def _flush_at_exit(self, timeout: float) -> None: ...


_fork_aware: weakref.WeakSet[Any] = weakref.WeakSet()
_flush_at_exit: weakref.WeakSet[Any] = weakref.WeakSet()
# Objects a forked child inherited (channels, calls, sender threads' state). The child never uses them, and
# never lets them be garbage-collected either: tearing down the parent's gRPC objects in the child can hang.
_inherited: list[Any] = []
_lock = threading.Lock()


def track(obj: _ForkAware) -> None:
    """Reset `obj` in a forked child before anything in the child can use it."""
    with _lock:
        _fork_aware.add(obj)


def flush_at_exit(obj: _Flushable) -> None:
    """Flush `obj` when the interpreter exits, unless untracked first (a finished run)."""
    with _lock:
        _flush_at_exit.add(obj)


def untrack_exit(obj: _Flushable) -> None:
    with _lock:
        _flush_at_exit.discard(obj)


def keep_inherited(obj: Any) -> None:
    if obj is not None:
        _inherited.append(obj)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _flush_at_exit.clear()  # the parent flushes its own points; the child starts with none
    for obj in list(_fork_aware):
        obj._after_fork_in_child()


def _at_exit() -> None:
    with _lock:
        pending = list(_flush_at_exit)
    # One deadline for all: with the server gone, each unfinished run would otherwise wait its own timeout in turn.
    deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
    for obj in pending:
        try:
            obj._flush_at_exit(max(deadline - time.monotonic(), 0.0))
        except Exception as exc:
            _LOGGER.warning("metrics not flushed at exit: %s", exc)


def _in_multiprocessing_child(_: object) -> None:
    # A multiprocessing worker (a DataLoader worker, say) ends with os._exit(): atexit never runs there, only
    # multiprocessing's finalizers, which it clears when the worker starts; so the exit flush is registered
    # again as one of them, after that clearing.
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=100)


class _Registration:
    """The object multiprocessing keeps (weakly) for the after-fork hook: alive as long as this module."""


_registration = _Registration()
os.register_at_fork(after_in_child=_after_fork_in_child)
multiprocessing.util.register_after_fork(_registration, _in_multiprocessing_child)
atexit.register(_at_exit)
