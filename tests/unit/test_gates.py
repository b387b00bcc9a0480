"""The promotion decision agrees with the reference rule on every seed case, its boundaries and random cases."""

from __future__ import annotations

import random

import pytest

from runledger_server.domain import gates
from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.gates import Action, AliasChange, AliasState, GateSpec, decide, rollback_target
from runledger_server.domain.sweeps import Direction


def reference_promote(champion_score: float, challenger_score: float, threshold: float, *, maximize: bool) -> str:
    """The reference rule, copied: 'challenger' only if it passes the gate AND strictly beats the champion."""
    passed = challenger_score >= threshold if maximize else challenger_score <= threshold
    better = challenger_score > champion_score if maximize else challenger_score < champion_score
    return "challenger" if (passed and better) else "champion"


def gate(threshold: float, direction: Direction = Direction.MAXIMIZE) -> GateSpec:
    return GateSpec("frozen", "mmlu@abcd", "mmlu", direction, threshold)


def against_champion(
    champion: float, challenger: float | None, threshold: float, direction: Direction = Direction.MAXIMIZE
) -> gates.Decision:
    return decide(
        gate(threshold, direction),
        candidate_version=2,
        candidate_score=challenger,
        incumbent_version=1,
        incumbent_score=champion,
        current_revision=1,
    )


GATE_SCORES = {"a": 0.58, "b": 0.66, "flat": 0.61}  # the gate's own scores on the frozen suite


@pytest.mark.parametrize(
    ("champion", "challenger", "threshold", "direction", "promoted", "reason"),
    [
        # The seed document's cases.
        (0.61, GATE_SCORES["b"], 0.60, Direction.MAXIMIZE, True, gates.PROMOTED),  # real winner promoted
        (0.61, GATE_SCORES["a"], 0.60, Direction.MAXIMIZE, False, gates.GATE_FAILED),  # self-reported 0.99 unused
        (0.61, GATE_SCORES["flat"], 0.60, Direction.MAXIMIZE, False, gates.NOT_BETTER_THAN_INCUMBENT),  # tie holds
        (0.50, GATE_SCORES["a"], 0.60, Direction.MAXIMIZE, False, gates.GATE_FAILED),  # beats champion, fails gate
        (0.6, 0.4, 0.5, Direction.MINIMIZE, True, gates.PROMOTED),  # loss-style gate
        (0.6, 0.9, 0.5, Direction.MINIMIZE, False, gates.GATE_FAILED),
        # Boundaries.
        (0.50, 0.60, 0.60, Direction.MAXIMIZE, True, gates.PROMOTED),  # score == threshold passes (>=)
        (0.60, 0.50, 0.50, Direction.MINIMIZE, True, gates.PROMOTED),  # score == threshold passes (<=)
        (0.70, 0.70, 0.60, Direction.MAXIMIZE, False, gates.NOT_BETTER_THAN_INCUMBENT),  # tie, maximize
        (0.40, 0.40, 0.50, Direction.MINIMIZE, False, gates.NOT_BETTER_THAN_INCUMBENT),  # tie, minimize
        (0.70, 0.65, 0.60, Direction.MAXIMIZE, False, gates.NOT_BETTER_THAN_INCUMBENT),  # worse, maximize
        (0.30, 0.40, 0.50, Direction.MINIMIZE, False, gates.NOT_BETTER_THAN_INCUMBENT),  # worse (higher), minimize
        (0.30, 0.20, 0.50, Direction.MINIMIZE, True, gates.PROMOTED),  # better (lower), minimize
        (0.60, 0.5000001, 0.5, Direction.MINIMIZE, False, gates.GATE_FAILED),  # just above a loss threshold
        (0.10, 0.5999999, 0.6, Direction.MAXIMIZE, False, gates.GATE_FAILED),  # just below a threshold
        (-1.0, -0.5, -0.75, Direction.MAXIMIZE, True, gates.PROMOTED),  # negative scores (reward)
    ],
)
def test_decision_table(
    champion: float, challenger: float, threshold: float, direction: Direction, promoted: bool, reason: str
) -> None:
    d = against_champion(champion, challenger, threshold, direction)
    assert (d.promoted, d.reason) == (promoted, reason)
    expected = reference_promote(champion, challenger, threshold, maximize=direction is Direction.MAXIMIZE)
    assert (expected == "challenger") == d.promoted
    assert d.candidate_score == challenger and d.incumbent_score == champion and d.threshold == threshold


def test_first_promotion_needs_only_the_gate() -> None:
    ok = decide(
        gate(0.6),
        candidate_version=1,
        candidate_score=0.6,
        incumbent_version=None,
        incumbent_score=None,
        current_revision=0,
    )
    assert ok.promoted and ok.reason == gates.PROMOTED and ok.incumbent_version is None
    failed = decide(
        gate(0.6),
        candidate_version=1,
        candidate_score=0.59,
        incumbent_version=None,
        incumbent_score=None,
        current_revision=0,
    )
    assert not failed.promoted and failed.reason == gates.GATE_FAILED and ">= 0.6" in failed.message


def test_gate_not_recorded_comes_before_any_comparison() -> None:
    d = against_champion(0.1, None, 0.0)
    assert not d.promoted and d.reason == gates.GATE_NOT_RECORDED and "'frozen'" in d.message


def test_incumbent_without_a_result_on_this_gate_blocks() -> None:
    d = decide(
        gate(0.6),
        candidate_version=3,
        candidate_score=0.99,
        incumbent_version=1,
        incumbent_score=None,
        current_revision=4,
    )
    assert not d.promoted and d.reason == gates.INCUMBENT_NOT_SCORED and "version 1" in d.message


def test_candidate_equal_to_incumbent_is_a_tie() -> None:
    d = decide(
        gate(0.5),
        candidate_version=1,
        candidate_score=0.7,
        incumbent_version=1,
        incumbent_score=0.7,
        current_revision=1,
    )
    assert d.reason == gates.NOT_BETTER_THAN_INCUMBENT


@pytest.mark.parametrize(
    ("expected", "current", "is_set", "stale"),
    [
        (None, 5, True, False),  # no CAS asked
        (5, 5, True, False),
        (4, 5, True, True),
        (6, 5, True, True),
        (0, 0, False, False),  # 0: must not exist, and it never did
        (0, 3, False, False),  # 0 also matches a deleted alias (it points nowhere)
        (3, 3, False, False),  # ... as does its own revision
        (0, 1, True, True),  # 0 against a set alias
        (1, 0, False, True),
    ],
)
def test_compare_and_swap(expected: int | None, current: int, is_set: bool, stale: bool) -> None:
    d = decide(
        gate(0.5),
        candidate_version=2,
        candidate_score=0.9,
        incumbent_version=1 if is_set else None,
        incumbent_score=0.6 if is_set else None,
        current_revision=current,
        expected_revision=expected,
    )
    assert (d.reason == gates.STALE_REVISION) == stale
    assert d.promoted == (not stale)


@pytest.mark.parametrize(
    ("score", "incumbent_score", "reason"),
    [
        (None, 0.6, gates.GATE_NOT_RECORDED),
        (0.4, 0.6, gates.GATE_FAILED),
        (0.6, 0.6, gates.NOT_BETTER_THAN_INCUMBENT),
        (0.9, None, gates.INCUMBENT_NOT_SCORED),
        (0.9, 0.6, gates.STALE_REVISION),  # only a promotable candidate meets the revision check
    ],
)
def test_the_revision_is_checked_last_as_api_md_orders_the_checks(
    score: float | None, incumbent_score: float | None, reason: str
) -> None:
    d = decide(
        gate(0.5),
        candidate_version=2,
        candidate_score=score,
        incumbent_version=1,
        incumbent_score=incumbent_score,
        current_revision=2,
        expected_revision=1,
    )
    assert d.reason == reason and not d.promoted
    if reason == gates.STALE_REVISION:
        assert "revision 2" in d.message


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_gate_threshold_must_be_finite(threshold: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        gate(threshold)
    assert info.value.field == "threshold"


def test_ten_thousand_random_cases_agree_with_the_reference() -> None:
    rng = random.Random(20261125)
    grid = [round(x * 0.05, 2) for x in range(21)]  # coarse grid so ties and threshold hits are common
    disagreements = []
    for _ in range(10_000):
        pick = rng.choice if rng.random() < 0.5 else (lambda _g: round(rng.uniform(-1.0, 2.0), 6))
        champion, challenger, threshold = pick(grid), pick(grid), pick(grid)
        maximize = rng.random() < 0.5
        direction = Direction.MAXIMIZE if maximize else Direction.MINIMIZE
        d = against_champion(champion, challenger, threshold, direction)
        expected = reference_promote(champion, challenger, threshold, maximize=maximize) == "challenger"
        if d.promoted != expected:
            disagreements.append((champion, challenger, threshold, maximize))
        assert d.reason in (gates.PROMOTED, gates.GATE_FAILED, gates.NOT_BETTER_THAN_INCUMBENT)
    assert disagreements == []


def changes(*entries: tuple[str, int, int, str]) -> list[AliasChange]:
    return [AliasChange(*e) for e in entries]


P, R, RB, D = Action.PROMOTED, Action.REFUSED, Action.ROLLED_BACK, Action.DELETED


@pytest.mark.parametrize(
    ("history", "target"),
    [
        ([], None),
        (changes((P, 0, 1, "g")), None),  # the first promotion has nothing before it
        (changes((P, 0, 1, "g"), (P, 1, 2, "h")), AliasState(1, "g")),
        (changes((P, 0, 1, "g"), (R, 1, 5, "g"), (P, 1, 2, "h"), (R, 2, 6, "h")), AliasState(1, "g")),
        # A rollback of a rollback goes further back; it never returns to the version just left.
        (changes((P, 0, 1, "g"), (P, 1, 2, "g"), (P, 2, 3, "g"), (RB, 3, 2, "g")), AliasState(1, "g")),
        (changes((P, 0, 1, "g"), (P, 1, 2, "g"), (P, 2, 3, "g"), (RB, 3, 2, "g"), (RB, 2, 1, "g")), None),
        # A promotion after a rollback is undone first.
        (changes((P, 0, 1, "g"), (P, 1, 2, "g"), (RB, 2, 1, "g"), (P, 1, 4, "h")), AliasState(1, "g")),
        # A deletion can be undone.
        (changes((P, 0, 1, "g"), (D, 1, 0, "")), AliasState(1, "g")),
        (changes((P, 0, 1, "g"), (D, 1, 0, ""), (P, 0, 2, "g")), None),  # before v2 the alias was deleted
    ],
)
def test_rollback_target(history: list[AliasChange], target: AliasState | None) -> None:
    assert rollback_target(history) == target
