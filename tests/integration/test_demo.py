"""The README's main command: the demo runs against a real embedded server and reaches the honest winner."""

from __future__ import annotations

from pathlib import Path

import pytest

from runledger_server.demo import run_demo


def test_demo_refuses_mixed_suites_and_picks_the_honest_winner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(data_dir=str(tmp_path / "data")) == 0
    out = capsys.readouterr().out
    assert "refused: FAILED_PRECONDITION INCOMPARABLE_EVAL_SUITES" in out
    assert "winner: grpo-lr2e-6-b0.04 with accuracy 0.664" in out
    assert "excluded: phantom-self-eval (OTHER_EVAL_SUITE" in out
    assert "600 NaN" in out
    assert "phantom-self-eval refused: BROKEN_LINEAGE" in out
    assert "version 2 (the sweep winner): PROMOTED, production now at revision 2" in out
    assert "version 3 (a tied re-run): refused NOT_BETTER_THAN_INCUMBENT (candidate 0.664, incumbent 0.664)" in out
    assert "version 4 (below the gate): refused GATE_FAILED" in out
    assert "rollback restores version 1 (revision 3)" in out
    assert "@production -> version 1, revision 3" in out
    assert "ROLLED_BACK  2 -> 1" in out
    assert (tmp_path / "data" / "runledger.db").exists()
