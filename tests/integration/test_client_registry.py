"""The Python client end to end: log an adapter directory, register it, gate it, promote, resolve, watch."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from runledger import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PromotionRefused,
    StaleRevision,
    Unavailable,
)
from runledger_server.embedded import EmbeddedServer

SUITE = "mmlu-pro@9f3c2e1"


def _lineage(seed: int) -> dict[str, object]:
    return {
        "data_version": "sft-mix-v3",
        "code_commit": "a1b2c3d",
        "config": {"lr": 2e-5, "lora_r": 16},
        "base_model": "Qwen/Qwen3-8B",
        "seed": seed,
    }


def _adapter(root: Path, tag: str) -> Path:
    d = root / f"adapter-{tag}"
    (d / "nested").mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 16, "tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(tag.encode() * 70_000)
    (d / "nested" / "tokenizer.json").write_text("{}")
    return d


def test_register_gate_promote_resolve_watch(server: EmbeddedServer, tmp_path: Path) -> None:
    with Client(server.address) as client:
        versions = {}
        for i, tag in enumerate(["a", "b", "c"]):
            with client.start_run(experiment="sft", name=f"run-{tag}", lineage=_lineage(i)) as run:
                run.log_metrics({"train/loss": 1.0 / (i + 1)}, step=0)
                uploaded = run.log_artifact(_adapter(tmp_path, tag), "adapter")
                assert sorted(a.path for a in uploaded) == [
                    "adapter/adapter_config.json",
                    "adapter/adapter_model.safetensors",
                    "adapter/nested/tokenizer.json",
                ]
            versions[tag] = client.register(run, model="qwen3-8b-sft", artifact_path="adapter")
        assert [v.version for v in versions.values()] == [1, 2, 3]
        assert versions["a"].lineage_fingerprint and versions["a"].artifact_sha256

        client.create_gate("qwen3-8b-sft", "mmlu-gate", suite_fingerprint=SUITE, metric="accuracy", threshold=0.6)
        for tag, score in (("a", 0.61), ("b", 0.66), ("c", 0.66)):
            client.record_gate_result("qwen3-8b-sft", "mmlu-gate", versions[tag].version, score)

        watch = client.watch_alias("qwen3-8b-sft", "production")
        seen: list[int] = []
        got_two = threading.Event()

        def follow() -> None:
            for event in watch:
                seen.append(event.alias.version)
                if len(seen) == 3:
                    got_two.set()
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        client.set_alias("qwen3-8b-sft", "production", 1, gate="mmlu-gate")
        promoted = client.set_alias("qwen3-8b-sft", "production", 2, gate="mmlu-gate", expected_revision=1)
        assert promoted.alias.revision == 2 and promoted.decision.promoted
        with pytest.raises(PromotionRefused) as refused:
            client.set_alias("qwen3-8b-sft", "production", 3, gate="mmlu-gate")
        assert refused.value.reason == "NOT_BETTER_THAN_INCUMBENT"
        assert refused.value.candidate_score == 0.66 and refused.value.incumbent_score == 0.66
        assert isinstance(refused.value, FailedPrecondition)
        assert got_two.wait(30), seen
        follower.join(30)
        assert seen == [0, 1, 2]  # unset at first, then each promotion
        assert watch.closed  # leaving the loop ended the stream; no close() needed

        resolved = client.resolve("qwen3-8b-sft@production")
        assert resolved.version == 2 and resolved.artifact_sha256 == versions["b"].artifact_sha256
        history = list(client.alias_history("qwen3-8b-sft", "production"))
        assert [e.reason for e in history] == ["PROMOTED", "PROMOTED", "NOT_BETTER_THAN_INCUMBENT"]
        with pytest.raises(StaleRevision):  # someone has moved it since revision 1
            client.rollback_alias("qwen3-8b-sft", "production", expected_revision=1)
        assert client.rollback_alias("qwen3-8b-sft", "production", expected_revision=2).version == 1

        dest = client.download_artifacts(resolved.run_id, "adapter", tmp_path / "served")
        assert (dest / "adapter_model.safetensors").read_bytes() == b"b" * 70_000
        assert (dest / "nested" / "tokenizer.json").read_text() == "{}"


def test_register_refuses_broken_lineage_naming_the_fields(server: EmbeddedServer, tmp_path: Path) -> None:
    with Client(server.address) as client:
        lineage = _lineage(0)
        del lineage["config"], lineage["seed"]
        with client.start_run(experiment="sft", lineage=lineage) as run:
            run.log_artifact(_adapter(tmp_path, "x"), "adapter")
        with pytest.raises(FailedPrecondition) as info:
            client.register(run, model="broken", artifact_path="adapter")
        assert info.value.reason == "BROKEN_LINEAGE"
        assert "config" in info.value.message and "seed" in info.value.message
        assert [m.name for m in client.registry.list_models()] == []  # no model created for a refused version


def test_register_creates_a_missing_model_only_when_asked_and_names_what_is_missing(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    with Client(server.address) as client:
        with client.start_run(experiment="sft", lineage=_lineage(0)) as run:
            run.log_artifact(_adapter(tmp_path, "x"), "adapter")
        with pytest.raises(NotFound) as missing_model:
            client.register(run, model="absent", artifact_path="adapter", create_model=False)
        assert missing_model.value.metadata["field"] == "model"
        assert [m.name for m in client.registry.list_models()] == []  # not created
        first = client.register(run, model="made", artifact_path="adapter")  # created on the way
        again = client.register(run, model="made", artifact_path="adapter")  # exists: registered at once
        assert (first.version, again.version) == (1, 2)
        with pytest.raises(NotFound) as missing_run:
            client.register("0" * 32, model="made", artifact_path="adapter")
        assert missing_run.value.metadata["field"] == "run_id"  # not taken for a missing model
        assert [m.name for m in client.registry.list_models()] == ["models/made"]


def test_bad_arguments_and_a_closed_client_are_typed_errors(server: EmbeddedServer) -> None:
    """Every method raises RunledgerError subclasses: a threshold that is no number, a reference that is no
    string, and a Registry kept past its client's close() (was ValueError or AttributeError)."""
    client = Client(server.address)
    registry = client.registry
    for model_id in ("zeta", "alpha", "mid"):
        registry.create_model(model_id)
    assert [m.name for m in registry.list_models(page_size=2)] == ["models/alpha", "models/mid", "models/zeta"]
    with pytest.raises(InvalidArgument) as bad_threshold:
        client.create_gate("alpha", "g", suite_fingerprint=SUITE, metric="mmlu", threshold="high")  # type: ignore[arg-type]
    assert bad_threshold.value.metadata["field"] == "threshold"
    for ref in (None, 5, "", "   "):
        with pytest.raises(InvalidArgument) as bad_ref:
            client.resolve(ref)  # type: ignore[arg-type]
        assert bad_ref.value.metadata["field"] == "name"
    client.timeout = 3.0
    assert client.registry.timeout == 3.0  # the client's timeout as it is now
    client.close()
    with pytest.raises(FailedPrecondition) as closed:
        registry.get_model("alpha")
    assert closed.value.reason == "CLIENT_CLOSED"


def test_calls_to_a_server_that_never_answers_are_unavailable_after_the_timeout() -> None:
    """Calls wait up to the client's timeout for the server (a write is sent only once it is reachable); when it
    never is, reads and writes alike are Unavailable, not DeadlineExceeded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    with Client(f"127.0.0.1:{port}", timeout=1.0) as client:
        for call in (lambda: client.registry.create_model("m"), lambda: client.resolve("m@production")):
            started = time.monotonic()
            with pytest.raises(Unavailable) as err:
                call()
            assert err.value.reason == "SERVER_UNREACHABLE" and 0.9 <= time.monotonic() - started < 10


def test_a_version_downloads_exactly_what_was_registered(server: EmbeddedServer, tmp_path: Path) -> None:
    """A version pins its bytes by content address: files added to the run's directory after registration,
    which a download of the run's path includes, are not part of the version."""
    with Client(server.address) as client:
        with client.start_run(experiment="pinned", name="dir", lineage=_lineage(0)) as run:
            adapter = _adapter(tmp_path, "a")
            run.log_artifact(adapter, "adapter")
            run.log_artifact(adapter / "adapter_config.json", "config.json")
        directory = client.register(run, model="pinned", artifact_path="adapter")
        single = client.register(run, model="pinned", artifact_path="config.json")
        late = tmp_path / "late.py"
        late.write_text("print('added after registration')")
        run.log_artifact(late, "adapter/late.py")  # the run's directory grows; the version must not

        by_run = client.download_artifacts(run.run_id, "adapter", tmp_path / "by-run")
        assert (by_run / "late.py").exists()  # what the run holds now
        got = client.download_model(f"pinned/versions/{directory.version}", tmp_path / "by-version")
        files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
        assert files == ["adapter_config.json", "adapter_model.safetensors", "nested/tokenizer.json"]
        assert (got / "adapter_model.safetensors").read_bytes() == b"a" * 70_000

        client.create_gate("pinned", "g", suite_fingerprint=SUITE, metric="accuracy", threshold=0.0)
        client.record_gate_result("pinned", "g", single.version, 0.5)
        client.set_alias("pinned", "serving", single.version, gate="g")
        (tmp_path / "one").mkdir()
        one = client.download_model("pinned@serving", tmp_path / "one")
        assert one == tmp_path / "one" / "config.json"
        assert json.loads(one.read_text()) == {"r": 16, "tag": "a"}
