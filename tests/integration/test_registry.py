"""RegistryService over the real server: lineage-checked versions, frozen gates, gate-guarded aliases, serving."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from runledger.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    registry_pb2,
    registry_service_pb2 as pb,
    registry_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from runledger_server.config import Settings
from runledger_server.domain import paging
from runledger_server.embedded import EmbeddedServer
from tests.support import refusal

MODEL = "qwen3-8b-sft"
GATE = "mmlu-frozen"
SUITE = "mmlu@abcd"
LINEAGE = {
    "data_version": "sft-mix-v3",
    "code_commit": "a1b2c3d",
    "config": '{"lr": 2e-5, "lora_r": 16}',
    "base_model": "Qwen/Qwen3-8B",
    "seed": 0,
}
EXAMPLE_FINGERPRINT = "b06a681fb46bb8d9aceed5caf216654a5dcb3ccc55f3c5965abbaae565ab830d"
ACTOR = (("x-runledger-actor", "release-bot"),)


def lineage(**fields: Any) -> common_pb2.Lineage:
    return common_pb2.Lineage(**fields)


class Registry:
    """Test-side shortcuts over real stubs: runs via TrackingService, files via UploadArtifact."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self.tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
        self.artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        self._experiment = ""

    def experiment(self) -> str:
        if not self._experiment:
            exp = self.tracking.CreateExperiment(tracking_service_pb2.CreateExperimentRequest(display_name="sweep"))
            self._experiment = exp.name
        return self._experiment

    def run(self, seed: int = 0, **lineage_fields: Any) -> str:
        fields = lineage_fields or {**LINEAGE, "seed": seed}
        run = self.tracking.CreateRun(
            tracking_service_pb2.CreateRunRequest(experiment=self.experiment(), lineage=lineage(**fields))
        )
        return run.run_id

    def upload(self, run_id: str, path: str, data: bytes) -> None:
        def requests() -> Iterator[artifact_service_pb2.UploadArtifactRequest]:
            header = artifact_service_pb2.UploadArtifactHeader(
                run_id=run_id, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
            yield artifact_service_pb2.UploadArtifactRequest(header=header)
            for lo in range(0, len(data), 64 * 1024):
                yield artifact_service_pb2.UploadArtifactRequest(chunk=data[lo : lo + 64 * 1024])

        self.artifacts.UploadArtifact(requests())

    def model(self, model_id: str = MODEL) -> registry_pb2.RegisteredModel:
        return self.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(model_id=model_id))

    def gate(
        self,
        gate_id: str = GATE,
        threshold: float = 0.60,
        direction: int = common_pb2.DIRECTION_MAXIMIZE,
        model: str = MODEL,
    ) -> registry_pb2.Gate:
        return self.stub.CreateGate(
            pb.CreateGateRequest(
                model=f"models/{model}",
                gate_id=gate_id,
                suite_fingerprint=SUITE,
                metric="mmlu",
                direction=direction,
                threshold=threshold,
            )
        )

    def version(self, seed: int = 0, model: str = MODEL, path: str = "model.safetensors") -> registry_pb2.ModelVersion:
        run_id = self.run(seed)
        self.upload(run_id, path, f"weights of seed {seed}".encode())
        return self.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model=f"models/{model}", run_id=run_id, artifact_path=path)
        )

    def score(self, version: int, score: float, gate_id: str = GATE, model: str = MODEL) -> registry_pb2.GateResult:
        return self.stub.RecordGateResult(
            pb.RecordGateResultRequest(model=f"models/{model}", gate_id=gate_id, version=version, score=score),
            metadata=(("x-runledger-actor", "eval-harness"),),
        )

    def set_alias(
        self, version: int, alias: str = "production", gate_id: str = GATE, expected_revision: int | None = None
    ) -> pb.SetAliasResponse:
        req = pb.SetAliasRequest(model=f"models/{MODEL}", alias=alias, version=version, gate_id=gate_id)
        if expected_revision is not None:
            req.expected_revision = expected_revision
        return self.stub.SetAlias(req, metadata=ACTOR)

    def serving(self, alias: str = "production") -> pb.GetModelVersionByAliasResponse:
        return self.stub.GetModelVersionByAlias(pb.GetModelVersionByAliasRequest(model=f"models/{MODEL}", alias=alias))

    def history(self, alias: str = "production") -> list[registry_pb2.AliasHistoryEntry]:
        return list(
            self.stub.ListAliasHistory(pb.ListAliasHistoryRequest(model=f"models/{MODEL}", alias=alias)).entries
        )

    def state(self, alias: str = "production") -> tuple[int, int]:
        """(version, revision) of the alias as the watch sees it, set or not."""
        stream = self.stub.WatchAlias(pb.WatchAliasRequest(model=f"models/{MODEL}", alias=alias))
        try:
            first = next(stream)
        finally:
            stream.cancel()
        return first.alias.version, first.alias.revision


@pytest.fixture
def reg(channel: grpc.Channel) -> Registry:
    return Registry(channel)


@dataclass
class Champion:
    """The seed scenario: champion v1 at 0.61 on the frozen gate, challengers a=0.58, b=0.66, flat=0.61."""

    champion: int
    a: int
    b: int
    flat: int


@pytest.fixture
def seeded(reg: Registry) -> Champion:
    reg.model()
    reg.gate()
    versions = [reg.version(seed=s).version for s in range(4)]
    for v, score in zip(versions, (0.61, 0.58, 0.66, 0.61), strict=True):
        reg.score(v, score)
    reg.set_alias(versions[0])
    return Champion(*versions)


# ---- models and versions ---------------------------------------------------------------------
def test_versions_record_run_artifact_digest_and_lineage(reg: Registry) -> None:
    created = reg.model()
    assert created.name == f"models/{MODEL}" and created.latest_version == 0
    run_id = reg.run()
    data = b"\x00adapter weights" * 1000
    reg.upload(run_id, "adapter.safetensors", data)
    v = reg.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(model=f"models/{MODEL}", run_id=run_id, artifact_path="adapter.safetensors")
    )
    assert v.name == f"models/{MODEL}/versions/1" and v.version == 1 and v.run_id == run_id
    assert v.artifact_sha256 == hashlib.sha256(data).hexdigest() and v.artifact_size == len(data)
    assert v.artifact_uri
    assert v.lineage_fingerprint == EXAMPLE_FINGERPRINT
    assert v.lineage.config == LINEAGE["config"] and v.lineage.HasField("seed") and v.lineage.seed == 0
    got = reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=v.name))
    assert got == v
    for bad in ("0", "99999999999999999999"):  # the second used to overflow the database's integer: INTERNAL
        request = pb.GetModelVersionRequest(name=f"models/{MODEL}/versions/{bad}")
        r = refusal(lambda request=request: reg.stub.GetModelVersion(request))  # type: ignore[misc]
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "name"), bad
    for missing in (f"models/{MODEL}/versions/99", "models/no-such-model/versions/1", f"models/{MODEL}@staging"):
        request = pb.GetModelVersionRequest(name=missing)
        r = refusal(lambda request=request: reg.stub.GetModelVersion(request))  # type: ignore[misc]
        assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "name"), missing  # its only field
    assert reg.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=f"models/{MODEL}")).latest_version == 1


def test_a_directory_is_addressed_by_its_manifest_digest(reg: Registry) -> None:
    reg.model()
    run_id = reg.run()
    files = {"adapter/adapter_config.json": b'{"r": 16}', "adapter/adapter_model.safetensors": b"w" * 5000}
    for path, data in reversed(files.items()):
        reg.upload(run_id, path, data)
    v = reg.stub.CreateModelVersion(pb.CreateModelVersionRequest(model=MODEL, run_id=run_id, artifact_path="adapter/"))
    entries = [
        {"path": p.removeprefix("adapter/"), "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
        for p, d in sorted(files.items())
    ]
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    assert v.artifact_path == "adapter"
    assert v.artifact_sha256 == hashlib.sha256(canonical.encode()).hexdigest()
    assert v.artifact_size == sum(len(d) for d in files.values())


def test_a_refused_directory_registration_publishes_no_manifest(reg: Registry, server: EmbeddedServer) -> None:
    run_id = reg.run()
    reg.upload(run_id, "adapter/adapter_model.safetensors", b"w" * 5000)
    blobs = Path(server.settings.artifact_location) / "sha256"
    before = sorted(p.name for p in blobs.rglob("*") if p.is_file())
    r = refusal(
        lambda: reg.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model="models/nope", run_id=run_id, artifact_path="adapter/")
        )
    )
    assert (r.code, r.metadata.get("field")) == (grpc.StatusCode.NOT_FOUND, "model")
    assert sorted(p.name for p in blobs.rglob("*") if p.is_file()) == before


def test_version_numbers_count_up_and_list_newest_first(reg: Registry) -> None:
    reg.model()
    assert [reg.version(seed=s).version for s in range(5)] == [1, 2, 3, 4, 5]
    seen, token = [], ""
    while True:
        page = reg.stub.ListModelVersions(
            pb.ListModelVersionsRequest(model=f"models/{MODEL}", page_size=2, page_token=token)
        )
        seen += [v.version for v in page.model_versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]


def test_models_list_in_pages(reg: Registry) -> None:
    for i in range(5):
        reg.model(f"m{i}")
    page1 = reg.stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(page_size=3))
    page2 = reg.stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(page_size=3, page_token=page1.next_page_token))
    assert [m.name for m in page1.registered_models] == ["models/m0", "models/m1", "models/m2"]
    assert [m.name for m in page2.registered_models] == ["models/m3", "models/m4"] and not page2.next_page_token


def test_model_ids_are_validated_and_unique(reg: Registry) -> None:
    reg.model()
    r = refusal(lambda: reg.model())
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.metadata["field"] == "model_id"
    r = refusal(lambda: reg.model("bad/name"))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "model_id"
    r = refusal(lambda: reg.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="models/nope")))
    assert r.code == grpc.StatusCode.NOT_FOUND and "models/nope" in r.message and r.metadata["field"] == "name"


def test_broken_lineage_names_every_missing_field(reg: Registry) -> None:
    reg.model()
    partial = {k: v for k, v in LINEAGE.items() if k not in ("config", "seed")}
    run_id = reg.run(**partial)
    reg.upload(run_id, "model.safetensors", b"weights")
    r = refusal(
        lambda: reg.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model=MODEL, run_id=run_id, artifact_path="model.safetensors")
        )
    )
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "BROKEN_LINEAGE"
    assert r.metadata["missingFields"] == "config,seed"
    assert "config" in r.message and "seed" in r.message
    model = reg.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=f"models/{MODEL}"))
    assert model.latest_version == 0
    assert not reg.stub.ListModelVersions(pb.ListModelVersionsRequest(model=MODEL)).model_versions


def test_registration_needs_the_run_its_artifact_and_the_model(reg: Registry) -> None:
    reg.model()
    run_id = reg.run()
    reg.upload(run_id, "model.safetensors", b"weights")
    broken = reg.run(**{k: v for k, v in LINEAGE.items() if k != "config"})
    cases = [
        (MODEL, "no-such-run", "model.safetensors", grpc.StatusCode.NOT_FOUND, "run_id"),
        (MODEL, run_id, "other.bin", grpc.StatusCode.NOT_FOUND, "artifact_path"),
        (MODEL, run_id, "../model.safetensors", grpc.StatusCode.INVALID_ARGUMENT, "artifact_path"),
        ("models/nope", run_id, "model.safetensors", grpc.StatusCode.NOT_FOUND, "model"),
        # A missing model is named last: a client that creates the model when it is missing and asks again must
        # not create one for a registration that fails anyway.
        ("models/nope", "no-such-run", "model.safetensors", grpc.StatusCode.NOT_FOUND, "run_id"),
        ("models/nope", run_id, "other.bin", grpc.StatusCode.NOT_FOUND, "artifact_path"),
        ("models/nope", broken, "model.safetensors", grpc.StatusCode.FAILED_PRECONDITION, "run_id"),
    ]
    for model, rid, path, code, field in cases:
        r = refusal(
            lambda m=model, rid=rid, p=path: reg.stub.CreateModelVersion(
                pb.CreateModelVersionRequest(model=m, run_id=rid, artifact_path=p)
            )
        )
        assert (r.code, r.metadata.get("field")) == (code, field), r
    assert reg.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=f"models/{MODEL}")).latest_version == 0


def test_a_directory_registered_into_a_missing_model_publishes_no_manifest(reg: Registry, settings: Settings) -> None:
    run_id = reg.run()
    reg.upload(run_id, "adapter/a.bin", b"a")
    reg.upload(run_id, "adapter/b.bin", b"b")
    blobs = Path(settings.artifact_location) / "sha256"
    before = sorted(p.name for p in blobs.rglob("*") if p.is_file())
    r = refusal(
        lambda: reg.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model="models/nope", run_id=run_id, artifact_path="adapter")
        )
    )
    assert (r.code, r.metadata.get("field")) == (grpc.StatusCode.NOT_FOUND, "model")
    assert sorted(p.name for p in blobs.rglob("*") if p.is_file()) == before  # the two files, no manifest
    reg.model()
    version = reg.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(model=MODEL, run_id=run_id, artifact_path="adapter")
    )
    assert version.version == 1 and len([p for p in blobs.rglob("*") if p.is_file()]) == len(before) + 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("pg_database_url"))


def test_a_file_registers_from_one_read_and_one_write_and_anything_else_writes_nothing(
    database_url: str, tmp_path: Path
) -> None:
    from runledger_server.backends.artifacts.local import LocalBlobStore
    from runledger_server.backends.sql import migrate
    from runledger_server.backends.sql.artifact_index_store import SqlArtifactIndex
    from runledger_server.backends.sql.database import Database
    from runledger_server.backends.sql.registry_store import SqlRegistryStore
    from runledger_server.backends.sql.tracking_store import SqlTrackingStore
    from runledger_server.domain.errors import FailedPrecondition, NotFound
    from runledger_server.domain.lineage import Lineage
    from runledger_server.services.artifacts import ArtifactService
    from runledger_server.services.registry import RegistryService
    from runledger_server.store.registry_entities import ArtifactRef

    db = Database(database_url)
    try:
        migrate.upgrade(db)
        tracking, store = SqlTrackingStore(db), SqlRegistryStore(db)
        index = SqlArtifactIndex(db)
        artifacts = ArtifactService(index, LocalBlobStore(tmp_path / "blobs"))
        service = RegistryService(store, tracking, artifacts)
        experiment = tracking.create_experiment("e", "", {})
        full = Lineage(**LINEAGE)
        tracking.create_run("r1", experiment.experiment_id, "", {}, {}, full, None)
        tracking.create_run("r2", experiment.experiment_id, "", {}, {}, Lineage("v1"), None)
        for run_id, path in (("r1", "model.bin"), ("r1", "adapter/a.bin"), ("r2", "model.bin")):
            upload = artifacts.begin_upload(run_id, path, 1, hashlib.sha256(b"w").hexdigest())
            upload.write([b"w"])
            upload.finish()
        store.create_model("m", "", {})

        made = store.create_version_of_file("m", "r1", "model.bin", "first")
        record = index.get("r1", "model.bin")
        assert made is not None and record is not None
        assert made.version == 1 and made.artifact == ArtifactRef("model.bin", record.sha256, 1, record.uri)
        assert (made.lineage, made.lineage_fingerprint, made.description) == (full, EXAMPLE_FINGERPRINT, "first")
        assert store.get_version("m", 1) == made  # what was stored is what was answered

        # No model, an incomplete lineage, a directory, no such file or run: None, and nothing written, so the
        # service's checked path can name the refusal.
        for model_id, run_id, path in (
            ("nope", "r1", "model.bin"),
            ("m", "r2", "model.bin"),
            ("m", "r1", "adapter"),
            ("m", "r1", "other.bin"),
            ("m", "nope", "model.bin"),
        ):
            assert store.create_version_of_file(model_id, run_id, path, "") is None, (model_id, run_id, path)
        assert store.get_model("m").latest_version == 1
        assert [v.version for v in store.list_versions("m", 10, "").items] == [1]

        directory = service.create_version("models/m", "r1", "adapter/", "")
        assert (directory.version, directory.artifact.path, directory.lineage_fingerprint) == (
            2,
            "adapter",
            EXAMPLE_FINGERPRINT,
        )

        if database_url.startswith("sqlite"):
            # A refusal reads only: it is answered while another writer holds SQLite's write lock (it waited for
            # the lock, up to the busy timeout, and then answered UNAVAILABLE).
            import sqlite3

            writer = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")
            try:
                for model, run_id, path, refused in (
                    ("models/m", "r2", "model.bin", FailedPrecondition),
                    ("models/m", "nope", "model.bin", NotFound),
                    ("models/nope", "r1", "model.bin", NotFound),
                ):
                    started = time.monotonic()
                    with pytest.raises(refused):
                        service.create_version(model, run_id, path, "")
                    assert time.monotonic() - started < 5, (model, run_id, path)
            finally:
                writer.rollback()
                writer.close()
    finally:
        db.dispose()


# ---- gates -----------------------------------------------------------------------------------
def test_gates_are_frozen(reg: Registry) -> None:
    reg.model()
    first = reg.gate()
    assert first.name == f"models/{MODEL}/gates/{GATE}" and first.threshold == 0.60
    assert reg.gate() == first  # identical re-create is idempotent
    for kwargs, field in [
        ({"threshold": 0.5}, "threshold"),
        ({"direction": common_pb2.DIRECTION_MINIMIZE}, "direction"),
    ]:
        r = refusal(lambda kw=kwargs: reg.gate(**kw))
        assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.metadata["field"] == field and field in r.message
    r = refusal(lambda: reg.gate(direction=common_pb2.DIRECTION_UNSPECIFIED))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "direction"
    r = refusal(lambda: reg.gate(gate_id="other", threshold=float("nan")))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "threshold"
    assert reg.stub.GetGate(pb.GetGateRequest(name=first.name)) == first
    r = refusal(lambda: reg.stub.GetGate(pb.GetGateRequest(name=f"models/{MODEL}/gates/other")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "name")  # the request's one field
    r = refusal(lambda: reg.stub.GetGate(pb.GetGateRequest(name="models/no-such-model/gates/other")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "name")


def test_gate_results_are_immutable(reg: Registry) -> None:
    reg.model()
    reg.gate()
    v = reg.version().version
    first = reg.score(v, 0.7)
    assert first.actor == "eval-harness" and first.score == 0.7
    assert reg.score(v, 0.7) == first  # same score again: a no-op
    r = refusal(lambda: reg.score(v, 0.71))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "GATE_RESULT_IMMUTABLE"
    assert r.metadata["field"] == "score" and r.metadata["recordedScore"] == "0.7"
    for version, gate_id, score, code in [
        (99, GATE, 0.5, grpc.StatusCode.NOT_FOUND),
        (v, "no-gate", 0.5, grpc.StatusCode.NOT_FOUND),
        (v, GATE, float("inf"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        r = refusal(lambda ver=version, g=gate_id, s=score: reg.score(ver, s, gate_id=g))
        assert r.code == code
    assert reg.score(v, 0.7).score == 0.7


# ---- aliases ---------------------------------------------------------------------------------
def test_first_promotion_and_serving_lookup(reg: Registry) -> None:
    reg.model()
    reg.gate()
    v = reg.version()
    reg.score(v.version, 0.66)
    resp = reg.set_alias(v.version, expected_revision=0)
    assert resp.decision.promoted and resp.decision.reason == "PROMOTED"
    assert resp.decision.candidate_score == 0.66 and not resp.decision.HasField("incumbent_score")
    assert resp.alias.name == f"models/{MODEL}/aliases/production"
    assert (resp.alias.version, resp.alias.revision, resp.alias.gate_id) == (v.version, 1, GATE)
    served = reg.serving()
    assert served.alias == resp.alias
    assert served.model_version.version == v.version and served.model_version.aliases == ["production"]
    assert served.model_version.artifact_sha256 == v.artifact_sha256
    assert served.model_version.lineage_fingerprint == EXAMPLE_FINGERPRINT
    by_name = reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}@production"))
    assert by_name.version == v.version
    [entry] = reg.history()
    assert entry.action == registry_pb2.ALIAS_ACTION_PROMOTED and entry.actor == "release-bot"
    assert (entry.sequence, entry.revision, entry.from_version, entry.to_version) == (1, 1, 0, v.version)
    assert entry.name == f"models/{MODEL}/aliases/production/history/1"


def test_seed_scenario(reg: Registry, seeded: Champion) -> None:
    # Run `a` reports a flattering 0.99 about itself; the gate only ever reads its own recorded 0.58.
    run_a = reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}/versions/{seeded.a}")).run_id
    reg.tracking.LogEvalResult(
        tracking_service_pb2.LogEvalResultRequest(run_id=run_a, suite_fingerprint=SUITE, metrics={"mmlu": 0.99})
    )
    r = refusal(lambda: reg.set_alias(seeded.a))
    assert r.reason == "GATE_FAILED" and r.metadata["candidateScore"] == "0.58"
    r = refusal(lambda: reg.set_alias(seeded.flat))
    assert r.reason == "NOT_BETTER_THAN_INCUMBENT" and r.metadata["incumbentScore"] == "0.61"
    promoted = reg.set_alias(seeded.b)
    assert promoted.decision.promoted and promoted.decision.incumbent_score == 0.61
    assert reg.serving().model_version.version == seeded.b
    reasons = [(e.action, e.reason, e.to_version) for e in reg.history()]
    assert reasons == [
        (registry_pb2.ALIAS_ACTION_PROMOTED, "PROMOTED", seeded.champion),
        (registry_pb2.ALIAS_ACTION_REFUSED, "GATE_FAILED", seeded.a),
        (registry_pb2.ALIAS_ACTION_REFUSED, "NOT_BETTER_THAN_INCUMBENT", seeded.flat),
        (registry_pb2.ALIAS_ACTION_PROMOTED, "PROMOTED", seeded.b),
    ]


@dataclass
class RefusalCase:
    reason: str
    code: grpc.StatusCode
    metadata: dict[str, str]


def refusal_setup(reg: Registry, seeded: Champion, reason: str) -> tuple[int, str, int | None]:
    """(candidate version, gate, expected_revision) that must be refused with `reason`."""
    if reason == "GATE_NOT_RECORDED":
        return reg.version(seed=10).version, GATE, None
    if reason == "GATE_FAILED":
        return seeded.a, GATE, None
    if reason == "NOT_BETTER_THAN_INCUMBENT":
        return seeded.flat, GATE, None
    if reason == "INCUMBENT_NOT_SCORED":
        reg.gate("mmlu-v2", threshold=0.5)
        reg.score(seeded.b, 0.9, gate_id="mmlu-v2")
        return seeded.b, "mmlu-v2", None
    assert reason == "STALE_REVISION"
    return seeded.b, GATE, 7


@pytest.mark.parametrize(
    ("reason", "code", "metadata"),
    [
        ("GATE_NOT_RECORDED", grpc.StatusCode.FAILED_PRECONDITION, {"incumbentScore": "0.61", "threshold": "0.6"}),
        ("GATE_FAILED", grpc.StatusCode.FAILED_PRECONDITION, {"candidateScore": "0.58", "threshold": "0.6"}),
        (
            "NOT_BETTER_THAN_INCUMBENT",
            grpc.StatusCode.FAILED_PRECONDITION,
            {"candidateScore": "0.61", "incumbentScore": "0.61"},
        ),
        ("INCUMBENT_NOT_SCORED", grpc.StatusCode.FAILED_PRECONDITION, {"candidateScore": "0.9", "threshold": "0.5"}),
        ("STALE_REVISION", grpc.StatusCode.ABORTED, {"revision": "1"}),
    ],
)
def test_each_refusal_leaves_the_alias_and_is_recorded(
    reg: Registry, seeded: Champion, reason: str, code: grpc.StatusCode, metadata: dict[str, str]
) -> None:
    candidate, gate_id, expected = refusal_setup(reg, seeded, reason)
    before = reg.serving()
    history_before = reg.history()
    r = refusal(lambda: reg.set_alias(candidate, gate_id=gate_id, expected_revision=expected))
    assert (r.code, r.reason, r.domain) == (code, reason, "runledger")
    assert r.metadata["incumbentVersion"] == str(seeded.champion)
    assert r.metadata["candidateVersion"] == str(candidate)
    for k, v in metadata.items():
        assert r.metadata[k] == v, (k, r.metadata)
    assert reg.serving() == before  # nothing moved: same version, same revision
    history = reg.history()
    assert history[: len(history_before)] == history_before
    [entry] = history[len(history_before) :]
    assert entry.action == registry_pb2.ALIAS_ACTION_REFUSED and entry.reason == reason
    assert (entry.from_version, entry.to_version, entry.revision) == (seeded.champion, candidate, 1)
    assert entry.gate_id == gate_id and entry.actor == "release-bot"
    if "candidateScore" in metadata:
        assert entry.candidate_score == float(metadata["candidateScore"])


def test_unknown_version_or_gate_is_not_found_and_not_recorded(reg: Registry, seeded: Champion) -> None:
    before = reg.history()
    r = refusal(lambda: reg.set_alias(99))
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "version"
    r = refusal(lambda: reg.set_alias(seeded.b, gate_id="no-such-gate"))
    assert r.code == grpc.StatusCode.NOT_FOUND and "no-such-gate" in r.message and r.metadata["field"] == "gate_id"
    assert reg.history() == before


def test_evaluate_promotion_decides_without_writing(reg: Registry, seeded: Champion) -> None:
    before, history = reg.serving(), reg.history()
    for version, promoted, reason in [(seeded.b, True, "PROMOTED"), (seeded.flat, False, "NOT_BETTER_THAN_INCUMBENT")]:
        d = reg.stub.EvaluatePromotion(
            pb.EvaluatePromotionRequest(model=MODEL, alias="production", version=version, gate_id=GATE)
        ).decision
        assert (d.promoted, d.reason, d.incumbent_version, d.incumbent_score) == (
            promoted,
            reason,
            seeded.champion,
            0.61,
        )
        assert d.direction == common_pb2.DIRECTION_MAXIMIZE and d.threshold == 0.60
    d = reg.stub.EvaluatePromotion(
        pb.EvaluatePromotionRequest(model=MODEL, alias="staging", version=seeded.b, gate_id=GATE, expected_revision=0)
    ).decision
    assert d.promoted and d.incumbent_version == 0
    assert reg.serving() == before and reg.history() == history
    r = refusal(lambda: reg.history("staging"))  # nothing was written for it: no alias, no history
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "alias")


def test_compare_and_swap(reg: Registry, seeded: Champion) -> None:
    r = refusal(lambda: reg.set_alias(seeded.b, expected_revision=0))  # 0: must not exist, but it does
    assert r.code == grpc.StatusCode.ABORTED and r.reason == "STALE_REVISION"
    moved = reg.set_alias(seeded.b, expected_revision=1)
    assert moved.alias.revision == 2
    first = reg.set_alias(seeded.champion, alias="canary", expected_revision=0)
    assert first.alias.revision == 1


def _three_promotions(reg: Registry) -> list[int]:
    """Versions scored 0.7, 0.8 and 0.9, each promoted to production in turn (revisions 1, 2, 3)."""
    reg.model()
    reg.gate()
    v = [reg.version(seed=s).version for s in range(3)]
    for version, score in zip(v, (0.7, 0.8, 0.9), strict=True):
        reg.score(version, score)
        reg.set_alias(version)
    return v


def test_rollback_walks_back_through_promotions(reg: Registry) -> None:
    v = _three_promotions(reg)
    assert reg.state() == (v[2], 3)
    back = reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"), metadata=ACTOR).alias
    assert (back.version, back.revision, back.gate_id) == (v[1], 4, GATE)
    assert reg.serving().model_version.version == v[1]
    back = reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production")).alias
    assert (back.version, back.revision) == (v[0], 5)  # a rollback of a rollback goes further back
    r = refusal(lambda: reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production")))
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "NO_PREVIOUS_VERSION"
    assert reg.state() == (v[0], 5)
    rolled = [e for e in reg.history() if e.action == registry_pb2.ALIAS_ACTION_ROLLED_BACK]
    assert [(e.from_version, e.to_version, e.revision, e.reason) for e in rolled] == [
        (v[2], v[1], 4, "ROLLED_BACK"),
        (v[1], v[0], 5, "ROLLED_BACK"),
    ]
    assert rolled[0].actor == "release-bot" and rolled[1].actor == "anonymous"
    # The audit trail keeps both versions' gate scores: the restored one's, and the one it replaced.
    assert [(e.candidate_score, e.incumbent_score, e.gate_id) for e in rolled] == [(0.8, 0.9, GATE), (0.7, 0.8, GATE)]
    # After a rollback the champion is v0 at 0.7: v1 (0.8) beats it again on the gate.
    assert reg.set_alias(v[1]).alias.revision == 6
    r = refusal(lambda: reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="never-set")))
    assert r.code == grpc.StatusCode.NOT_FOUND


def test_delete_alias(reg: Registry, seeded: Champion) -> None:
    req = pb.DeleteAliasRequest(model=MODEL, alias="production", expected_revision=5)
    r = refusal(lambda: reg.stub.DeleteAlias(req))
    assert r.code == grpc.StatusCode.ABORTED and r.reason == "STALE_REVISION"
    assert reg.serving().alias.revision == 1
    reg.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production", expected_revision=1), metadata=ACTOR)
    r = refusal(lambda: reg.serving())
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "alias"
    r = refusal(lambda: reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}@production")))
    assert r.code == grpc.StatusCode.NOT_FOUND
    assert reg.state() == (0, 2)
    r = refusal(lambda: reg.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production")))
    assert r.code == grpc.StatusCode.NOT_FOUND
    last = reg.history()[-1]
    assert (last.action, last.from_version, last.to_version, last.revision, last.actor) == (
        registry_pb2.ALIAS_ACTION_DELETED,
        seeded.champion,
        0,
        2,
        "release-bot",
    )
    # A deleted alias points nowhere: expected_revision 0 matches, and there is no incumbent to beat.
    again = reg.set_alias(seeded.flat, expected_revision=0)
    assert (again.alias.version, again.alias.revision) == (seeded.flat, 3)
    # Before this promotion the alias pointed nowhere: rolling back to "nothing" is DeleteAlias's job.
    r = refusal(lambda: reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production")))
    assert r.code == grpc.StatusCode.FAILED_PRECONDITION and r.reason == "NO_PREVIOUS_VERSION"


def test_rollback_with_the_revision_last_seen_undoes_one_change_only(reg: Registry) -> None:
    """Two operators press rollback after a bad release, both having seen revision 3: the first goes back one
    version, the second is ABORTED STALE_REVISION instead of going back another."""
    v = _three_promotions(reg)
    seen = reg.state()[1]
    first = pb.RollbackAliasRequest(model=MODEL, alias="production", expected_revision=seen)
    assert reg.stub.RollbackAlias(first).alias.version == v[1]
    r = refusal(lambda: reg.stub.RollbackAlias(first))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.ABORTED, "STALE_REVISION", "expected_revision")
    assert r.metadata["revision"] == str(seen + 1)
    assert reg.state() == (v[1], seen + 1)  # nothing moved
    r = refusal(
        lambda: reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production", expected_revision=-1))
    )
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "expected_revision")


def test_rollback_restores_a_deleted_alias(reg: Registry, seeded: Champion) -> None:
    reg.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production"))
    back = reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production")).alias
    assert (back.version, back.revision, back.gate_id) == (seeded.champion, 3, GATE)
    assert reg.serving().model_version.version == seeded.champion


def test_history_pages_oldest_first(reg: Registry, seeded: Champion) -> None:
    for _ in range(4):
        refusal(lambda: reg.set_alias(seeded.flat))
    seen, token = [], ""
    while True:
        page = reg.stub.ListAliasHistory(
            pb.ListAliasHistoryRequest(model=MODEL, alias="production", page_size=2, page_token=token)
        )
        seen += [e.sequence for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert seen == [1, 2, 3, 4, 5]
    r = refusal(
        lambda: reg.stub.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL, alias="canary", page_token="x!"))
    )
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT
    # An alias nothing was ever decided about (a misspelling) is NOT_FOUND, not an empty history.
    r = refusal(lambda: reg.stub.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL, alias="prodution")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "alias")


@pytest.mark.parametrize("value", [1 << 70, True])
def test_a_forged_page_cursor_is_a_malformed_token_not_an_internal_error(
    reg: Registry, seeded: Champion, value: object
) -> None:
    """Page tokens are opaque but not signed: a hand-made one whose cursor no database takes (an integer beyond
    int64, JSON true) is INVALID_ARGUMENT page_token, like any other malformed token."""
    versions = paging.encode([value], {"list": "versions", "model": MODEL})
    r = refusal(lambda: reg.stub.ListModelVersions(pb.ListModelVersionsRequest(model=MODEL, page_token=versions)))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    history = paging.encode([value], {"list": "alias_history", "model": MODEL, "alias": "production"})
    r = refusal(
        lambda: reg.stub.ListAliasHistory(
            pb.ListAliasHistoryRequest(model=MODEL, alias="production", page_token=history)
        )
    )
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")


def test_versions_list_the_aliases_pointing_at_them(reg: Registry, seeded: Champion) -> None:
    reg.set_alias(seeded.champion, alias="canary")
    v = reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}/versions/{seeded.champion}"))
    assert list(v.aliases) == ["canary", "production"]
    reg.set_alias(seeded.b)
    listed = {
        mv.version: list(mv.aliases)
        for mv in reg.stub.ListModelVersions(pb.ListModelVersionsRequest(model=MODEL)).model_versions
    }
    assert listed[seeded.champion] == ["canary"] and listed[seeded.b] == ["production"] and listed[seeded.a] == []


def test_every_call_lists_a_versions_aliases_in_one_order_under_any_collation(
    postgres_url: str, tmp_path: Path
) -> None:
    """On a database whose collation ignores case first (ICU en-US sorts `ab` before `B`), the version read by name,
    listed, and served by alias names its aliases in the same (code point) order."""
    from runledger_server.config import Settings
    from tests.integration.test_postgres_tracking import _database

    with (
        _database(postgres_url, "C", icu_locale="en-US") as url,
        EmbeddedServer(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", db_url=url)) as srv,
        grpc.insecure_channel(srv.address) as ch,
    ):
        reg = Registry(ch)
        reg.model()
        reg.gate()
        v = reg.version().version
        reg.score(v, 0.9)
        for alias in ("ab", "B", "production"):
            reg.set_alias(v, alias=alias)
        expected = ["B", "ab", "production"]  # code point order: uppercase first
        by_name = reg.stub.GetModelVersion(pb.GetModelVersionRequest(name=f"models/{MODEL}/versions/{v}"))
        listed = reg.stub.ListModelVersions(pb.ListModelVersionsRequest(model=f"models/{MODEL}")).model_versions
        served = reg.serving("ab").model_version
        assert list(by_name.aliases) == list(listed[0].aliases) == list(served.aliases) == expected


# ---- lineage ---------------------------------------------------------------------------------
def test_verify_lineage(reg: Registry, seeded: Champion) -> None:
    def verify(**fields: Any) -> pb.VerifyLineageResponse:
        return reg.stub.VerifyLineage(
            pb.VerifyLineageRequest(model=MODEL, version=seeded.champion, lineage=lineage(**fields))
        )

    same = verify(**{**LINEAGE, "config": '{"lora_r":16,"lr":2e-5}'})
    assert same.match and same.expected_fingerprint == same.actual_fingerprint == EXAMPLE_FINGERPRINT
    assert list(same.drifted_fields) == []
    drifted = verify(**{**LINEAGE, "seed": 1, "code_commit": "deadbee"})
    assert not drifted.match and list(drifted.drifted_fields) == ["code_commit", "seed"]
    assert drifted.actual_fingerprint not in ("", EXAMPLE_FINGERPRINT)
    partial = verify(**{k: v for k, v in LINEAGE.items() if k != "base_model"})
    assert not partial.match and partial.actual_fingerprint == "" and list(partial.drifted_fields) == ["base_model"]
    r = refusal(lambda: verify(**{**LINEAGE, "config": "not json"}))
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.metadata["field"] == "lineage.config"
    r = refusal(lambda: reg.stub.VerifyLineage(pb.VerifyLineageRequest(model=MODEL, version=seeded.champion)))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "lineage")


# ---- watch -----------------------------------------------------------------------------------
class Watcher:
    """Reads a WatchAlias stream on its own thread into a queue; `next()` waits with a deadline."""

    def __init__(self, address: str, alias: str = "production") -> None:
        self.channel = grpc.insecure_channel(address)
        stub = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.call = stub.WatchAlias(pb.WatchAliasRequest(model=f"models/{MODEL}", alias=alias))
        self.messages: queue.Queue[pb.WatchAliasResponse | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.messages.put(msg)
        except BaseException as exc:
            self.messages.put(exc)

    def next(self, timeout: float = 10.0) -> pb.WatchAliasResponse:
        item = self.messages.get(timeout=timeout)
        assert isinstance(item, pb.WatchAliasResponse), item
        return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


@pytest.fixture
def watcher(reg: Registry, server: EmbeddedServer) -> Iterator[Watcher]:
    reg.model()
    reg.gate()
    w = Watcher(server.address)
    yield w
    w.close()


def test_watch_streams_the_current_state_then_every_change(
    reg: Registry, server: EmbeddedServer, watcher: Watcher
) -> None:
    first = watcher.next()
    assert (first.alias.version, first.alias.revision) == (0, 0) and not first.HasField("model_version")
    v = [reg.version(seed=s).version for s in range(2)]
    reg.score(v[0], 0.7)
    reg.score(v[1], 0.8)
    reg.set_alias(v[0])  # from another channel than the watcher's
    msg = watcher.next()
    assert (msg.alias.version, msg.alias.revision) == (v[0], 1) and msg.model_version.version == v[0]
    refusal(lambda: reg.set_alias(v[0]))  # a refusal changes nothing: no message
    reg.set_alias(v[1])
    msg = watcher.next()
    assert (msg.alias.version, msg.alias.revision) == (v[1], 2)
    assert msg.model_version.lineage.seed == 1 and len(msg.model_version.lineage_fingerprint) == 64
    reg.stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"))
    assert watcher.next().alias.version == v[0]
    reg.stub.DeleteAlias(pb.DeleteAliasRequest(model=MODEL, alias="production"))
    gone = watcher.next()
    assert (gone.alias.version, gone.alias.revision) == (0, 4) and not gone.HasField("model_version")
    assert watcher.messages.empty()
    # A client that reconnects gets the current state first.
    again = Watcher(server.address)
    try:
        assert again.next().alias.revision == 4
    finally:
        again.close()


def test_watch_of_an_unknown_model_is_not_found(server: EmbeddedServer) -> None:
    w = Watcher(server.address)
    try:
        item = w.messages.get(timeout=10)
        assert isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.NOT_FOUND
    finally:
        w.close()


# ---- the Python client's Registry helper -----------------------------------------------------
def test_client_registry_helper(reg: Registry, channel: grpc.Channel) -> None:
    from runledger import errors
    from runledger.registry import PromotionRefused, Registry as ClientRegistry, StaleRevision

    client = ClientRegistry(channel, metadata=(("x-runledger-actor", "release-bot"),))
    runs = [reg.run(seed=s) for s in range(4)]
    for run_id in runs:
        reg.upload(run_id, "adapter/adapter_model.safetensors", run_id.encode())
    versions = [client.register(r, model=MODEL, artifact_path="adapter/").version for r in runs]
    assert versions == [1, 2, 3, 4]
    client.create_gate(MODEL, GATE, suite_fingerprint=SUITE, metric="mmlu", threshold=0.6, direction="max")
    for v, score in zip(versions, (0.61, 0.61, 0.5, 0.7), strict=True):
        client.record_gate_result(MODEL, GATE, v, score)
    assert client.set_alias(MODEL, "production", 1, gate=GATE, expected_revision=0).alias.revision == 1
    with pytest.raises(PromotionRefused) as tie:
        client.set_alias(MODEL, "production", 2, gate=GATE)
    assert tie.value.reason == "NOT_BETTER_THAN_INCUMBENT"
    assert (tie.value.candidate_score, tie.value.incumbent_score, tie.value.incumbent_version) == (0.61, 0.61, 1)
    with pytest.raises(PromotionRefused) as failed:
        client.set_alias(MODEL, "production", 3, gate=GATE)
    assert failed.value.reason == "GATE_FAILED" and failed.value.threshold == 0.6
    assert isinstance(failed.value, errors.FailedPrecondition)
    with pytest.raises(StaleRevision) as stale:  # version 4 would be promoted, but on a state that is gone
        client.set_alias(MODEL, "production", 4, gate=GATE, expected_revision=0)
    assert stale.value.revision == 1 and isinstance(stale.value, errors.Aborted)
    assert client.evaluate_promotion(MODEL, "production", 2, gate=GATE).reason == "NOT_BETTER_THAN_INCUMBENT"
    assert client.resolve(f"{MODEL}@production").version == 1
    assert client.lookup(MODEL, "production").alias.revision == 1
    history = list(client.alias_history(MODEL, "production", page_size=1))
    assert [e.reason for e in history] == ["PROMOTED", "NOT_BETTER_THAN_INCUMBENT", "GATE_FAILED", "STALE_REVISION"]
    assert {e.actor for e in history} == {"release-bot"}
    verified = client.verify_lineage(MODEL, 1, {**LINEAGE, "seed": 0})
    assert verified.match
    with client.watch_alias(MODEL, "production") as watch:
        first = next(iter(watch))
        assert (first.alias.version, first.alias.revision) == (1, 1)
    with pytest.raises(errors.FailedPrecondition) as no_prev:
        client.rollback(MODEL, "production")
    assert no_prev.value.reason == "NO_PREVIOUS_VERSION" and not isinstance(no_prev.value, PromotionRefused)
    client.delete_alias(MODEL, "production", expected_revision=1)
    with pytest.raises(errors.NotFound):
        client.resolve(f"{MODEL}@production")
    broken = reg.run(data_version="v1", code_commit="abc")
    reg.upload(broken, "model.bin", b"x")
    with pytest.raises(errors.FailedPrecondition) as lineage_error:
        client.register(broken, model=MODEL, artifact_path="model.bin")
    assert lineage_error.value.metadata["missingFields"] == "config,base_model,seed"


def test_alias_revisions_of_many_watched_aliases_in_one_call(tmp_path: Any) -> None:
    from runledger_server.backends.sql import migrate
    from runledger_server.backends.sql.database import Database
    from runledger_server.backends.sql.registry_store import SqlRegistryStore
    from runledger_server.backends.sql.tracking_store import SqlTrackingStore
    from runledger_server.domain.gates import GateSpec
    from runledger_server.domain.lineage import Lineage
    from runledger_server.domain.sweeps import Direction
    from runledger_server.store.registry_entities import ArtifactRef

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        migrate.upgrade(db)
        tracking, store = SqlTrackingStore(db), SqlRegistryStore(db)
        experiment = tracking.create_experiment("e", "", {})
        full = Lineage("v1", "abc", "{}", "base", 0)
        tracking.create_run("r1", experiment.experiment_id, "", {}, {}, full, None)
        store.create_model("m", "", {})
        store.create_version("m", "r1", ArtifactRef("p", "0" * 64, 1, "u"), full, full.fingerprint() or "", "")
        store.create_gate("m", GateSpec("g", "s", "x", Direction.MAXIMIZE, 0.0))
        store.record_gate_result("m", "g", 1, 1.0, "a")
        store.set_alias("m", "a600", 1, "g", None, "a")
        keys = [("m", f"a{i}") for i in range(1200)]
        assert store.alias_revisions(keys) == {("m", "a600"): 1}
    finally:
        db.dispose()


def test_many_watchers_share_the_event_loop(reg: Registry, server: EmbeddedServer) -> None:
    reg.model()
    reg.gate()
    v = reg.version().version
    reg.score(v, 0.9)
    threads_before = threading.active_count()
    with grpc.insecure_channel(server.address) as ch:
        stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
        calls = [stub.WatchAlias(pb.WatchAliasRequest(model=MODEL, alias="production")) for _ in range(200)]
        try:
            assert {next(c).alias.revision for c in calls} == {0}
            # 200 open streams, no thread each: only the server's fixed worker pool may have grown.
            assert threading.active_count() - threads_before <= 20
            reg.set_alias(v)
            assert {(m.alias.version, m.alias.revision) for m in (next(c) for c in calls)} == {(v, 1)}
        finally:
            for c in calls:
                c.cancel()
