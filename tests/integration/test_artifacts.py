"""ArtifactService end to end on both backends (a local directory and S3 through the minio SDK): uploads are
verified and content-addressed, refusals leave nothing behind, downloads resume and verify."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from minio import Minio

import runledger
from runledger import artifacts as client_artifacts
from runledger.errors import DataLoss
from runledger.v1 import artifact_service_pb2 as pb, artifact_service_pb2_grpc, tracking_service_pb2 as tpb
from runledger_server.backends import artifacts as artifact_backends
from runledger_server.backends.sql import migrate
from runledger_server.backends.sql.artifact_index_store import SqlArtifactIndex
from runledger_server.backends.sql.database import Database
from runledger_server.backends.sql.tracking_store import SqlTrackingStore
from runledger_server.config import Settings
from runledger_server.domain import manifest as manifest_rule
from runledger_server.domain.errors import NotFound
from runledger_server.domain.lineage import Lineage
from runledger_server.embedded import EmbeddedServer
from runledger_server.services.artifacts import ArtifactService, canonical_manifest
from runledger_server.transport import artifact_servicer
from tests.fixtures.s3 import S3Server, moto_process
from tests.fixtures.tcp_relay import CuttingRelay
from tests.support import refusal

MiB = 1 << 20
Stub = artifact_service_pb2_grpc.ArtifactServiceStub


# ---- fixtures: the same tests on both backends ------------------------------------------------------
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    base = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data")
    if backend == "local":
        return base
    s3: S3Server = request.getfixturevalue("s3_server")
    return s3.settings(base, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def stored(settings: Settings, backend: str, request: pytest.FixtureRequest) -> Callable[[], int]:
    """How many objects the artifact location holds: blobs, temporary uploads and unfinished multipart uploads."""
    if backend == "local":
        root = Path(settings.artifact_location)
        return lambda: sum(1 for p in root.rglob("*") if p.is_file())
    s3: S3Server = request.getfixturevalue("s3_server")
    client = s3.client()
    prefix = settings.artifacts.removeprefix(f"s3://{s3.bucket}/") + "/"
    return lambda: _count_s3(client, s3, prefix)


def _count_s3(client: Minio, s3: S3Server, prefix: str) -> int:
    objects = sum(1 for _ in client.list_objects(s3.bucket, prefix=prefix, recursive=True))
    unfinished = s3.boto3().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    return objects + len(unfinished)


@pytest.fixture
def run_id(tracking) -> str:  # type: ignore[no-untyped-def]
    return _new_run(tracking)


def _new_run(tracking) -> str:  # type: ignore[no-untyped-def]
    exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name=f"e-{uuid.uuid4().hex[:8]}"))
    return str(tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name)).run_id)


# ---- helpers -----------------------------------------------------------------------------------------
def _requests(
    run_id: str, path: str, data: bytes, *, size: int | None = -1, sha256: str | None = "", chunk: int = MiB
) -> Iterator[pb.UploadArtifactRequest]:
    header = pb.UploadArtifactHeader(run_id=run_id, path=path)
    if size is not None:
        header.size = len(data) if size == -1 else size
    if sha256 is not None:
        header.sha256 = sha256 or hashlib.sha256(data).hexdigest()
    yield pb.UploadArtifactRequest(header=header)
    for i in range(0, len(data), chunk):
        yield pb.UploadArtifactRequest(chunk=data[i : i + chunk])


def _upload(stub: Stub, run_id: str, path: str, data: bytes, **kw: object):  # type: ignore[no-untyped-def]
    return stub.UploadArtifact(_requests(run_id, path, data, **kw))  # type: ignore[arg-type]


def _download(stub: Stub, **kw: object) -> tuple[pb.DownloadArtifactResponse, bytes]:
    messages = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(**kw)))  # type: ignore[arg-type]
    assert messages[0].WhichOneof("payload") == "artifact"
    assert all(m.WhichOneof("payload") == "chunk" and len(m.chunk) <= MiB for m in messages[1:])
    return messages[0].artifact, b"".join(m.chunk for m in messages[1:])


def _paths(stub: Stub, run_id: str, prefix: str = "") -> list[str]:
    return [a.path for a in stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, prefix=prefix)).artifacts]


def _blob(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}:{n}".encode()).digest(n) if n else b""


# ---- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1024, 3 * MiB + 7])
def test_round_trip(artifacts: Stub, run_id: str, backend: str, size: int, stored: Callable[[], int]) -> None:
    data = _blob(size)
    art = _upload(artifacts, run_id, "ckpt/model.bin", data)
    digest = hashlib.sha256(data).hexdigest()
    assert (art.name, art.run_id, art.path) == (f"runs/{run_id}/artifacts/ckpt/model.bin", run_id, "ckpt/model.bin")
    assert (art.sha256, art.size) == (digest, size)
    assert art.uri.startswith("file://" if backend == "local" else "s3://runledger-test/")
    assert art.uri.endswith(f"sha256/{digest[:2]}/{digest[2:4]}/{digest}")
    assert art.create_time.seconds > 0
    got, body = _download(artifacts, run_id=run_id, path="ckpt/model.bin")
    assert got == art and body == data
    assert stored() == 1  # the blob alone: no temporary file or object is left


def test_upload_without_declared_digest_or_size_is_hashed_by_the_server(
    artifacts: Stub, run_id: str, stored: Callable[[], int]
) -> None:
    data = _blob(2 * MiB + 1, seed=1)
    art = _upload(artifacts, run_id, "a.bin", data, size=None, sha256=None)
    assert (art.sha256, art.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert _download(artifacts, run_id=run_id, path="a.bin")[1] == data
    again = _upload(artifacts, run_id, "b.bin", data, size=None, sha256=None)
    assert again.uri == art.uri
    assert stored() == 1  # stored once; the temporary copy of each upload is gone


@pytest.mark.slow
def test_round_trip_64_mib_through_the_client_helpers(
    channel: grpc.Channel, run_id: str, tmp_path: Path, stored: Callable[[], int]
) -> None:
    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(64 * MiB))
    seen: list[tuple[int, int]] = []
    art = client_artifacts.upload_file(
        channel, run_id, src, "final/model.safetensors", progress=lambda d, t: seen.append((d, t))
    )
    assert art.size == 64 * MiB and art.sha256 == client_artifacts.file_digest(src)[1]
    assert seen[-1] == (64 * MiB, 64 * MiB)
    out = client_artifacts.download(channel, run_id, "final/model.safetensors", tmp_path / "out.bin", progress=False)
    assert out == tmp_path / "out.bin" and out.read_bytes() == src.read_bytes()
    assert not (tmp_path / ".out.bin.runledger-part").exists()
    assert stored() == 1


# ---- directories -------------------------------------------------------------------------------------
def _adapter(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 16, "lora_alpha": 32}',
        "adapter_model.safetensors": _blob(300_000, seed=2),
        "tokenizer/tokenizer.json": _blob(5_000, seed=3),
        "tokenizer/special_tokens_map.json": b"{}",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_directory_upload_manifest_and_download(
    channel: grpc.Channel, artifacts: Stub, tracking, run_id: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    files = _adapter(tmp_path / "adapter")
    uploaded = client_artifacts.upload_dir(channel, run_id, tmp_path / "adapter", progress=False)
    assert sorted(a.path for a in uploaded) == sorted(f"adapter/{p}" for p in files)
    client_artifacts.upload_file(channel, run_id, tmp_path / "adapter" / "empty.txt", "adapter_v2/x", progress=False)
    assert _paths(artifacts, run_id, "adapter/") == sorted(f"adapter/{p}" for p in files)

    m = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="adapter/"))
    expected = manifest_rule.build(
        manifest_rule.ManifestEntry(p, hashlib.sha256(d).hexdigest(), len(d)) for p, d in files.items()
    )
    assert (m.run_id, m.path, m.sha256, m.size) == (run_id, "adapter", expected.sha256, expected.size)
    assert [e.path for e in m.entries] == sorted(files)

    # The same files uploaded in another order to another run: the same content address.
    other = _new_run(tracking)
    for rel in reversed(sorted(files)):
        client_artifacts.upload_file(channel, other, tmp_path / "adapter" / rel, f"lora/{rel}", progress=False)
    m2 = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=other, path="lora"))
    assert m2.sha256 == m.sha256

    out = client_artifacts.download(channel, run_id, "adapter", tmp_path / "restored", progress=False)
    assert out == tmp_path / "restored"
    restored = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert restored == files  # and nothing of adapter_v2


def test_manifest_refusals(artifacts: Stub, run_id: str) -> None:
    _upload(artifacts, run_id, "dir/file.bin", b"x")
    r = refusal(
        lambda: artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="dir/file.bin"))
    )
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_A_DIRECTORY", "path")
    r = refusal(lambda: artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="nothing")))
    assert (r.code, r.reason) == (grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_FOUND") and "nothing" in r.message
    root = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path=""))
    assert [e.path for e in root.entries] == ["dir/file.bin"]


def test_a_manifests_digest_downloads_the_manifest(artifacts: Stub, run_id: str) -> None:
    _upload(artifacts, run_id, "adapter/a.bin", b"weights")
    _upload(artifacts, run_id, "adapter/config.json", b"{}")
    m = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="adapter"))
    listed, body = _download(artifacts, sha256=m.sha256)
    assert listed.sha256 == m.sha256 == hashlib.sha256(body).hexdigest()
    entries = manifest_rule.build(manifest_rule.ManifestEntry(e.path, e.sha256, e.size) for e in m.entries)
    assert body == canonical_manifest(entries)
    assert [e.path for e in m.entries] == ["a.bin", "config.json"]


# ---- deduplication and immutability ------------------------------------------------------------------
def test_identical_content_is_stored_once_across_runs(
    artifacts: Stub, tracking, run_id: str, stored: Callable[[], int]
) -> None:  # type: ignore[no-untyped-def]
    data = _blob(9 * MiB + 3, seed=4)  # two multipart parts on S3 (8 MiB parts)
    first = _upload(artifacts, run_id, "ckpt.bin", data)
    assert stored() == 1
    other = _new_run(tracking)
    second = _upload(artifacts, other, "copy/of/ckpt.bin", data)
    assert (second.sha256, second.uri) == (first.sha256, first.uri)
    assert stored() == 1
    assert _download(artifacts, run_id=other, path="copy/of/ckpt.bin")[1] == data


def test_reupload_is_idempotent_and_other_content_is_refused(
    artifacts: Stub, run_id: str, stored: Callable[[], int]
) -> None:
    first = _upload(artifacts, run_id, "weights.bin", b"v1")
    assert _upload(artifacts, run_id, "weights.bin", b"v1") == first  # same record, same create_time
    before = stored()
    r = refusal(lambda: _upload(artifacts, run_id, "weights.bin", b"v2"))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.ALREADY_EXISTS, "ARTIFACT_IMMUTABLE", "path")
    assert "weights.bin" in r.message
    r = refusal(lambda: _upload(artifacts, run_id, "weights.bin", b"v2", sha256=None))  # found only at the end
    assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ARTIFACT_IMMUTABLE")
    assert _download(artifacts, run_id=run_id, path="weights.bin")[1] == b"v1"
    assert stored() == before


def test_a_file_and_a_directory_cannot_share_a_path(artifacts: Stub, run_id: str, stored: Callable[[], int]) -> None:
    _upload(artifacts, run_id, "a/b", b"file")
    before = stored()
    r = refusal(lambda: _upload(artifacts, run_id, "a/b/c", b"below a file"))
    assert (r.code, r.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ARTIFACT_PATH_CONFLICT")
    r = refusal(lambda: _upload(artifacts, run_id, "a", b"over a directory"))
    assert (r.code, r.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ARTIFACT_PATH_CONFLICT")
    assert _paths(artifacts, run_id) == ["a/b"] and stored() == before


# ---- refusals: nothing recorded, nothing stored ------------------------------------------------------
@pytest.mark.parametrize("size", [1024, 9 * MiB])  # a single PUT, and a two-part multipart upload on S3
def test_digest_mismatch_records_nothing_and_leaves_no_object(
    artifacts: Stub, run_id: str, stored: Callable[[], int], size: int
) -> None:
    data = _blob(size, seed=5)
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = refusal(lambda: _upload(artifacts, run_id, "bad.bin", data, sha256=wrong))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.DATA_LOSS, "DIGEST_MISMATCH", "sha256")
    assert r.metadata["expectedSha256"] == wrong and r.metadata["actualSha256"] == hashlib.sha256(data).hexdigest()
    assert _paths(artifacts, run_id) == []
    assert stored() == 0
    r = refusal(lambda: _download(artifacts, sha256=wrong))
    assert r.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("declared", [1023, 1025, 0])
def test_size_mismatch_is_invalid_argument_naming_size(
    artifacts: Stub, run_id: str, stored: Callable[[], int], declared: int
) -> None:
    r = refusal(lambda: _upload(artifacts, run_id, "sized.bin", _blob(1024), size=declared))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "SIZE_MISMATCH", "size")
    assert _paths(artifacts, run_id) == [] and stored() == 0


def test_a_declared_size_beyond_what_the_store_takes_is_invalid_argument(
    artifacts: Stub, run_id: str, stored: Callable[[], int]
) -> None:
    r = refusal(lambda: _upload(artifacts, run_id, "huge.bin", _blob(1024), size=6 << 40))  # 6 TiB; S3's limit is 5
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "size"), r.message
    assert _paths(artifacts, run_id) == [] and stored() == 0


@pytest.mark.parametrize(
    "path",
    [
        "../escape",
        "/abs/path",
        "a//b",
        "a/./b",
        "dir/",
        "a\\b",
        "nul\x00",
        "",
        "x" * 1025,
        "/".join(["\U0001f600" * 63] * 11),  # 703 characters, 2,782 bytes: beyond PostgreSQL's index row limit
    ],
)
def test_bad_paths_are_refused_naming_path(artifacts: Stub, run_id: str, stored: Callable[[], int], path: str) -> None:
    r = refusal(lambda: _upload(artifacts, run_id, path, b"data"))
    assert (r.code, r.reason, r.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARTIFACT_PATH",
        "path",
    )
    assert _paths(artifacts, run_id) == [] and stored() == 0


def test_stream_shape_refusals(artifacts: Stub, run_id: str, stored: Callable[[], int]) -> None:
    r = refusal(lambda: artifacts.UploadArtifact(iter([pb.UploadArtifactRequest(chunk=b"no header")])))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "header")
    r = refusal(lambda: artifacts.UploadArtifact(iter([])))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "header")
    big = _blob(MiB + 1)
    r = refusal(lambda: _upload(artifacts, run_id, "big-chunk.bin", big, chunk=MiB + 1))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "CHUNK_TOO_LARGE", "chunk")
    header = pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(run_id=run_id, path="two-headers"))
    r = refusal(lambda: artifacts.UploadArtifact(iter([header, header])))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "header")
    r = refusal(lambda: _upload(artifacts, run_id, "x", b"x", sha256="not-a-digest"))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "sha256")
    assert _paths(artifacts, run_id) == [] and stored() == 0


def test_unknown_run_is_not_found_naming_run_id(artifacts: Stub, stored: Callable[[], int]) -> None:
    r = refusal(lambda: _upload(artifacts, "feedbeef", "x.bin", b"x"))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "run_id") and "feedbeef" in r.message
    r = refusal(lambda: artifacts.ListArtifacts(pb.ListArtifactsRequest(run_id="feedbeef")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "run_id")
    r = refusal(lambda: _download(artifacts, run_id="feedbeef", path="x.bin"))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "run_id")
    assert stored() == 0


# ---- downloads ---------------------------------------------------------------------------------------
def test_download_from_an_offset_and_by_digest(artifacts: Stub, run_id: str) -> None:
    data = _blob(2 * MiB + 100, seed=6)
    art = _upload(artifacts, run_id, "resume.bin", data)
    for offset in (1, MiB, MiB + 17, len(data) - 1, len(data)):
        got, body = _download(artifacts, run_id=run_id, path="resume.bin", offset=offset)
        assert got == art and body == data[offset:]
    by_digest, body = _download(artifacts, sha256=art.sha256.upper())
    assert (by_digest.sha256, by_digest.size, by_digest.uri, body) == (art.sha256, art.size, art.uri, data)
    r = refusal(lambda: _download(artifacts, run_id=run_id, path="resume.bin", offset=len(data) + 1))
    assert (r.code, r.reason, r.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "OFFSET_OUT_OF_RANGE",
        "offset",
    )
    r = refusal(lambda: _download(artifacts, run_id=run_id, path="resume.bin", offset=-1))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "offset")
    r = refusal(lambda: _download(artifacts, run_id=run_id, path="missing.bin"))
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_FOUND", "path")
    assert "missing.bin" in r.message
    other = _upload(artifacts, run_id, "other.bin", b"other content")
    # Both forms at once: refused, rather than one silently chosen over the other.
    r = refusal(lambda: _download(artifacts, run_id=run_id, path="resume.bin", sha256=other.sha256))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "sha256")


def test_client_download_resumes_a_partial_file_and_verifies(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    data = _blob(3 * MiB + 5, seed=7)
    _upload(artifacts, run_id, "big.bin", data)
    dest = tmp_path / "big.bin"
    partial = tmp_path / ".big.bin.runledger-part"
    partial.write_bytes(data[: MiB + 3])  # an interrupted earlier download
    moved: list[int] = []
    client_artifacts.download(channel, run_id, "big.bin", dest, progress=lambda done, total: moved.append(done))
    assert dest.read_bytes() == data and not partial.exists()
    assert moved[0] == MiB + 3  # started from the partial file, not from zero

    # A partial file that is not this artifact's (damaged, or left by a download of other content to the
    # same place) shows at the end: the download starts over from zero instead of failing.
    dest.unlink()
    partial.write_bytes(b"X" * 100)
    moved.clear()
    client_artifacts.download(channel, run_id, "big.bin", dest, progress=lambda done, total: moved.append(done))
    assert dest.read_bytes() == data and not partial.exists()
    # The 100 bytes and the rest, then back to zero and all of it again: never more than the total.
    assert moved[0] == 100 and moved[-1] == max(moved) == len(data)
    restart = moved.index(len(data)) + 1
    assert moved[restart] == 0 and moved[restart + 1 :] == sorted(moved[restart + 1 :])

    # Not resuming (or a partial file longer than the artifact): the old bytes are replaced, never kept.
    for stale, resume in ((b"Y" * (len(data) + 7), True), (data[: MiB + 3], False)):
        dest.unlink()
        partial.write_bytes(stale)
        moved.clear()
        client_artifacts.download(
            channel, run_id, "big.bin", dest, resume=resume, progress=lambda done, total: moved.append(done)
        )
        assert dest.read_bytes() == data and not partial.exists()
        assert moved[0] <= MiB and moved[-1] == len(data)  # from zero (not from MiB + 3), once


def _overwrite_blob(uri: str, content: bytes, backend: str, request: pytest.FixtureRequest) -> None:
    """Replace a stored blob's bytes in the store itself, as bit rot or an operator's mistake would."""
    if backend == "local":
        blob = Path(uri.removeprefix("file://"))
        blob.chmod(0o644)
        blob.write_bytes(content)
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        key = uri.removeprefix(f"s3://{s3.bucket}/")
        s3.client().put_object(s3.bucket, key, io.BytesIO(content), len(content))


def test_client_download_refuses_bytes_that_do_not_match_the_record(
    channel: grpc.Channel, artifacts: Stub, run_id: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = _blob(MiB + 9, seed=3)
    art = _upload(artifacts, run_id, "rot.bin", data)
    damaged = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit at rest
    _overwrite_blob(art.uri, damaged, backend, request)  # damaged at rest, behind runledger's back
    dest = tmp_path / "rot.bin"
    with pytest.raises(DataLoss) as info:  # a fresh download: no partial file to blame, no second try
        client_artifacts.download(channel, run_id, "rot.bin", dest, progress=False)
    assert info.value.reason == "DIGEST_MISMATCH" and info.value.metadata["expectedSha256"] == art.sha256
    assert not dest.exists() and not (tmp_path / ".rot.bin.runledger-part").exists()


@pytest.mark.parametrize("change", ["cut short", "grown"])
def test_a_blob_of_another_size_than_recorded_is_data_loss_at_the_end_not_ok(
    channel: grpc.Channel,
    artifacts: Stub,
    run_id: str,
    backend: str,
    change: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Any gRPC client, not only one that verifies the digest, learns that the stored bytes are damaged; and an
    upload of the right content repairs the blob."""
    data = _blob(2 * MiB + 5, seed=4)
    art = _upload(artifacts, run_id, "cut.bin", data)
    damaged = data[: MiB + 3] if change == "cut short" else data + b"tail"
    _overwrite_blob(art.uri, damaged, backend, request)  # damaged at rest, behind runledger's back
    for offset in (0, MiB, 2 * MiB):  # the last one is past the end of the blob cut short
        call = artifacts.DownloadArtifact(pb.DownloadArtifactRequest(run_id=run_id, path="cut.bin", offset=offset))
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value
        assert "BLOB_DAMAGED" in str(info.value.trailing_metadata()) and "cut.bin" in str(info.value.details())
    with pytest.raises(DataLoss) as client_info:  # the client's default: presigned where the store is S3
        client_artifacts.download(channel, run_id, "cut.bin", tmp_path / "cut.bin", progress=False)
    # From S3 the grown blob comes straight from the store, whole: the client's digest check refuses it.
    grown_on_s3 = backend == "s3" and change == "grown"
    assert client_info.value.reason == ("DIGEST_MISMATCH" if grown_on_s3 else "BLOB_DAMAGED")
    _upload(artifacts, _new_run(request.getfixturevalue("tracking")), "again.bin", data)  # the right bytes again
    assert _download(artifacts, run_id=run_id, path="cut.bin")[1] == data


@pytest.mark.parametrize("declared", [True, False], ids=["digest declared", "digest found by the server"])
def test_a_blob_damaged_in_place_at_its_size_is_replaced_by_the_next_upload_of_that_content(
    channel: grpc.Channel,
    artifacts: Stub,
    run_id: str,
    backend: str,
    declared: bool,
    stored: Callable[[], int],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Size alone cannot tell bit rot from an intact copy: an upload of the same content must not be recorded
    against the damaged bytes, but replace them."""
    data = _blob(3 * MiB + 11, seed=6)
    art = _upload(artifacts, run_id, "rot.bin", data)
    damaged = bytearray(data)
    damaged[MiB + 5] ^= 0x40  # one flipped bit at rest, same size
    _overwrite_blob(art.uri, bytes(damaged), backend, request)
    count = stored()
    digest_and_size = {} if declared else {"sha256": None, "size": None}
    again = _upload(artifacts, _new_run(request.getfixturevalue("tracking")), "again.bin", data, **digest_and_size)
    assert (again.sha256, again.uri) == (art.sha256, art.uri)
    assert _download(artifacts, run_id=run_id, path="rot.bin")[1] == data  # healed, under the first record too
    client_artifacts.download(channel, run_id, "rot.bin", tmp_path / "rot.bin", progress=False)  # verifies
    assert (tmp_path / "rot.bin").read_bytes() == data
    assert stored() == count  # still one blob, no temporary copy left


@pytest.mark.parametrize("size", [2 * MiB + 3, 20 * MiB + 3])
def test_an_intact_blob_is_not_rewritten_by_an_upload_of_the_same_content(
    artifacts: Stub, tracking, run_id: str, backend: str, size: int, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    data = _blob(size, seed=7)
    art = _upload(artifacts, run_id, "w.bin", data)
    if backend == "local":
        blob = Path(art.uri.removeprefix("file://"))
        written = lambda: (blob.stat().st_ino, blob.stat().st_mtime_ns)  # noqa: E731
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        key = art.uri.removeprefix(f"s3://{s3.bucket}/")
        written = lambda: s3.client().stat_object(s3.bucket, key).last_modified  # noqa: E731
        time.sleep(1.1)  # S3 times an object's writes to the second
    before = written()
    assert _upload(artifacts, _new_run(tracking), "w.bin", data).uri == art.uri
    assert written() == before


def test_a_manifest_damaged_in_place_is_written_again_when_asked_for(
    artifacts: Stub, run_id: str, backend: str, request: pytest.FixtureRequest
) -> None:
    _upload(artifacts, run_id, "adapter/a.bin", b"weights")
    _upload(artifacts, run_id, "adapter/config.json", b"{}")
    m = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="adapter"))
    listed, body = _download(artifacts, sha256=m.sha256)
    _overwrite_blob(listed.uri, body.replace(b"a.bin", b"b.bin"), backend, request)  # same size, other bytes
    assert artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="adapter")) == m
    assert _download(artifacts, sha256=m.sha256)[1] == body


def test_a_manifests_digest_still_downloads_its_manifest_once_its_blob_is_damaged_or_gone(
    artifacts: Stub, run_id: str, backend: str, request: pytest.FixtureRequest
) -> None:
    """A model version of a directory is that manifest's digest; once the run's directory has grown, nothing
    else could rebuild the list of files it stands for: the index keeps the manifest's bytes."""
    _upload(artifacts, run_id, "adapter/a.bin", b"weights")
    _upload(artifacts, run_id, "adapter/config.json", b"{}")
    m = artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path="adapter"))
    listed, body = _download(artifacts, sha256=m.sha256)
    _upload(artifacts, run_id, "adapter/extra.txt", b"added after the version was registered")
    _overwrite_blob(listed.uri, body.replace(b"a.bin", b"b.bin"), backend, request)  # same size, other bytes
    again, served = _download(artifacts, sha256=m.sha256)
    assert served == body and again.sha256 == m.sha256 and again.size == len(body)
    _delete_blob(listed.uri, backend, request)
    assert _download(artifacts, sha256=m.sha256)[1] == body
    assert _download(artifacts, sha256=m.sha256, offset=5)[1] == body[5:]


def _plant_blob(like: pb.Artifact, data: bytes, backend: str, request: pytest.FixtureRequest) -> str:
    """Put bytes at their content address in the store itself, beside an artifact's blob, without any record
    (as an upload whose record was refused, or whose server died before recording it, leaves them)."""
    digest = hashlib.sha256(data).hexdigest()
    old, new = like.sha256, digest
    uri = like.uri.replace(f"{old[:2]}/{old[2:4]}/{old}", f"{new[:2]}/{new[2:4]}/{new}").replace(old, new)
    if backend == "local":
        blob = Path(uri.removeprefix("file://"))
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    else:
        _overwrite_blob(uri, data, backend, request)
    return digest


def test_bytes_in_the_store_without_a_record_are_not_served_by_digest(
    artifacts: Stub, run_id: str, backend: str, request: pytest.FixtureRequest
) -> None:
    art = _upload(artifacts, run_id, "model.bin", b"recorded")
    orphan = _plant_blob(art, b"never recorded: an upload refused at its record", backend, request)
    r = refusal(lambda: _download(artifacts, sha256=orphan))
    assert r.code == grpc.StatusCode.NOT_FOUND and r.metadata["field"] == "sha256" and orphan in r.message
    assert _download(artifacts, sha256=art.sha256)[1] == b"recorded"


def test_a_manifest_published_before_the_index_kept_manifests_is_served_and_then_kept(
    artifacts: Stub, run_id: str, backend: str, request: pytest.FixtureRequest
) -> None:
    """Schema 0007 added the index's copy; a manifest published earlier exists only as a blob. It is served
    when its bytes check out (and kept from then on), and a blob that only looks like a manifest is not."""
    a = _upload(artifacts, run_id, "old/a.bin", b"weights")
    c = _upload(artifacts, run_id, "old/config.json", b"{}")
    entries = [manifest_rule.ManifestEntry(x.path.removeprefix("old/"), x.sha256, x.size) for x in (a, c)]
    body = canonical_manifest(manifest_rule.build(entries))
    digest = _plant_blob(a, body, backend, request)
    assert _download(artifacts, sha256=digest)[1] == body
    listed = _download(artifacts, sha256=digest)[0]
    _delete_blob(listed.uri, backend, request)
    assert _download(artifacts, sha256=digest)[1] == body  # kept by the index at its first download
    lookalike = _plant_blob(a, body.replace(b"a.bin", b"b.bin") + b" ", backend, request)  # not canonical
    assert refusal(lambda: _download(artifacts, sha256=lookalike)).code == grpc.StatusCode.NOT_FOUND


def _delete_blob(uri: str, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "local":
        Path(uri.removeprefix("file://")).unlink()
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        s3.client().remove_object(s3.bucket, uri.removeprefix(f"s3://{s3.bucket}/"))


@pytest.mark.parametrize("how", ["Client.log_artifact", "artifacts.upload_file"])
def test_an_upload_whose_stored_copy_vanishes_while_it_is_replaced_is_sent_again_and_stored(
    channel: grpc.Channel,
    server: Any,
    artifacts: Stub,
    tracking,  # type: ignore[no-untyped-def]
    backend: str,
    how: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The server refuses it as ABORTED BLOB_CHANGED (the matched part it would copy is gone); the client sends
    the same bytes again, and they are stored."""
    data = _blob(24 * MiB, seed=9)
    art = _upload(artifacts, run_id := _new_run(tracking), "first.bin", data)
    rotten = bytearray(data)
    rotten[20 * MiB] ^= 1  # damaged late, so the upload compares for a while before it replaces the copy
    _overwrite_blob(art.uri, bytes(rotten), backend, request)
    local = tmp_path / "again.bin"
    local.write_bytes(data)
    gone = []

    def progress(done: int, total: int) -> None:  # the client has sent 8 MiB: the server is comparing
        if done >= 8 * MiB and not gone:
            gone.append(done)
            _delete_blob(art.uri, backend, request)

    other = _new_run(tracking)
    if how == "Client.log_artifact":
        with runledger.Client(server.address) as client:
            stored = client.log_artifact(other, local, "again.bin", progress=progress)[0]
    else:
        stored = client_artifacts.upload_file(channel, other, local, "again.bin", progress=progress)
    assert gone and (stored.sha256, stored.size) == (art.sha256, len(data))
    assert _download(artifacts, run_id=other, path="again.bin")[1] == data
    assert _download(artifacts, run_id=run_id, path="first.bin")[1] == data  # the first record, healed too


def test_listing_pages_in_path_order(artifacts: Stub, run_id: str) -> None:
    paths = ["b/2", "a/1", "b/10", "c", "B/upper", "a/0"]
    for p in paths:
        _upload(artifacts, run_id, p, p.encode())
    seen, token, pages = [], "", 0
    while True:
        page = artifacts.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, page_size=4, page_token=token))
        seen += [a.path for a in page.artifacts]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(paths) and pages == 2
    assert _paths(artifacts, run_id, "b") == ["b/10", "b/2"]  # a prefix is case-sensitive
    first = artifacts.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, page_size=1))
    r = refusal(
        lambda: artifacts.ListArtifacts(
            pb.ListArtifactsRequest(run_id=run_id, prefix="a", page_size=1, page_token=first.next_page_token)
        )
    )
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")


# ---- what the registry calls -------------------------------------------------------------------------
def test_describe_resolves_a_file_or_a_directory(settings: Settings, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'describe.sqlite'}")
    migrate.upgrade(db)
    tracking = SqlTrackingStore(db)
    exp = tracking.create_experiment("describe", "", {})
    run = tracking.create_run("r1", exp.experiment_id, "", {}, {}, Lineage(), None)
    blobs = artifact_backends.from_settings(settings)
    svc = ArtifactService(SqlArtifactIndex(db), blobs)
    for path, data in (("adapter/a.bin", b"a"), ("adapter/sub/b.bin", b"bb"), ("model.bin", b"m")):
        up = svc.begin_upload(run.run_id, path, len(data), hashlib.sha256(data).hexdigest())
        up.write([data])
        up.finish()

    sha, size, uri, is_dir = svc.describe(run.run_id, "model.bin")
    assert (sha, size, is_dir) == (hashlib.sha256(b"m").hexdigest(), 1, False) and uri == blobs.uri(sha)
    d = svc.describe(run.run_id, "adapter/")
    _, manifest = svc.manifest(run.run_id, "adapter")
    assert (d.sha256, d.size, d.is_directory, d.uri) == (manifest.sha256, 3, True, blobs.uri(manifest.sha256))
    # The manifest is published under its own digest: the directory's content address resolves to its file list,
    # also through a download by digest.
    listing = (
        b'[{"path":"a.bin","sha256":"' + hashlib.sha256(b"a").hexdigest().encode() + b'","size":1},'
        b'{"path":"sub/b.bin","sha256":"' + hashlib.sha256(b"bb").hexdigest().encode() + b'","size":2}]'
    )
    record, chunks, _ = svc.open_download("", "", d.sha256, 0)
    assert (record.size, b"".join(chunks)) == (len(listing), listing)
    assert svc.describe(run.run_id, "adapter") == d  # publishing again is a no-op
    with pytest.raises(NotFound) as info:
        svc.describe(run.run_id, "nothing/here")
    assert (info.value.reason, info.value.field) == ("ARTIFACT_NOT_FOUND", "artifact_path")
    db.dispose()


# ---- the S3 server failing ---------------------------------------------------------------------------
@pytest.mark.s3
@pytest.mark.slow
def test_s3_outage_mid_upload_fails_cleanly_and_the_retry_succeeds(tmp_path: Path, s3_server: S3Server) -> None:
    if s3_server.kind != "moto":
        pytest.skip("needs an S3 server the test can stop and restart (moto)")
    with moto_process() as moto:
        settings = moto.server.settings(Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d"), "outage")
        with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            data = _blob(3 * MiB, seed=8)
            assert _upload(stub, run, "before.bin", b"fine").size == 4  # the store works

            half_sent, go_on = threading.Event(), threading.Event()

            def interrupted() -> Iterator[pb.UploadArtifactRequest]:
                reqs = _requests(run, "ckpt.bin", data)
                yield next(reqs)  # header
                yield next(reqs)  # first MiB
                half_sent.set()
                go_on.wait(60)
                yield from reqs

            result: dict[str, object] = {}
            caller = threading.Thread(
                target=lambda: result.update(r=refusal(lambda: stub.UploadArtifact(interrupted())))
            )
            caller.start()
            assert half_sent.wait(60)
            moto.stop()  # the S3 server dies mid-upload
            go_on.set()
            caller.join(60)
            r = result["r"]
            assert r.code == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert r.reason == "ARTIFACT_STORE_UNAVAILABLE"  # type: ignore[attr-defined]
            assert moto.server.endpoint in r.message  # type: ignore[attr-defined]
            assert _paths(stub, run) == ["before.bin"]

            # A directory's manifest is still answered from the index, though it cannot be stored meanwhile.
            listing = stub.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run, path=""))
            assert [e.path for e in listing.entries] == ["before.bin"]

            moto.start()  # back; moto keeps its state in memory, so put back the bucket a real server would keep
            moto.server.client().make_bucket(moto.server.bucket)
            assert _upload(stub, run, "ckpt.bin", data).sha256 == hashlib.sha256(data).hexdigest()
            assert _download(stub, run_id=run, path="ckpt.bin")[1] == data
            assert _paths(stub, run) == ["before.bin", "ckpt.bin"]


@pytest.mark.s3
def test_s3_with_signatures_enforced(tmp_path: Path, s3_server: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong credentials are PERMISSION_DENIED; with the right ones everything works, and a download whose
    presigned URL the store refuses (moto answers 500 once it checks signatures) goes through the server."""
    if s3_server.kind != "moto":
        pytest.skip("needs a moto server that enforces signatures")
    with moto_process(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as moto:
        iam = moto.server.boto3_client("iam")  # the three calls moto lets through before it checks signatures
        iam.create_user(UserName="runledger")
        key = iam.create_access_key(UserName="runledger")["AccessKey"]
        iam.put_user_policy(
            UserName="runledger",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        base = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d")
        wrong = replace(moto.server, access_key=key["AccessKeyId"], secret_key="not-the-secret")
        with EmbeddedServer(wrong.settings(base, "denied")) as srv, grpc.insecure_channel(srv.address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            r = refusal(lambda: _upload(stub, run, "x.bin", b"x"))
            assert (r.code, r.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ARTIFACT_STORE_ACCESS_DENIED")
            assert moto.server.endpoint in r.message
            assert _paths(stub, run) == []

        right = replace(moto.server, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
        base = replace(base, data_dir=tmp_path / "d2")
        with EmbeddedServer(right.settings(base, "allowed")) as srv, grpc.insecure_channel(srv.address) as channel:
            run = _new_run(_tracking(channel))
            data = _blob(MiB + 5, seed=10)
            assert _upload(Stub(channel), run, "ok.bin", data).size == len(data)
            with caplog.at_level(logging.DEBUG, logger="runledger.artifacts"):
                client_artifacts.download(channel, run, "ok.bin", tmp_path / "ok.bin", progress=False)
            assert (tmp_path / "ok.bin").read_bytes() == data
            assert "downloading through the server" in caplog.text


def test_client_download_fetches_straight_from_s3(
    channel: grpc.Channel, artifacts: Stub, run_id: str, backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _blob(2 * MiB + 9, seed=11)
    _upload(artifacts, run_id, "w.bin", data)
    with caplog.at_level(logging.DEBUG, logger="runledger.artifacts"):
        client_artifacts.download(channel, run_id, "w.bin", tmp_path / "a.bin", progress=False)
        direct = "straight from the artifact store" in caplog.text
        caplog.clear()
        (tmp_path / ".b.bin.runledger-part").write_bytes(data[:MiB])  # resumed with a range request
        client_artifacts.download(channel, run_id, "w.bin", tmp_path / "b.bin", progress=False)
        resumed_direct = "straight from the artifact store" in caplog.text
        caplog.clear()
        client_artifacts.download(channel, run_id, "w.bin", tmp_path / "c.bin", presigned=False, progress=False)
        assert "straight from the artifact store" not in caplog.text
    assert direct == resumed_direct == (backend == "s3")  # a local store is only read through the server
    assert all((tmp_path / n).read_bytes() == data for n in ("a.bin", "b.bin", "c.bin"))


def _tracking(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from runledger.v1 import tracking_service_pb2_grpc

    return tracking_service_pb2_grpc.TrackingServiceStub(channel)


# ---- a client that goes away, and the index on PostgreSQL ---------------------------------------------
def test_an_abandoned_upload_leaves_nothing_behind(artifacts: Stub, run_id: str, stored: Callable[[], int]) -> None:
    sent, hold = threading.Event(), threading.Event()
    call = artifacts.UploadArtifact.future(_held_upload(run_id, "never.bin", sent, hold))
    assert sent.wait(60)
    call.cancel()
    hold.set()
    assert _wait_until(lambda: stored() == 0), "the abandoned upload left data behind"
    assert _paths(artifacts, run_id) == []


def test_uploads_beyond_the_servers_limit_are_refused_busy_and_the_client_sends_again(
    server: EmbeddedServer,
    artifacts: Stub,
    run_id: str,
    stored: Callable[[], int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each open upload holds a temporary file (or an S3 multipart upload) from its header on: clients that open
    uploads and stall once took the server to its file-descriptor limit, and then it refused connections."""
    monkeypatch.setattr(artifact_servicer, "MAX_OPEN_UPLOADS", 2)
    held = [(threading.Event(), threading.Event()) for _ in range(2)]
    calls = [
        artifacts.UploadArtifact.future(_held_upload(run_id, f"held{i}.bin", sent, hold))
        for i, (sent, hold) in enumerate(held)
    ]
    assert all(sent.wait(60) for sent, _ in held)
    r = refusal(lambda: _upload(artifacts, run_id, "third.bin", b"refused while two are open"))
    assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "UPLOADS_BUSY")
    src = tmp_path / "later.bin"
    src.write_bytes(b"sent again until a slot is free")
    done: list[object] = []
    client = runledger.Client(server.address, retry=runledger.RetryPolicy(initial_backoff=0.05, max_backoff=0.2))
    sender = threading.Thread(target=lambda: done.append(client.log_artifact(run_id, src, progress=False)))
    sender.start()
    time.sleep(0.5)
    assert not done  # still refused busy, and retried
    calls[0].cancel()
    held[0][1].set()
    sender.join(60)
    client.close()
    assert done and _download(artifacts, run_id=run_id, path="later.bin")[1] == src.read_bytes()
    calls[1].cancel()
    held[1][1].set()
    assert _wait_until(lambda: stored() == 1), "a held upload left data behind"  # later.bin's blob alone


def test_an_upload_that_goes_quiet_is_abandoned_and_leaves_nothing_behind(
    artifacts: Stub, run_id: str, stored: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact_servicer, "UPLOAD_IDLE_SECONDS", 0.5)
    sent, hold = threading.Event(), threading.Event()
    call = artifacts.UploadArtifact.future(_held_upload(run_id, "quiet.bin", sent, hold))
    assert sent.wait(60)
    r = refusal(lambda: call.result(timeout=60))
    assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "UPLOAD_IDLE")
    hold.set()
    assert _wait_until(lambda: stored() == 0), "the abandoned upload left data behind"
    assert _paths(artifacts, run_id) == []


def test_an_upload_cut_off_by_server_shutdown_leaves_nothing_behind(
    settings: Settings, stored: Callable[[], int]
) -> None:
    server = EmbeddedServer(settings).start()  # its own server: stopped in the middle of the upload
    sent, hold = threading.Event(), threading.Event()
    try:
        with grpc.insecure_channel(server.address) as channel:
            upload = _held_upload(_new_run(_tracking(channel)), "cut.bin", sent, hold)
            call = artifact_service_pb2_grpc.ArtifactServiceStub(channel).UploadArtifact.future(upload)
            assert sent.wait(60) and _wait_until(lambda: stored() > 0)
            server.stop(grace=0.2)  # cancels the upload; its abort must run before the server's pools close
            hold.set()
            with pytest.raises(grpc.RpcError):
                call.result(timeout=60)
        assert stored() == 0, "the upload cut off by the shutdown left data behind"
    finally:
        hold.set()
        server.stop()


def _held_upload(
    run_id: str, path: str, sent: threading.Event, hold: threading.Event
) -> Iterator[pb.UploadArtifactRequest]:
    """An upload that sends its header and 9 MiB (past the first multipart part on S3), then stays open."""
    reqs = _requests(run_id, path, _blob(12 * MiB, seed=9))
    for _ in range(10):
        yield next(reqs)
    sent.set()
    hold.wait(60)


def _wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Cleanup after a cancelled call runs on the server after the call ends: wait for its effect."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        done.wait(0.05)
    return condition()


@pytest.mark.postgres
def test_the_index_on_postgresql_orders_and_refuses_like_sqlite(pg_settings: Settings) -> None:
    paths = ["a/b", "a-b", "a.b", "A/z", "a/B", "ä/x", "b"]
    with EmbeddedServer(pg_settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        for p in paths:
            _upload(stub, run, p, p.encode())
        assert _paths(stub, run) == sorted(paths)  # code point order, as Python sorts
        assert _paths(stub, run, "a/") == ["a/B", "a/b"]
        page = stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run, page_size=3))
        rest = stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run, page_token=page.next_page_token))
        assert [a.path for a in (*page.artifacts, *rest.artifacts)] == sorted(paths)
        r = refusal(lambda: _upload(stub, run, "a/b", b"other"))
        assert (r.code, r.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ARTIFACT_IMMUTABLE")
        r = refusal(lambda: _upload(stub, run, "b/c", b"below a file"))
        assert (r.code, r.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ARTIFACT_PATH_CONFLICT")
        m = stub.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run, path="a"))
        assert [e.path for e in m.entries] == ["B", "b"]
        assert stub.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run, path="a")) == m  # kept once
        listed, body = _download(stub, sha256=m.sha256)
        Path(listed.uri.removeprefix("file://")).unlink()  # served from the index's copy
        assert _download(stub, sha256=m.sha256)[1] == body and hashlib.sha256(body).hexdigest() == m.sha256
        assert _paths(stub, run) == sorted(paths)


@pytest.mark.postgres
def test_racing_file_and_directory_uploads_on_two_replicas_keep_one(pg_settings: Settings) -> None:
    """`x` (a file) and `x/w` (a file below it) uploaded at once through two replicas: exactly one is recorded."""
    with (
        EmbeddedServer(pg_settings) as a,
        EmbeddedServer(pg_settings) as b,
        grpc.insecure_channel(a.address) as ch_a,
        grpc.insecure_channel(b.address) as ch_b,
    ):
        run = _new_run(_tracking(ch_a))
        stubs = [Stub(ch_a), Stub(ch_b)]
        for i in range(20):
            start = threading.Barrier(2)
            results: dict[str, str] = {}

            def upload(stub: Stub, path: str, start: threading.Barrier, results: dict[str, str]) -> None:
                start.wait()
                try:
                    _upload(stub, run, path, path.encode())
                    results[path] = "ok"
                except grpc.RpcError as err:
                    results[path] = err.code().name

            pair = [f"x{i}", f"x{i}/w"]
            threads = [
                threading.Thread(target=upload, args=(stubs[(j + i) % 2], pair[j], start, results)) for j in (0, 1)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(results.values()) == ["FAILED_PRECONDITION", "ok"], results
        recorded = _paths(stubs[0], run)
        for i in range(20):
            assert (f"x{i}" in recorded) != (f"x{i}/w" in recorded), recorded


@pytest.mark.s3
def test_a_bucket_the_server_creates_aborts_unfinished_uploads_and_an_existing_one_is_left_alone(
    tmp_path: Path, s3_server: S3Server
) -> None:
    client = s3_server.client()
    fresh = replace(s3_server, bucket=f"rl-new-{uuid.uuid4().hex[:12]}")
    base = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d")
    with EmbeddedServer(fresh.settings(base, "team/models")) as srv, grpc.insecure_channel(srv.address) as channel:
        _upload(Stub(channel), _new_run(_tracking(channel)), "x.bin", b"x")
    config = client.get_bucket_lifecycle(fresh.bucket)
    assert config is not None
    (rule,) = config.rules
    assert rule.rule_id == "runledger-abort-incomplete-uploads" and rule.status == "Enabled"
    assert rule.rule_filter is not None and rule.rule_filter.prefix == "team/models/"
    assert rule.abort_incomplete_multipart_upload is not None
    assert rule.abort_incomplete_multipart_upload.days_after_initiation == 1

    existing = replace(s3_server, bucket=f"rl-old-{uuid.uuid4().hex[:12]}")
    client.make_bucket(existing.bucket)  # its owner's bucket: the server leaves its lifecycle alone
    base = replace(base, data_dir=tmp_path / "d2")
    with EmbeddedServer(existing.settings(base, "m")) as srv, grpc.insecure_channel(srv.address) as channel:
        _upload(Stub(channel), _new_run(_tracking(channel)), "x.bin", b"x")
    assert client.get_bucket_lifecycle(existing.bucket) is None


# ---- no region configured: the SDK asks the bucket -----------------------------------------------------
def _settings_without_region(tmp_path: Path, s3: S3Server, bucket: str, prefix: str, **more_env: str) -> Settings:
    """Settings as `runledger serve` reads them from an environment that sets neither AWS_REGION nor
    AWS_DEFAULT_REGION (the process's own environment is not consulted)."""
    from runledger_server.config import from_argv

    env = {
        "RUNLEDGER_HOST": "127.0.0.1",
        "RUNLEDGER_PORT": "0",
        "RUNLEDGER_DATA_DIR": str(tmp_path / "d"),
        "RUNLEDGER_ARTIFACTS": f"s3://{bucket}/{prefix}",
        "RUNLEDGER_S3_ENDPOINT": s3.endpoint,
        "RUNLEDGER_S3_SECURE": "true" if s3.secure else "false",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        **more_env,
    }
    settings = from_argv([], env)
    assert settings.s3.region == ""
    return settings


def _presigned_url(stub: Stub, run_id: str, path: str) -> str:
    (message,) = stub.DownloadArtifact(pb.DownloadArtifactRequest(run_id=run_id, path=path, accept_presigned_url=True))
    assert message.presigned_url
    return str(message.presigned_url)


def _fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


@pytest.mark.s3
def test_without_a_region_the_server_creates_its_bucket_stores_multipart_and_serves_presigned_downloads(
    tmp_path: Path, s3_server: S3Server
) -> None:
    bucket = f"rl-noregion-{uuid.uuid4().hex[:12]}"
    settings = _settings_without_region(tmp_path, s3_server, bucket, "team")
    data = _blob(9 * MiB + 3, seed=12)  # two parts of a multipart upload
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        assert _upload(stub, run, "ckpt.bin", data).sha256 == hashlib.sha256(data).hexdigest()
        assert _fetch(_presigned_url(stub, run, "ckpt.bin")) == data
        assert _download(stub, run_id=run, path="ckpt.bin")[1] == data
    config = s3_server.client().get_bucket_lifecycle(bucket)  # created by the server, with its rule
    assert config is not None and [r.rule_id for r in config.rules] == ["runledger-abort-incomplete-uploads"]


@pytest.mark.s3
def test_without_a_region_a_bucket_outside_us_east_1_gets_urls_signed_for_its_own_region(
    tmp_path: Path, s3_server: S3Server
) -> None:
    if s3_server.kind != "moto":
        pytest.skip("needs an S3 server that keeps buckets in any region (moto)")
    bucket = f"rl-eu-{uuid.uuid4().hex[:12]}"
    Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=s3_server.secure).make_bucket(
        bucket, "eu-west-1"
    )
    settings = _settings_without_region(tmp_path, s3_server, bucket, "m")
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        _upload(stub, run, "w.bin", b"weights")
        url = _presigned_url(stub, run, "w.bin")
        assert "%2Feu-west-1%2Fs3%2Faws4_request" in url, url  # not the us-east-1 a fixed default would sign for
        assert _fetch(url) == b"weights"


@pytest.mark.s3
def test_a_session_token_is_sent_with_the_temporary_credentials(s3_server: S3Server, tmp_path: Path) -> None:
    if s3_server.kind != "moto":
        pytest.skip("needs an S3 server that accepts a made-up session token (moto checks no signatures)")
    from runledger_server.backends.artifacts import from_settings

    prefix = f"t-{uuid.uuid4().hex[:12]}"
    settings = _settings_without_region(
        tmp_path, s3_server, s3_server.bucket, prefix, AWS_SESSION_TOKEN="session-token"
    )
    store = from_settings(settings)  # the store the server builds from its settings
    assert isinstance(store, artifact_backends.S3BlobStore)
    digest = hashlib.sha256(b"t").hexdigest()
    assert store.put(digest, io.BytesIO(b"t"), 1) == store.uri(digest)
    assert "X-Amz-Security-Token=session-token" in store.presigned_get(digest)


def test_without_a_region_a_dead_store_is_unavailable_promptly(tmp_path: Path) -> None:
    """The region lookup is one more request before the first real one: it fails as fast and as clearly."""
    import socket

    from runledger_server.domain.errors import Unavailable

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        dead = S3Server(endpoint=f"127.0.0.1:{closed.getsockname()[1]}", access_key="k", secret_key="s", kind="moto")
        settings = _settings_without_region(tmp_path, dead, "rl-dead", "p")
        started = time.monotonic()
        with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
            run = _new_run(_tracking(channel))
            r = refusal(lambda: _upload(Stub(channel), run, "x.bin", b"x"))
            assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "ARTIFACT_STORE_UNAVAILABLE")
            assert dead.endpoint in r.message
        store = artifact_backends.S3BlobStore(endpoint=dead.endpoint, bucket="rl-dead", access_key="k", secret_key="s")
        with pytest.raises(Unavailable) as info:
            store.presigned_get(hashlib.sha256(b"x").hexdigest())
        assert info.value.reason == "ARTIFACT_STORE_UNAVAILABLE" and dead.endpoint in info.value.message
        assert time.monotonic() - started < 20


def test_empty_chunks_do_not_grow_a_write_batch_without_end(
    artifacts: Stub, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sending many empty (or tiny) chunks: each message counts toward the batch the server hands its
    pool, so the batch (and the memory it holds) stays bounded instead of growing until 2 MiB of content."""
    from runledger_server.services.artifacts import Upload
    from runledger_server.transport import artifact_servicer

    batches: list[int] = []
    write = Upload.write

    def counted(self: Upload, chunks: Any) -> None:
        batches.append(len(chunks))
        write(self, chunks)

    monkeypatch.setattr(Upload, "write", counted)
    data = _blob(1000, seed=3)

    def requests() -> Iterator[pb.UploadArtifactRequest]:
        header = pb.UploadArtifactHeader(
            run_id=run_id, path="sparse.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        yield pb.UploadArtifactRequest(header=header)
        for _ in range(40_000):  # more than one bounded batch holds
            yield pb.UploadArtifactRequest(chunk=b"")
        yield pb.UploadArtifactRequest(chunk=data)

    art = artifacts.UploadArtifact(requests())
    assert (art.size, art.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    limit = artifact_servicer.WRITE_BATCH_BYTES // artifact_servicer.CHUNK_OVERHEAD_BYTES + 1
    assert sum(batches) == 40_001 and max(batches) <= limit, max(batches)


def test_a_local_store_that_cannot_take_new_files_refuses_uploads_and_still_answers_manifests(
    tmp_path: Path,
) -> None:
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d")
    with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = Stub(channel)
        run = _new_run(_tracking(channel))
        _upload(stub, run, "dir/a.txt", b"a")
        staging = settings.artifact_location + "/tmp"
        os.rmdir(staging)
        Path(staging).write_bytes(b"")  # no new file can be made there (as on a read-only volume)
        r = refusal(lambda: _upload(stub, run, "dir/b.txt", b"b"))
        assert (r.code, r.reason) == (grpc.StatusCode.UNAVAILABLE, "ARTIFACT_STORE_UNAVAILABLE")
        listing = stub.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run, path="dir"))
        assert [e.path for e in listing.entries] == ["a.txt"]
        os.remove(staging)
        os.mkdir(staging)


@pytest.mark.s3
def test_a_presigned_download_cut_short_is_finished_through_the_server(
    tmp_path: Path, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's connection drops midway through the body: the client keeps what it received, takes the
    rest through the server from that offset, and the file is whole and verified."""
    host, port = s3_server.endpoint.rsplit(":", 1)
    with CuttingRelay((host, int(port))) as relay:
        settings = replace(s3_server, endpoint=relay.endpoint).settings(
            Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d"), f"cut-{uuid.uuid4().hex[:8]}"
        )
        with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
            run = _new_run(_tracking(channel))
            data = _blob(5 * MiB + 17, seed=13)
            _upload(Stub(channel), run, "w.bin", data)
            relay.cut_after(2 * MiB)
            with caplog.at_level(logging.DEBUG, logger="runledger.artifacts"):
                client_artifacts.download(channel, run, "w.bin", tmp_path / "w.bin", progress=False)
            assert relay.cuts == 1
            assert "downloading through the server" in caplog.text
            assert (tmp_path / "w.bin").read_bytes() == data
            assert not (tmp_path / ".w.bin.runledger-part").exists()


@pytest.mark.s3
def test_presigned_fetches_reuse_their_connection_and_open_another_once_the_store_closed_it(
    tmp_path: Path, s3_server: S3Server
) -> None:
    host, port = s3_server.endpoint.rsplit(":", 1)
    with CuttingRelay((host, int(port))) as relay:
        settings = replace(s3_server, endpoint=relay.endpoint).settings(
            Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "d"), f"reuse-{uuid.uuid4().hex[:8]}"
        )
        with EmbeddedServer(settings) as srv, grpc.insecure_channel(srv.address) as channel:
            stub = Stub(channel)
            run = _new_run(_tracking(channel))
            blobs = {f"f{i}.bin": _blob(MiB + i, seed=20 + i) for i in range(3)}
            for path, data in blobs.items():
                _upload(stub, run, path, data)
            direct = client_artifacts._Direct(True)
            opened = []  # connections the relay accepted during each fetch
            for i, (path, data) in enumerate(blobs.items()):
                if i == 2:
                    relay.drop_connections()
                url = _presigned_url(stub, run, path)
                out, digest = io.BytesIO(), hashlib.sha256()
                sink = client_artifacts._Sink(out, digest)
                before = relay.accepted
                with client_artifacts._Meter(False, len(data), path) as meter:
                    reached = direct.fetch(url, 0, len(data), sink, meter)
                sink.close()
                opened.append(relay.accepted - before)
                assert (reached, out.getvalue()) == (len(data), data)
                assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
            direct.close()
            # Kept alive between files; the one the store closed was replaced, and that fetch still succeeded.
            # moto's web server closes every connection after its response, so there each fetch opens one.
            assert opened == ([1, 1, 1] if s3_server.kind == "moto" else [1, 0, 1])
