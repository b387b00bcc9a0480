"""Champion/challenger promotion behind a frozen eval gate: the pure decision SetAlias applies."""

from __future__ import annotations

from dataclasses import dataclass

from runledger_server.domain.sweeps import Direction

PROMOTED = "PROMOTED"
GATE_NOT_RECORDED = "GATE_NOT_RECORDED"
GATE_FAILED = "GATE_FAILED"
NOT_BETTER_THAN_INCUMBENT = "NOT_BETTER_THAN_INCUMBENT"
INCUMBENT_NOT_SCORED = "INCUMBENT_NOT_SCORED"
STALE_REVISION = "STALE_REVISION"


@dataclass(frozen=True)
class GateSpec:
    """A frozen gate: which suite and metric it scores, which way is better, the pass mark."""

    gate_id: str
    suite_fingerprint: str
    metric: str
    direction: Direction
    threshold: float


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
    `current_revision` is 0 when the alias does not exist.
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

    if expected_revision is not None and expected_revision != current_revision:
        return out(
            False,
            STALE_REVISION,
            f"expected_revision {expected_revision} is stale: the alias is at revision {current_revision}",
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
    return out(True, PROMOTED, f"version {candidate_version} promoted with score {candidate_score}")
