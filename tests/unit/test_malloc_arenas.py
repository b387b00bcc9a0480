"""The server caps glibc's malloc arenas at start-up, unless the operator chose a number (MALLOC_ARENA_MAX)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from runledger_server import malloc_arenas; print(malloc_arenas.limit())"


def _limit(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_arena_cap_is_taken_by_glibc_and_left_to_the_operator_when_set() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _limit(env) == "True"
    assert _limit({**env, "MALLOC_ARENA_MAX": "4"}) == "False"
