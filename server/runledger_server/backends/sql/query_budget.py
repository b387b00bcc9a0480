"""A budget of database work for one read transaction (a search): past it the read is stopped and refused as
RESOURCE_EXHAUSTED `QUERY_TOO_EXPENSIVE` naming the field that asked for the work.

The budget is for the whole transaction, not each statement: before each statement the time left is checked
(and on PostgreSQL it becomes that statement's `statement_timeout`); a statement running when the time is up is
stopped by the database (PostgreSQL's timeout, or SQLite's interrupt from interrupter.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from runledger_server.domain.errors import ResourceExhausted

PG_QUERY_CANCELED = "57014"  # statement_timeout ran out (or a cancel request)
TIMER_SLACK_S = 0.1  # a cancel this close to the deadline is the timeout's
_KEY = "runledger_query_budget"  # in the pooled connection's info while a bounded read holds it


@dataclass(frozen=True)
class Budget:
    deadline: float  # time.monotonic()
    seconds: float
    field: str

    @classmethod
    def starting_now(cls, seconds: float, field: str, until: float | None = None) -> Budget:
        """`seconds` from now, or less when the work belongs to a larger one that must end by `until` (the
        pages of one SelectWinner share one budget)."""
        deadline = time.monotonic() + seconds
        return cls(deadline if until is None else min(deadline, until), seconds, field)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def exceeded(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"the query took more than {self.seconds:g} s of database work and was stopped; narrow the "
            f"{self.field} (fewer runs, or shorter LIKE patterns without a leading %)",
            reason="QUERY_TOO_EXPENSIVE",
            field=self.field,
        )


def hold(info: dict[Any, Any], budget: Budget) -> None:
    info[_KEY] = budget


def release(info: dict[Any, Any]) -> None:
    info.pop(_KEY, None)


def before_statement(info: dict[Any, Any], cursor: Any, postgres: bool) -> None:
    """Called before every statement on a connection: under a budget, refuse once it is spent, and on
    PostgreSQL give the statement what is left of it."""
    budget: Budget | None = info.get(_KEY)
    if budget is None:
        return
    left = budget.left()
    if left <= 0:
        raise budget.exceeded()
    if postgres:
        cursor.execute(f"SET LOCAL statement_timeout = {max(1, math.ceil(left * 1000))}")


def canceled_by_timeout(exc: BaseException) -> bool:
    """Whether PostgreSQL stopped a statement for its timeout, anywhere in the chain of causes (translated
    errors keep the driver's as their cause)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if getattr(seen, "sqlstate", None) == PG_QUERY_CANCELED:
            return True
        orig = getattr(seen, "orig", None)
        if getattr(orig, "sqlstate", None) == PG_QUERY_CANCELED:
            return True
        seen = seen.__cause__
    return False
