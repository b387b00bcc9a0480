"""Champion/challenger promotion behind a frozen eval gate: the pure decision SetAlias applies, and rollback."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.sweeps import Direction

PROMOTED = "PROMOTED"
GATE_NOT_RECORDED = "GATE_NOT_RECORDED"
GATE_FAILED = "GATE_FAILED"
NOT_BETTER_THAN_INCUMBENT = "NOT_BETTER_THAN_INCUMBENT"
INCUMBENT_NOT_SCORED = "INCUMBENT_NOT_SCORED"
STALE_REVISION = "STALE_REVISION"
NO_PREVIOUS_VERSION = "NO_PREVIOUS_VERSION"
ROLLED_BACK = "ROLLED_BACK"
DELETED = "DELETED"

# The refusals that are FAILED_PRECONDITION; STALE_REVISION alone is ABORTED.
PRECONDITION_REASONS = frozenset({GATE_NOT_RECORDED, GATE_FAILED, NOT_BETTER_THAN_INCUMBENT, INCUMBENT_NOT_SCORED})


class Action:
    """What one entry of an alias's history did."""

    PROMOTED = "PROMOTED"
    REFUSED = "REFUSED"
    ROLLED_BACK = "ROLLED_BACK"
    DELETED = "DELETED"

    CHANGES = frozenset({PROMOTED, ROLLED_BACK, DELETED})


@dataclass(frozen=True)
class GateSpec:
    """A frozen gate: which suite and metric it scores, which way is better, the pass mark."""

    gate_id: str
    suite_fingerprint: str
    metric: str
    direction: Direction
    threshold: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise InvalidArgument(f"threshold must be a finite number, got {self.threshold}", field="threshold")


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_version: int
    candidate_score: float | None
    incumbent_version: int | None
    incumbent_score: float | None
    threshold: float
    direction: Direction
    message: str


def revision_matches(expected_revision: int | None, current_revision: int, alias_is_set: bool) -> bool:
    """Compare-and-swap on the alias revision. `0` means "the alias must not point anywhere": it matches an
    alias never set (revision 0) and a deleted one (which keeps its revision so revisions never go back)."""
    if expected_revision is None or expected_revision == current_revision:
        return True
    return expected_revision == 0 and not alias_is_set


def decide(
    gate: GateSpec,
    *,
    candidate_version: int,
    candidate_score: float | None,
    incumbent_version: int | None,
    incumbent_score: float | None,
    current_revision: int,
    expected_revision: int | None = None,
) -> Decision:
    """Promote only if the gate recorded the candidate, it passes, and it strictly beats the incumbent.

    Scores are the gate's own recorded results; a score a run reports about itself never reaches here.
    `incumbent_version` is None when the alias points at nothing; `current_revision` is 0 when it never
    existed. The checks run in the order SetAliasRequest documents (registry_service.proto): the gate result,
    the threshold, the incumbent, and last a stale `expected_revision` (so a candidate that could never be
    promoted is told why, whatever it expected).
    """

    def out(promoted: bool, reason: str, message: str) -> Decision:
        return Decision(
            promoted,
            reason,
            candidate_version,
            candidate_score,
            incumbent_version,
            incumbent_score,
            gate.threshold,
            gate.direction,
            message,
        )

    if candidate_score is None:
        return out(
            False, GATE_NOT_RECORDED, f"gate {gate.gate_id!r} has no recorded result for version {candidate_version}"
        )
    op = ">=" if gate.direction is Direction.MAXIMIZE else "<="
    if not gate.direction.passes(candidate_score, gate.threshold):
        return out(
            False,
            GATE_FAILED,
            f"version {candidate_version} scored {candidate_score} on gate {gate.gate_id!r}, "
            f"which does not meet {op} {gate.threshold}",
        )
    if incumbent_version is not None:
        if incumbent_score is None:
            return out(
                False,
                INCUMBENT_NOT_SCORED,
                f"incumbent version {incumbent_version} has no result on gate {gate.gate_id!r}; it cannot be compared",
            )
        if not gate.direction.better(candidate_score, incumbent_score):
            return out(
                False,
                NOT_BETTER_THAN_INCUMBENT,
                f"version {candidate_version} scored {candidate_score}, not strictly better than "
                f"incumbent version {incumbent_version} at {incumbent_score}; the incumbent holds",
            )
    if not revision_matches(expected_revision, current_revision, incumbent_version is not None):
        return out(
            False,
            STALE_REVISION,
            f"expected_revision {expected_revision} is stale: the alias is at revision {current_revision}",
        )
    return out(True, PROMOTED, f"version {candidate_version} promoted with score {candidate_score}")


@dataclass(frozen=True)
class AliasChange:
    """One entry of an alias's history, as rollback sees it: `gate_id` is the alias's gate after the entry."""

    action: str
    from_version: int
    to_version: int
    gate_id: str


@dataclass(frozen=True)
class AliasState:
    version: int  # 0: the alias points at nothing
    gate_id: str


def rollback_target(history: Iterable[AliasChange]) -> AliasState | None:
    """The state a rollback restores, or None when there is nothing to go back to.

    Rollback is an undo stack over the alias's changes: each promotion or deletion pushes the state it
    replaced, each rollback pops one. So v1 -> v2 -> v3, rollback gives v2, a second rollback gives v1
    (it never returns to the v3 just rolled back from), and promoting again starts from the new state.
    Refused entries changed nothing and are skipped. Going back to "no version" is not a rollback
    (that is DeleteAlias), so a first promotion has no previous version.
    """
    state = AliasState(0, "")
    undo: list[AliasState] = []
    for entry in history:
        if entry.action == Action.PROMOTED:
            undo.append(state)
            state = AliasState(entry.to_version, entry.gate_id)
        elif entry.action == Action.DELETED:
            undo.append(state)
            state = AliasState(0, "")
        elif entry.action == Action.ROLLED_BACK:
            state = undo.pop() if undo else AliasState(entry.to_version, entry.gate_id)
    if not undo or undo[-1].version == 0:
        return None
    return undo[-1]
