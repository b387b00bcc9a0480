"""Sweep winner selection with a comparability guard: only runs scored on one eval suite compete."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from runledger_server.domain.errors import FailedPrecondition


class Direction(enum.Enum):
    MAXIMIZE = "MAXIMIZE"
    MINIMIZE = "MINIMIZE"

    def better(self, a: float, b: float) -> bool:
        """True when score `a` strictly beats `b`."""
        return a > b if self is Direction.MAXIMIZE else a < b

    def passes(self, score: float, threshold: float) -> bool:
        """True when `score` meets the gate threshold (`>=` maximize, `<=` minimize)."""
        return score >= threshold if self is Direction.MAXIMIZE else score <= threshold


@dataclass(frozen=True)
class Candidate:
    """A run offered to a sweep, with its scores of `metric` per suite fingerprint, in creation order."""

    run_id: str
    scores: dict[str, float]  # suite_fingerprint -> score of the metric
    other_suites: frozenset[str] = frozenset()  # suites the run was scored on for other metrics only

    @property
    def suites(self) -> frozenset[str]:
        """Every suite the run was scored on, whatever the metric."""
        return self.other_suites | self.scores.keys()


@dataclass(frozen=True)
class Excluded:
    run_id: str
    reason: str  # NOT_SCORED | OTHER_EVAL_SUITE
    suites: tuple[str, ...]


@dataclass(frozen=True)
class SweepResult:
    winner_run_id: str
    score: float
    suite_fingerprint: str
    cohort: tuple[tuple[str, float], ...]  # best first
    excluded: tuple[Excluded, ...]


MAX_NAMED_SUITES = 10


def select_winner(
    candidates: Sequence[Candidate],
    metric: str,
    direction: Direction,
    *,
    suite_fingerprint: str | None = None,
) -> SweepResult:
    """Rank candidates (given in creation order) on one suite; ties go to the earliest-created run.

    Without a named suite, the candidates must all have been scored on a single suite (for any metric), else
    the ranking is refused with INCOMPARABLE_EVAL_SUITES: a winner across suites is meaningless, and a run
    scored on another suite must not win because the runs of the suite used another name for the metric.
    """
    excluded: list[Excluded] = []
    scored = [c for c in candidates if c.scores]
    excluded.extend(Excluded(c.run_id, "NOT_SCORED", tuple(sorted(c.suites))) for c in candidates if not c.scores)
    if suite_fingerprint is None:
        suites = sorted({s for c in candidates for s in c.suites})
        if len(suites) > 1:
            # The message names up to ten (the transport clips it to a few hundred bytes, after the names);
            # the metadata has them all, within what a status may carry.
            shown = suites[:MAX_NAMED_SUITES]
            more = f" and {len(suites) - len(shown)} more" if len(suites) > len(shown) else ""
            raise FailedPrecondition(
                f"incomparable runs: scored on {len(suites)} eval suites: {', '.join(shown)}{more}; "
                "name one with suite_fingerprint",
                reason="INCOMPARABLE_EVAL_SUITES",
                metadata={"suiteFingerprints": ",".join(suites), "suiteCount": str(len(suites)), "metric": metric},
                field="suite_fingerprint",
            )
        if not scored:
            raise _no_scored(metric, None)
        suite = suites[0]
    else:
        suite = suite_fingerprint
    cohort: list[tuple[int, str, float]] = []
    for order, c in enumerate(scored):
        if suite in c.scores:
            cohort.append((order, c.run_id, c.scores[suite]))
        else:
            excluded.append(Excluded(c.run_id, "OTHER_EVAL_SUITE", tuple(sorted(c.suites))))
    if not cohort:
        raise _no_scored(metric, suite)
    sign = -1.0 if direction is Direction.MAXIMIZE else 1.0
    ranked = sorted(cohort, key=lambda t: (sign * t[2], t[0]))
    _, winner, score = ranked[0]
    return SweepResult(
        winner_run_id=winner,
        score=score,
        suite_fingerprint=suite,
        cohort=tuple((run_id, s) for _, run_id, s in ranked),
        excluded=tuple(excluded),
    )


def _no_scored(metric: str, suite: str | None) -> FailedPrecondition:
    """Without a suite no run has the metric at all; with the caller's suite, none was scored on that suite."""
    where = f" on suite {suite}" if suite else ""
    return FailedPrecondition(
        f"no candidate run has an eval result for metric {metric!r}{where}",
        reason="NO_SCORED_RUNS",
        field="suite_fingerprint" if suite else "metric",
        metadata={"metric": metric, **({"suiteFingerprint": suite} if suite else {})},
    )


def require_finite(value: float, field: str) -> float:
    """Scores rank runs and gate versions; NaN or infinity cannot rank, so they are refused. Returned as stored:
    -0.0 becomes 0.0 (SQLite reads -0.0 back as 0.0, PostgreSQL keeps the sign, and every replica must answer
    alike; the two are equal as scores either way)."""
    from runledger_server.domain.errors import InvalidArgument

    if not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {value}", field=field)
    return value + 0.0
