"""A run's lifecycle: which status changes set, keep or clear its end time (pure rules, no storage)."""

from __future__ import annotations

from runledger_server.domain.errors import FailedPrecondition, InvalidArgument

STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
FINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})


def end_time_after_update(
    *,
    status: str,
    end_time_us: int | None,
    start_time_us: int,
    new_status: str | None,
    requested_end_us: int | None,
    now_us: int,
) -> int | None:
    """The run's end time once an update (`new_status`, `requested_end_us`, either may be absent) is applied.

    A final status ends the run at the requested time or now. An ended run keeps its recorded end when a final
    status is set again: the same one (a client retrying after a lost reply) or another (a finished run marked
    FAILED later, when its eval shows it diverged) relabels the outcome, not when the run stopped; an explicit
    end time corrects it. RUNNING (a resumed run) clears it.
    An end time alone corrects the end of an ended run; a running run has no end to correct, so that is
    refused rather than leaving a RUNNING run with an end time. An end before the start is refused.
    """
    if requested_end_us is not None and requested_end_us < start_time_us:
        raise InvalidArgument(
            f"end_time ({requested_end_us} µs since the epoch) is before the run's start ({start_time_us})",
            field="end_time",
        )
    if new_status is None:
        if requested_end_us is None:
            return end_time_us
        if status not in FINAL_STATUSES:
            raise FailedPrecondition(
                f"end_time can be set only with a final status, or on a run that has ended; the run is {status}",
                reason="RUN_NOT_ENDED",
                field="end_time",
            )
        return requested_end_us
    if new_status not in FINAL_STATUSES:
        if requested_end_us is not None:
            raise InvalidArgument(
                f"end_time cannot go with status {new_status}: the run has not ended", field="end_time"
            )
        return None
    if requested_end_us is not None:
        return requested_end_us
    if status in FINAL_STATUSES and end_time_us is not None:
        return end_time_us
    return max(now_us, start_time_us)
