"""The client's artifact calls carry its call metadata (auth headers, the actor) like every other call, and its
listing retries while the server is briefly unavailable: seen by a loopback gRPC server that records each call."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import runledger
from runledger.v1 import artifact_pb2, artifact_service_pb2 as pb

SERVICE = "runledger.v1.ArtifactService"
DATA = b"adapter weights"
DIGEST = hashlib.sha256(DATA).hexdigest()


class Recorder(grpc.GenericRpcHandler):
    """Answers the artifact calls of one file, `ckpt.bin`, and records what metadata each call carried."""

    def __init__(self, unavailable_first: int = 0) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.unavailable = unavailable_first
        self.lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.seen.append((method, {m.key: m.value for m in context.invocation_metadata()}))
            if method == "ListArtifacts" and self.unavailable:
                self.unavailable -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")

    def _artifact(self) -> artifact_pb2.Artifact:
        return artifact_pb2.Artifact(run_id="r1", path="ckpt.bin", sha256=DIGEST, size=len(DATA))

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]

        def list_artifacts(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._record(method, context)
            return pb.ListArtifactsResponse(artifacts=[self._artifact()]).SerializeToString()

        def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            self._record(method, context)
            for _ in requests:
                pass
            return self._artifact().SerializeToString()

        def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self._record(method, context)
            yield pb.DownloadArtifactResponse(artifact=self._artifact()).SerializeToString()
            yield pb.DownloadArtifactResponse(chunk=DATA).SerializeToString()

        handlers: dict[str, Any] = {
            "ListArtifacts": grpc.unary_unary_rpc_method_handler(list_artifacts),
            "UploadArtifact": grpc.stream_unary_rpc_method_handler(upload),
            "DownloadArtifact": grpc.unary_stream_rpc_method_handler(download),
        }
        return handlers.get(method) if details.method.startswith(f"/{SERVICE}/") else None


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    handler = Recorder(unavailable_first=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_artifact_calls_carry_the_clients_metadata_and_listing_retries(
    recorder: tuple[Recorder, str], tmp_path: Path
) -> None:
    handler, address = recorder
    auth = [("authorization", "Bearer t0ken"), ("x-runledger-actor", "release-bot")]
    retry = runledger.RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
    with runledger.Client(address, metadata=auth, retry=retry) as client:
        assert [a.path for a in client.list_artifacts("r1")] == ["ckpt.bin"]  # after two UNAVAILABLE answers
        local = tmp_path / "ckpt.bin"
        local.write_bytes(DATA)
        client.log_artifact("r1", local)
        out = client.download_artifacts("r1", "ckpt.bin", tmp_path / "out.bin")
        assert out.read_bytes() == DATA
    methods = [m for m, _ in handler.seen]
    assert methods.count("ListArtifacts") == 4 and {"UploadArtifact", "DownloadArtifact"} <= set(methods)
    for method, metadata in handler.seen:
        assert metadata.get("authorization") == "Bearer t0ken", method
        assert metadata.get("x-runledger-actor") == "release-bot", method
