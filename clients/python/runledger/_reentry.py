"""Refusing a call made from a signal handler while its thread holds a lock the call needs.

A signal handler (SIGTERM on a preempted job, Ctrl-C) runs on the thread it interrupts. Interrupted inside a
section holding one of the client's locks, a handler that calls the client would wait for that lock for ever:
each such section records its thread, and a call that finds its own thread recorded is refused instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from runledger import errors


def refused(what: str, inside: str, metadata: Mapping[str, str] | None = None) -> errors.FailedPrecondition:
    """FailedPrecondition REENTRANT_CALL for `what`, called while this thread is inside `inside`."""
    return errors.FailedPrecondition(
        f"{what} was called while this thread is inside {inside} (from a signal handler?): raise an exception in "
        "the handler instead (e.g. sys.exit()), and let the run's with-block or a finally clause finish the run "
        "once the interrupted call has returned",
        reason="REENTRANT_CALL",
        metadata=dict(metadata or {}),
    )
