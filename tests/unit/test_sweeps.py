"""Sweep winner selection agrees with the reference rule and refuses to rank across eval suites."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest

from runledger_server.domain.errors import Code, FailedPrecondition
from runledger_server.domain.sweeps import Candidate, Direction, select_winner
from runledger_server.transport.errors import MAX_MESSAGE_BYTES, clip

FP = "mmlu@abcd"


def reference_select(runs: list[dict[str, Any]], metric: str, *, maximize: bool = True) -> tuple[dict[str, Any], float]:
    """The reference rule, copied (argmax/argmin keep the first of equal scores)."""
    fps = {r["eval_fingerprint"] for r in runs}
    if len(fps) != 1:
        raise ValueError(f"incomparable runs, {len(fps)} eval fingerprints: {sorted(fps)}")
    scores = [float(r["metrics"][metric]) for r in runs]
    best = max(scores) if maximize else min(scores)
    idx = scores.index(best)
    return runs[idx], scores[idx]


def cands(*rows: tuple[str, float, str]) -> list[Candidate]:
    return [Candidate(name, {fp: score}) for name, score, fp in rows]


def test_sweep_winner_r1() -> None:
    result = select_winner(
        cands(("r0", 0.61, FP), ("r1", 0.66, FP), ("r2", 0.59, FP), ("r3", 0.64, FP)), "mmlu", Direction.MAXIMIZE
    )
    assert (result.winner_run_id, result.score) == ("r1", 0.66)
    assert [r for r, _ in result.cohort] == ["r1", "r3", "r0", "r2"]
    assert result.suite_fingerprint == FP and result.excluded == ()


def test_loss_sweep_minimize_picks_b() -> None:
    result = select_winner(cands(("a", 0.9, FP), ("b", 0.4, FP), ("c", 0.7, FP)), "loss", Direction.MINIMIZE)
    assert result.winner_run_id == "b" and result.score == 0.4


def test_mixed_suites_are_refused() -> None:
    with pytest.raises(FailedPrecondition) as info:
        select_winner(cands(("r0", 0.61, FP), ("phantom", 0.99, "easyeval@zzzz")), "mmlu", Direction.MAXIMIZE)
    err = info.value
    assert err.code is Code.FAILED_PRECONDITION and err.reason == "INCOMPARABLE_EVAL_SUITES"
    assert err.metadata["suiteFingerprints"] == "easyeval@zzzz,mmlu@abcd"
    assert err.metadata["metric"] == "mmlu" and err.field == "suite_fingerprint"
    assert "incomparable" in err.message and FP in err.message and "easyeval@zzzz" in err.message


def test_many_suites_are_named_up_to_a_point() -> None:
    many = cands(*((f"r{i}", 0.5, f"suite-{i:03d}@{'f' * 60}") for i in range(40)))
    with pytest.raises(FailedPrecondition) as info:
        select_winner(many, "mmlu", Direction.MAXIMIZE)
    err = info.value
    assert err.metadata["suiteCount"] == "40" and len(err.metadata["suiteFingerprints"].split(",")) == 40
    assert "40 eval suites" in err.message and "and 30 more" in err.message


def test_the_refusal_names_each_fingerprint_whole_within_what_the_transport_sends() -> None:
    suites = [f"mmlu-pro@{hashlib.sha256(bytes([i])).hexdigest()}" for i in range(3)]
    with pytest.raises(FailedPrecondition) as info:
        select_winner(cands(*((f"r{i}", 0.5, s) for i, s in enumerate(suites))), "mmlu", Direction.MAXIMIZE)
    sent = clip(info.value.message, MAX_MESSAGE_BYTES)
    assert all(s in sent for s in sorted(suites))


def test_a_run_scored_on_another_suite_under_another_metric_name_is_not_crowned() -> None:
    """The runs of the sweep's suite call the metric `mmlu_acc`; a run scored on another suite calls it
    `accuracy`. Asked for `accuracy`, only that run has the metric: the candidates still span two suites."""
    honest = [Candidate(f"r{i}", {}, frozenset({FP})) for i in range(2)]
    phantom = Candidate("phantom", {"easyeval@zzzz": 0.99})
    with pytest.raises(FailedPrecondition) as info:
        select_winner([*honest, phantom], "accuracy", Direction.MAXIMIZE)
    assert info.value.reason == "INCOMPARABLE_EVAL_SUITES"
    assert info.value.metadata["suiteFingerprints"] == f"easyeval@zzzz,{FP}"
    named = select_winner([*honest, phantom], "accuracy", Direction.MAXIMIZE, suite_fingerprint="easyeval@zzzz")
    assert named.winner_run_id == "phantom"  # named by the caller: its choice
    assert [(e.run_id, e.reason, e.suites) for e in named.excluded] == [
        ("r0", "NOT_SCORED", (FP,)),
        ("r1", "NOT_SCORED", (FP,)),
    ]


def test_the_phantom_never_wins_in_the_named_suite_cohort() -> None:
    result = select_winner(
        cands(("r0", 0.61, FP), ("phantom", 0.99, "easyeval@zzzz")), "mmlu", Direction.MAXIMIZE, suite_fingerprint=FP
    )
    assert result.winner_run_id == "r0" and [r for r, _ in result.cohort] == ["r0"]
    assert [(e.run_id, e.reason) for e in result.excluded] == [("phantom", "OTHER_EVAL_SUITE")]


@pytest.mark.parametrize("direction", [Direction.MAXIMIZE, Direction.MINIMIZE])
def test_ties_go_to_the_earliest_created_run(direction: Direction) -> None:
    result = select_winner(cands(("early", 0.5, FP), ("mid", 0.5, FP), ("late", 0.5, FP)), "m", direction)
    assert result.winner_run_id == "early"
    assert [r for r, _ in result.cohort] == ["early", "mid", "late"]


def test_unscored_runs_are_excluded_not_ranked() -> None:
    result = select_winner([Candidate("none", {}), *cands(("r0", 0.1, FP))], "m", Direction.MAXIMIZE)
    assert result.winner_run_id == "r0" and [(e.run_id, e.reason) for e in result.excluded] == [("none", "NOT_SCORED")]


def test_no_scored_run_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as info:
        select_winner([Candidate("none", {})], "m", Direction.MAXIMIZE)
    assert (info.value.reason, info.value.field) == ("NO_SCORED_RUNS", "metric")


def test_a_named_suite_nothing_was_scored_on_names_the_suite() -> None:
    with pytest.raises(FailedPrecondition) as info:
        select_winner(cands(("r0", 0.1, FP)), "m", Direction.MAXIMIZE, suite_fingerprint="other-suite@1")
    assert (info.value.reason, info.value.field) == ("NO_SCORED_RUNS", "suite_fingerprint")
    assert info.value.metadata["suiteFingerprint"] == "other-suite@1"


def test_random_sweeps_agree_with_the_reference() -> None:
    rng = random.Random(11)
    for _ in range(2_000):
        n = rng.randint(1, 8)
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        maximize = rng.random() < 0.5
        runs = [{"name": f"r{i}", "eval_fingerprint": FP, "metrics": {"m": s}} for i, s in enumerate(scores)]
        expected, expected_score = reference_select(runs, "m", maximize=maximize)
        got = select_winner(
            cands(*((f"r{i}", s, FP) for i, s in enumerate(scores))),
            "m",
            Direction.MAXIMIZE if maximize else Direction.MINIMIZE,
        )
        assert (got.winner_run_id, got.score) == (expected["name"], expected_score)
