"""The serving path's caches are bounded in bytes, not only in entries: versions may hold megabytes of lineage
config each, and the last answer per alias (kept as a version, an answer and two messages) held every one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from runledger.v1 import (
    artifact_service_pb2 as apb,
    artifact_service_pb2_grpc,
    common_pb2,
    registry_service_pb2 as rpb,
    registry_service_pb2_grpc,
    tracking_service_pb2 as tpb,
    tracking_service_pb2_grpc,
)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_lookups_of_versions_with_large_configs_keep_the_server_memory_bounded(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runledger_server", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("runledger listening on "), line
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        with grpc.insecure_channel(line.split()[-1], options=options) as ch:
            tracking = tracking_service_pb2_grpc.TrackingServiceStub(ch)
            artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
            registry = registry_service_pb2_grpc.RegistryServiceStub(ch)
            exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name="big-configs")).name
            registry.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(model_id="m"))
            registry.CreateGate(
                rpb.CreateGateRequest(
                    model="m",
                    gate_id="g",
                    suite_fingerprint="s@1",
                    metric="acc",
                    direction=common_pb2.DIRECTION_MAXIMIZE,
                    threshold=0.0,
                )
            )
            aliases = 24
            for i in range(aliases):  # each version's config: 3 MiB of JSON
                config = json.dumps({"layers": f"{i:04d}" + "x" * (3 << 20)})
                lineage = common_pb2.Lineage(data_version="d", code_commit="c", config=config, base_model="b", seed=i)
                run_id = tracking.CreateRun(tpb.CreateRunRequest(experiment=exp, lineage=lineage)).run_id
                data = f"weights {i}".encode()
                header = apb.UploadArtifactHeader(
                    run_id=run_id, path="w.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
                artifacts.UploadArtifact(
                    iter([apb.UploadArtifactRequest(header=header), apb.UploadArtifactRequest(chunk=data)])
                )
                v = registry.CreateModelVersion(
                    rpb.CreateModelVersionRequest(model="m", run_id=run_id, artifact_path="w.bin")
                ).version
                registry.RecordGateResult(rpb.RecordGateResultRequest(model="m", gate_id="g", version=v, score=1.0))
                registry.SetAlias(rpb.SetAliasRequest(model="m", alias=f"a{i}", version=v, gate_id="g"))
            before = _rss_mib(proc.pid)
            for _ in range(2):
                for i in range(aliases):  # the serving lookup, and the same by version name
                    got = registry.GetModelVersionByAlias(rpb.GetModelVersionByAliasRequest(model="m", alias=f"a{i}"))
                    assert got.model_version.lineage.seed == i and len(got.model_version.lineage.config) > 3 << 20
                    named = registry.GetModelVersion(rpb.GetModelVersionRequest(name=f"models/m@a{i}"))
                    assert named.lineage.seed == i
            grown = _rss_mib(proc.pid) - before
        # 24 configs of 3 MiB are 72 MiB once; kept as they were, the caches held three copies (over 200 MiB).
        assert grown < 72, f"the server grew by {grown:.0f} MiB serving {aliases} versions"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
