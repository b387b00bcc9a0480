"""The client's reconnect backoff: exponential, capped, shortened by jitter but never below half by default."""

from __future__ import annotations

import pytest

from runledger import RetryPolicy


@pytest.mark.parametrize(
    ("failures", "u", "expected"),
    [
        (1, 0.0, 0.1),
        (2, 0.0, 0.2),
        (3, 0.0, 0.4),
        (6, 0.0, 3.2),
        (7, 0.0, 5.0),  # capped
        (10_000, 0.0, 5.0),  # no overflow however long the outage
        (1, 0.999999, 0.05),  # jitter takes off at most half
        (7, 0.5, 3.75),
        (0, 0.0, 0.1),  # defensive: zero failures behaves as one
    ],
)
def test_delay(failures: int, u: float, expected: float) -> None:
    assert RetryPolicy().delay(failures, u) == pytest.approx(expected, rel=1e-5)


def test_no_jitter_is_deterministic() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0, multiplier=3.0, jitter=0.0)
    assert [policy.delay(n, 0.7) for n in range(1, 5)] == [1.0, 3.0, 8.0, 8.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff": 0.0},
        {"initial_backoff": 2.0, "max_backoff": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
