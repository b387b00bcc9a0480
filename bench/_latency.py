"""One latency summary for both sides of the comparison (standard library only: it also runs in MLflow's venv)."""

from __future__ import annotations

import math
import statistics
from typing import Any


def summarize(lat: list[float], load: list[tuple[int, float]]) -> dict[str, Any]:
    """p50/p99 in ms of call latencies (seconds), plus the background load in points/s when there was one."""
    lat = sorted(lat)
    result: dict[str, Any] = {
        "calls": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[max(0, math.ceil(0.99 * len(lat)) - 1)],
    }
    if load:
        result["load_points_per_s"] = sum(n / s for n, s in load)
    return result
