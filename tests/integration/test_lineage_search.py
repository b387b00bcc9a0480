"""Runs are found and ordered by their lineage (base model, data version, commit, config, seed, fingerprint),
through the real server, on SQLite and PostgreSQL alike; runs without the field never match."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from runledger.v1 import common_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc
from runledger_server.config import Settings
from runledger_server.embedded import EmbeddedServer
from tests.support import refusal

Stub = tracking_service_pb2_grpc.TrackingServiceStub
BIG_SEED = 2**60 + 1  # not exact as a double: compared as the integer it is


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def tracking(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stub]:
    settings = (
        Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
        if request.param == "sqlite"
        else request.getfixturevalue("pg_settings")
    )
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        yield tracking_service_pb2_grpc.TrackingServiceStub(ch)


def _lineage(base: str, data: str, seed: int, commit: str = "a1b2c3d", lr: str = "1e-05") -> common_pb2.Lineage:
    return common_pb2.Lineage(
        base_model=base, data_version=data, seed=seed, code_commit=commit, config=f'{{"lr": {lr}}}'
    )


@pytest.fixture
def runs(tracking: Stub) -> tuple[str, dict[str, str]]:
    exp = tracking.CreateExperiment(pb.CreateExperimentRequest(display_name="lineage")).name
    made = {}
    for name, lineage in [
        ("qwen-v1", _lineage("Qwen/Qwen3-8B", "sft-mix-v1", 0)),
        ("qwen-v2", _lineage("Qwen/Qwen3-8B", "sft-mix-v2", 1, commit="e5f6a7b", lr="2e-05")),
        ("llama-v2", _lineage("meta-llama/Llama-3.1-8B", "sft-mix-v2", BIG_SEED)),
        ("bare", None),
        ("qwen-v1-again", _lineage("Qwen/Qwen3-8B", "sft-mix-v1", 0)),  # a reproduction: same fingerprint
    ]:
        kw = {} if lineage is None else {"lineage": lineage}
        made[name] = tracking.CreateRun(pb.CreateRunRequest(experiment=exp, display_name=name, **kw)).run_id
    return exp, made


def _names(tracking: Stub, exp: str, page_size: int = 100, **kw: str) -> list[str]:
    names, token = [], ""
    while True:
        page = tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp], page_size=page_size, page_token=token, **kw))
        names += [r.display_name for r in page.runs]
        token = page.next_page_token
        if not token:
            return names


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ("lineage.base_model = 'Qwen/Qwen3-8B'", ["qwen-v1", "qwen-v2", "qwen-v1-again"]),
        ("lineage.base_model != 'Qwen/Qwen3-8B'", ["llama-v2"]),  # "bare" has no base model to differ
        ("lineage.data_version IN ('sft-mix-v2') AND lineage.base_model LIKE 'Qwen/%'", ["qwen-v2"]),
        ("lineage.code_commit = 'e5f6a7b'", ["qwen-v2"]),
        ("lineage.config LIKE '%2e-05%'", ["qwen-v2"]),
        (f"lineage.seed = {BIG_SEED}", ["llama-v2"]),
        (f"lineage.seed IN ({BIG_SEED - 1}, {BIG_SEED + 1})", []),
        ("lineage.seed >= 1", ["qwen-v2", "llama-v2"]),
        ("lineage.seed NOT IN (1)", ["qwen-v1", "llama-v2", "qwen-v1-again"]),
    ],
)
def test_runs_are_filtered_by_lineage(
    tracking: Stub, runs: tuple[str, dict[str, str]], filter_text: str, expected: list[str]
) -> None:
    exp, _ = runs
    assert _names(tracking, exp, filter=filter_text) == expected


def test_reproductions_are_found_by_fingerprint(tracking: Stub, runs: tuple[str, dict[str, str]]) -> None:
    exp, made = runs
    fingerprint = tracking.GetRun(pb.GetRunRequest(run_id=made["qwen-v1"])).lineage_fingerprint
    assert len(fingerprint) == 64
    assert _names(tracking, exp, filter=f"lineage.fingerprint = '{fingerprint}'") == ["qwen-v1", "qwen-v1-again"]


@pytest.mark.parametrize("page_size", [1, 2, 100])
def test_runs_are_ordered_by_lineage_across_pages_with_unset_fields_last(
    tracking: Stub, runs: tuple[str, dict[str, str]], page_size: int
) -> None:
    exp, _ = runs
    by_seed = _names(tracking, exp, page_size, order_by="lineage.seed DESC")
    assert by_seed == ["llama-v2", "qwen-v2", "qwen-v1", "qwen-v1-again", "bare"]
    by_base = _names(tracking, exp, page_size, order_by="lineage.base_model")
    assert by_base == ["qwen-v1", "qwen-v2", "qwen-v1-again", "llama-v2", "bare"]  # bytewise: "Q" before "m"


@pytest.mark.parametrize(
    "filter_text",
    ["lineage.seed = '1'", "lineage.seed = 1.5", "lineage.seed LIKE '1%'", "lineage.base_model = 3", "lineage.lr = 1"],
)
def test_bad_lineage_filters_are_refused_naming_the_filter(
    tracking: Stub, runs: tuple[str, dict[str, str]], filter_text: str
) -> None:
    exp, _ = runs
    r = refusal(lambda: tracking.SearchRuns(pb.SearchRunsRequest(experiments=[exp], filter=filter_text)))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "filter"), r.message
