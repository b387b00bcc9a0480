"""The tracking store interface: what the tracking use cases need from metadata storage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runledger_server.domain.filters import Clause, OrderBy
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import Batch, Series
from runledger_server.store.entities import EvalResult, Experiment, Page, Run


class TrackingStore(Protocol):
    """Each method is one transaction; refusals raise DomainError and change nothing."""

    # Seconds of database work one search may take (its pages together, for SelectWinner).
    query_budget: float

    def create_experiment(self, display_name: str, description: str, tags: dict[str, str]) -> Experiment: ...

    def get_experiment(self, experiment_id: str) -> Experiment: ...

    def list_experiments(self, clauses: Sequence[Clause], page_size: int, page_token: str) -> Page[Experiment]: ...

    def create_run(
        self,
        run_id: str,
        experiment_id: str,
        display_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        lineage: Lineage,
        start_time_us: int | None,
    ) -> Run: ...

    def get_run(self, run_id: str) -> Run: ...

    def run_lineage(self, run_id: str) -> Lineage:
        """Just the run's lineage: one row, for checks that need nothing else of the run."""
        ...

    def update_run(self, run_id: str, status: str | None, end_time_us: int | None, display_name: str | None) -> Run: ...

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        clauses: Sequence[Clause],
        order_by: OrderBy,
        page_size: int,
        page_token: str,
        *,
        until: float | None = None,
    ) -> Page[Run]:
        """Refused as RESOURCE_EXHAUSTED QUERY_TOO_EXPENSIVE past `query_budget` seconds of database work, or
        at `until` (time.monotonic()) when that comes first."""
        ...

    def log_params(self, run_id: str, params: dict[str, str]) -> dict[str, str]: ...

    def set_tags(self, run_id: str, tags: dict[str, str], remove_keys: Sequence[str]) -> dict[str, str]: ...

    def set_lineage(self, run_id: str, lineage: Lineage) -> Lineage: ...

    def commit_metric_batches(self, batches: Sequence[Batch]) -> list[bool | Exception]:
        """Store many batches in one transaction (group commit). Per batch: True when it was a
        duplicate (already stored, with the same checksum), False when newly stored, or the refusal for that
        batch alone (another batch under its seq: WRITER_ID_REUSED)."""
        ...

    def highest_metric_seq(self, run_id: str, writer_id: str) -> int | None:
        """The highest seq the writer has stored in the run (None for none); NotFound for a missing run."""
        ...

    def metric_chunks(
        self, run_id: str, key: str, start_step: int | None, end_step: int | None, max_points: int | None = None
    ) -> list[Series]:
        """The stored chunks of one key in logging order, at least those holding steps in [start_step, end_step]
        (the caller cuts and orders them: domain.metrics.in_step_order). With `max_points`, chunks holding more
        points than that in all raise ResourceExhausted HISTORY_TOO_LARGE before any is read."""
        ...

    def log_eval_result(self, run_id: str, suite_fingerprint: str, metrics: dict[str, float]) -> EvalResult: ...

    def eval_scores(self, run_ids: Sequence[str], metric: str) -> dict[str, dict[str, float]]:
        """run_id -> {suite_fingerprint: score} for one metric."""
        ...

    def eval_suites(self, run_ids: Sequence[str]) -> dict[str, set[str]]:
        """run_id -> the suite fingerprints the run was scored on, for any metric (runs never scored: absent)."""
        ...

    def runs_in_creation_order(self, run_ids: Sequence[str]) -> list[str]: ...
