"""Tracking use cases: experiments, runs, params, tags, lineage, metrics, eval results, sweep winners."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from runledger_server.domain import filters, ids, names, paging, sweeps
from runledger_server.domain.errors import InvalidArgument, NotFound, Unavailable
from runledger_server.domain.lineage import Lineage
from runledger_server.domain.metrics import (
    RESUME_SLOTS,
    Batch,
    Series,
    check_writer_id,
    downsample,
    in_step_order,
    joined,
    resume_seq,
)
from runledger_server.domain.run_status import STATUSES
from runledger_server.services.metric_ingest import MetricIngest
from runledger_server.store.entities import EvalResult, Experiment, Page, Run
from runledger_server.store.tracking import TrackingStore

_LOGGER = logging.getLogger(__name__)

MAX_SELECT_CANDIDATES = 10_000
INGEST_BARRIER_TIMEOUT_S = 10.0  # a writer resuming waits this long for queued batches (clients allow 30 s)


class TrackingService:
    def __init__(self, store: TrackingStore, ingest: MetricIngest, history_max_points: int = 10_000_000) -> None:
        self.store = store
        self.ingest = ingest
        self.history_max_points = history_max_points

    # experiments
    def create_experiment(self, display_name: str, description: str, tags: dict[str, str]) -> Experiment:
        if not display_name or len(display_name) > 256 or "\x00" in display_name:
            raise InvalidArgument("display_name is required (1-256 characters, no NUL)", field="display_name")
        _check_map(tags, "tags")
        return self.store.create_experiment(display_name, names.text_value(description, "description"), tags)

    def get_experiment(self, name: str) -> Experiment:
        return self.store.get_experiment(names.experiment_id(name, "name"))

    def list_experiments(self, filter_text: str, page_size: int, page_token: str) -> Page[Experiment]:
        return self.store.list_experiments(filters.parse_filter(filter_text), paging.page_size(page_size), page_token)

    # runs
    def create_run(
        self,
        experiment: str,
        *,
        run_id: str,
        display_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        lineage: Lineage,
        start_time_us: int | None,
    ) -> Run:
        experiment_id = names.experiment_id(experiment)
        run_id = names.run_id(run_id) if run_id else ids.new_id()
        if len(display_name) > 256 or "\x00" in display_name:
            raise InvalidArgument("display_name must be at most 256 characters, no NUL", field="display_name")
        _check_map(tags, "tags")
        _check_map(params, "params")
        return self.store.create_run(run_id, experiment_id, display_name, tags, params, lineage, start_time_us)

    def get_run(self, run_id: str) -> Run:
        return self.store.get_run(names.run_id(run_id))

    def update_run(self, run_id: str, *, status: str | None, end_time_us: int | None, display_name: str | None) -> Run:
        names.run_id(run_id)
        if status is not None and status not in STATUSES:
            raise InvalidArgument(f"status {status!r} is not one of {', '.join(STATUSES)}", field="status")
        if display_name is not None and (len(display_name) > 256 or "\x00" in display_name):
            raise InvalidArgument("display_name must be at most 256 characters, no NUL", field="display_name")
        return self.store.update_run(run_id, status, end_time_us, display_name)

    def search_runs(
        self,
        experiments: Sequence[str],
        filter_text: str,
        order_by: str,
        page_size: int,
        page_token: str,
        *,
        until: float | None = None,
    ) -> Page[Run]:
        if len(experiments) > filters.MAX_EXPERIMENTS:
            raise InvalidArgument(
                f"experiments names {len(experiments)} experiments; at most {filters.MAX_EXPERIMENTS} per search",
                field="experiments",
            )
        experiment_ids = [names.experiment_id(e, "experiments") for e in experiments]
        return self.store.search_runs(
            experiment_ids,
            filters.parse_filter(filter_text),
            filters.parse_order_by(order_by),
            paging.page_size(page_size),
            page_token,
            until=until,
        )

    # params, tags, lineage
    def log_params(self, run_id: str, params: dict[str, str]) -> dict[str, str]:
        names.run_id(run_id)
        if not params:
            raise InvalidArgument("params must not be empty", field="params")
        _check_map(params, "params")
        return self.store.log_params(run_id, params)

    def set_tags(self, run_id: str, tags: dict[str, str], remove_keys: Sequence[str]) -> dict[str, str]:
        names.run_id(run_id)
        _check_map(tags, "tags")
        for key in remove_keys:
            names.key(key, "remove_keys")
        both = set(tags) & set(remove_keys)
        if both:
            raise InvalidArgument(f"tag {sorted(both)[0]!r} is both set and removed", field="remove_keys")
        return self.store.set_tags(run_id, tags, remove_keys)

    def set_lineage(self, run_id: str, lineage: Lineage) -> Lineage:
        names.run_id(run_id)
        return self.store.set_lineage(run_id, lineage)

    # metrics
    def submit_metrics(self, batch: Batch, settled: Callable[[], object] | None = None) -> Future[bool]:
        """Queue a validated batch for group commit; resolves after the commit (True = duplicate). `settled` is
        called once the batch is no longer held, committed or not, even if the future was cancelled."""
        return self.ingest.submit(batch, settled)

    def queued_metrics_committed(self) -> Future[None]:
        """Resolves once the batches queued for commit so far are committed (or failed). Ask before
        `next_metric_seq`: a restarted writer asking while its previous incarnation's last batches wait for their
        commit would otherwise be told to reuse their numbers. Waited for off any worker thread (it can take a
        while when commits are slow); past INGEST_BARRIER_TIMEOUT_S the answer is `ingest_behind()`."""
        return self.ingest.barrier()

    @staticmethod
    def ingest_behind() -> Unavailable:
        return Unavailable("this server's metric commits are behind; ask again shortly", reason="INGEST_BEHIND")

    def check_metric_writer(self, run_id: str, writer_id: str) -> None:
        """GetMetricWriter's arguments, checked before it waits for queued commits (no database access)."""
        names.run_id(run_id)
        check_writer_id(writer_id)

    def next_metric_seq(self, run_id: str, writer_id: str) -> int:
        """Where a writer that keeps its writer_id across a restart continues its batch numbering: past its
        committed batches (see queued_metrics_committed) and those other replicas may still commit (resume_seq)."""
        highest = self.store.highest_metric_seq(names.run_id(run_id), check_writer_id(writer_id))
        return resume_seq(highest, 1 + secrets.randbelow(RESUME_SLOTS))

    def metric_history(
        self, run_id: str, key: str, start_step: int | None, end_step: int | None, max_points: int
    ) -> list[Series]:
        """The points of one key in step order, as consecutive pieces (views of the stored chunks when possible)."""
        names.run_id(run_id)
        names.key(key, "key")
        if max_points < 0:
            raise InvalidArgument(f"max_points must be >= 0, got {max_points}", field="max_points")
        if start_step is not None and end_step is not None and end_step < start_step:
            raise InvalidArgument("end_step must be >= start_step", field="end_step")
        chunks = self.store.metric_chunks(run_id, key, start_step, end_step, self.history_max_points)
        pieces = in_step_order(chunks, start_step, end_step)
        if max_points and sum(len(p) for p in pieces) > max_points:
            whole = joined(pieces)
            keep = downsample(whole.steps, whole.values, max_points)
            pieces = [Series(key, whole.steps[keep], whole.values[keep], whole.timestamps_ms[keep])]
        return pieces

    # eval results and sweeps
    def log_eval_result(self, run_id: str, suite_fingerprint: str, metrics: dict[str, float]) -> EvalResult:
        names.run_id(run_id)
        _suite(suite_fingerprint, "suite_fingerprint")
        if not metrics:
            raise InvalidArgument("metrics must not be empty", field="metrics")
        scores = {}
        for metric, value in metrics.items():
            names.key(metric, "metrics")
            scores[metric] = sweeps.require_finite(value, f"metrics[{metric}]")
        return self.store.log_eval_result(run_id, suite_fingerprint, scores)

    def select_winner(
        self,
        *,
        run_ids: Sequence[str],
        experiment: str,
        filter_text: str,
        metric: str,
        direction: sweeps.Direction | None,
        suite_fingerprint: str | None,
    ) -> sweeps.SweepResult:
        names.key(metric, "metric")
        if direction is None:
            raise InvalidArgument("direction is required (MAXIMIZE or MINIMIZE)", field="direction")
        if suite_fingerprint is not None:
            _suite(suite_fingerprint, "suite_fingerprint")
        if run_ids and experiment:
            raise InvalidArgument("give either run_ids or experiment, not both", field="run_ids")
        if run_ids and filter_text.strip():  # it would be ignored: every listed run is a candidate
            raise InvalidArgument(
                "filter applies to an experiment's runs; with run_ids, list only the candidates", field="filter"
            )
        if run_ids:
            unique = list(dict.fromkeys(run_ids))
            if len(unique) > MAX_SELECT_CANDIDATES:
                raise InvalidArgument(
                    f"{len(unique)} run_ids; at most {MAX_SELECT_CANDIDATES} candidates per call", field="run_ids"
                )
            for r in unique:
                names.run_id(r, "run_ids")
            ordered = self.store.runs_in_creation_order(unique)
        elif experiment:
            ordered = self._experiment_runs(experiment, filter_text)
        else:
            raise InvalidArgument("candidates are required: give run_ids or experiment", field="run_ids")
        scores = self.store.eval_scores(ordered, metric)
        suites = self.store.eval_suites(ordered)
        candidates = [sweeps.Candidate(r, scores.get(r, {}), frozenset(suites.get(r, ()))) for r in ordered]
        return sweeps.select_winner(candidates, metric, direction, suite_fingerprint=suite_fingerprint)

    def _experiment_runs(self, experiment: str, filter_text: str) -> list[str]:
        # A missing experiment is NOT_FOUND naming it, not "no scored runs" (which would blame the metric).
        experiment_id = names.experiment_id(experiment, "experiment")
        try:
            self.store.get_experiment(experiment_id)
        except NotFound:
            raise NotFound(f"experiments/{experiment_id} not found", field="experiment") from None
        out: list[str] = []
        token = ""
        until = time.monotonic() + self.store.query_budget  # one budget for all the pages: one search
        while True:
            page = self.search_runs([experiment], filter_text, "create_time", paging.MAX_PAGE_SIZE, token, until=until)
            out.extend(r.run_id for r in page.items)
            token = page.next_page_token
            if len(out) > MAX_SELECT_CANDIDATES or (token and len(out) == MAX_SELECT_CANDIDATES):
                raise InvalidArgument(
                    f"more than {MAX_SELECT_CANDIDATES} candidate runs; narrow them with filter", field="filter"
                )
            if not token:
                return out


def _check_map(values: dict[str, str], field: str) -> None:
    for k, v in values.items():
        names.key(k, field)
        names.text_value(v, f"{field}[{k}]")


def _suite(value: str, field: str) -> str:
    if not value or len(value) > 256 or "\x00" in value:
        raise InvalidArgument(f"{field} is required (1-256 characters)", field=field)
    return value
