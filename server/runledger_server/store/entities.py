"""Entities the stores return: frozen dataclasses, free of SQL and protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from runledger_server.domain.lineage import Lineage


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    display_name: str
    description: str
    tags: dict[str, str]
    create_time_us: int


@dataclass(frozen=True)
class LatestMetric:
    step: int
    value: float
    timestamp_ms: int


@dataclass(frozen=True)
class Run:
    run_id: str
    experiment_id: str
    display_name: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED
    params: dict[str, str]
    tags: dict[str, str]
    lineage: Lineage
    lineage_fingerprint: str | None
    latest_metrics: dict[str, LatestMetric]
    create_time_us: int
    update_time_us: int
    start_time_us: int
    end_time_us: int | None


@dataclass(frozen=True)
class EvalResult:
    run_id: str
    suite_fingerprint: str
    metrics: dict[str, float]
    create_time_us: int


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""
