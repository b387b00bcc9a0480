"""The end time an UpdateRun leaves: set by a final status, kept on a retry, cleared by RUNNING, never before
the start, never on a running run."""

from __future__ import annotations

import pytest

from runledger_server.domain.errors import FailedPrecondition, InvalidArgument
from runledger_server.domain.run_status import end_time_after_update

START, NOW = 1_000, 5_000


def end(status: str, end_us: int | None, new_status: str | None, requested: int | None) -> int | None:
    return end_time_after_update(
        status=status,
        end_time_us=end_us,
        start_time_us=START,
        new_status=new_status,
        requested_end_us=requested,
        now_us=NOW,
    )


@pytest.mark.parametrize("final", ["FINISHED", "FAILED", "KILLED"])
def test_a_final_status_ends_the_run_now_or_when_asked(final: str) -> None:
    assert end("RUNNING", None, final, None) == NOW
    assert end("RUNNING", None, final, 2_000) == 2_000
    assert end("RUNNING", None, final, START) == START  # ending at the start itself is allowed


def test_a_final_status_on_an_ended_run_keeps_the_recorded_end() -> None:
    assert end("FINISHED", 3_000, "FINISHED", None) == 3_000  # a retried call does not move it
    assert end("FINISHED", 3_000, "FINISHED", 4_000) == 4_000  # an explicit end time is a correction
    assert end("FINISHED", 3_000, "FAILED", None) == 3_000  # relabelled later: it still stopped at 3,000
    assert end("FAILED", 3_000, "KILLED", 4_500) == 4_500


def test_running_clears_the_end_and_refuses_one() -> None:
    assert end("FINISHED", 3_000, "RUNNING", None) is None  # a resumed run
    with pytest.raises(InvalidArgument) as info:
        end("FINISHED", 3_000, "RUNNING", 4_000)
    assert info.value.field == "end_time"


def test_an_end_time_alone_corrects_an_ended_run_only() -> None:
    assert end("KILLED", 3_000, None, 4_000) == 4_000
    assert end("RUNNING", None, None, None) is None and end("FINISHED", 3_000, None, None) == 3_000
    with pytest.raises(FailedPrecondition) as info:
        end("RUNNING", None, None, 4_000)
    assert (info.value.reason, info.value.field) == ("RUN_NOT_ENDED", "end_time")


def test_an_end_before_the_start_is_refused_and_now_never_precedes_it() -> None:
    for new_status in (None, "FINISHED"):
        with pytest.raises(InvalidArgument) as info:
            end("FINISHED", 3_000, new_status, START - 1)
        assert info.value.field == "end_time"
    assert (
        end_time_after_update(
            status="RUNNING",
            end_time_us=None,
            start_time_us=NOW + 7,
            new_status="FINISHED",
            requested_end_us=None,
            now_us=NOW,
        )
        == NOW + 7
    )  # a start time ahead of this server's clock (imported run): the end is not before it
    with pytest.raises(InvalidArgument):  # the epoch itself is a time like any other, not "unset"
        end("RUNNING", None, "FINISHED", 0)
