"""How long to wait before retrying after a transient failure: capped exponential backoff with jitter."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from runledger import errors

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
# What "no limit" becomes for a gRPC deadline: infinity overflows it (the call fails at once), ~3 years does not.
NO_LIMIT = 1e8


@dataclass(frozen=True)
class RetryPolicy:
    """Delay after the n-th consecutive failure: min(max_backoff, initial_backoff * multiplier**(n-1)),
    shortened by up to `jitter` of itself at random so that many clients do not reconnect in lockstep."""

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("RetryPolicy needs 0 < initial_backoff <= max_backoff and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be within [0, 1]")

    def delay(self, failures: int, u: float) -> float:
        """`failures` >= 1 consecutive failures so far; `u` uniform in [0, 1)."""
        exponent = max(0, failures - 1)
        # Cap the exponent before computing: multiplier**exponent overflows a float long before it matters.
        base = self.initial_backoff
        for _ in range(exponent):
            base *= self.multiplier
            if base >= self.max_backoff:
                base = self.max_backoff
                break
        return base * (1.0 - self.jitter * u)


def call_with_retry(
    attempt: Callable[[float], T],
    policy: RetryPolicy,
    *,
    idempotent: bool,
    budget: float | None,
    target: str,
    typed: Callable[[grpc.RpcError], errors.RunledgerError] = errors.from_rpc_error,
    channel: grpc.Channel | None = None,
) -> T:
    """`attempt(remaining seconds)` until it succeeds; UNAVAILABLE is retried with backoff, for idempotent
    calls only, until `budget` seconds have passed. Failures are raised as `typed` makes them.

    Attempts wait for the server (gRPC's wait_for_ready): one that runs out of time on a `channel` that is
    still not connected never reached the server, and is raised as Unavailable rather than DeadlineExceeded.
    """
    budget = NO_LIMIT if budget is None or budget > NO_LIMIT else budget  # None or inf: as long as it takes
    deadline = time.monotonic() + budget
    failures = 0
    while True:
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            return attempt(remaining)
        except grpc.RpcError as exc:
            err = typed(exc)
            if err.code is grpc.StatusCode.DEADLINE_EXCEEDED and channel is not None and not _connected(channel):
                raise errors.Unavailable(
                    f"{target}: the server could not be reached within {budget:g} s ({err.message})",
                    reason="SERVER_UNREACHABLE",
                ) from None
        except ValueError as exc:  # grpc's word for a closed channel
            if "closed" not in str(exc).lower():
                raise
            raise client_closed(exc) from None
        failures += 1
        delay = policy.delay(failures, random.random())
        if not (idempotent and err.code is grpc.StatusCode.UNAVAILABLE) or time.monotonic() + delay >= deadline:
            raise err from None
        _LOGGER.info("%s: %s; retrying in %.2f s", target, err, delay)
        time.sleep(delay)


def client_closed(cause: BaseException) -> errors.FailedPrecondition:
    """A call on a channel that was closed (the Client's close(), with a Registry or watch still held)."""
    return errors.FailedPrecondition(f"the client is closed ({cause})", reason="CLIENT_CLOSED")


def _connected(channel: grpc.Channel) -> bool:
    """Whether the channel is connected now (asked without waiting)."""
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=0.05)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        ready.cancel()
