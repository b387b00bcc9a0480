"""Artifact paths through the Python client and a real server: names as long as the server allows download
and resume, one Unicode spelling per name, a directory is uploaded whole or not at all, and a download
never writes outside its destination or over another of its own files."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from runledger import artifact_paths as client_paths, artifacts as client_artifacts
from runledger.errors import FailedPrecondition, InvalidArgument, LocalFileError, RunledgerError
from runledger.v1 import (
    artifact_pb2,
    artifact_service_pb2 as pb,
    artifact_service_pb2_grpc,
    registry_service_pb2 as rpb,
    registry_service_pb2_grpc,
    tracking_service_pb2 as tpb,
    tracking_service_pb2_grpc,
)
from tests.support import refusal

Stub = artifact_service_pb2_grpc.ArtifactServiceStub
NFC = unicodedata.normalize("NFC", "café.bin")
NFD = unicodedata.normalize("NFD", "café.bin")
LONG_NAMES = ["m" * 255, "模" * 85]  # 255 bytes each: the longest segment the server accepts


@pytest.fixture
def run_id(tracking: tracking_service_pb2_grpc.TrackingServiceStub) -> str:
    exp = tracking.CreateExperiment(tpb.CreateExperimentRequest(display_name=f"e-{uuid.uuid4().hex[:8]}"))
    return str(tracking.CreateRun(tpb.CreateRunRequest(experiment=exp.name)).run_id)


def _paths(stub: Stub, run_id: str, prefix: str = "") -> list[str]:
    return [a.path for a in stub.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, prefix=prefix)).artifacts]


def _requests(run_id: str, path: str, data: bytes) -> Iterator[pb.UploadArtifactRequest]:
    header = pb.UploadArtifactHeader(run_id=run_id, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    yield pb.UploadArtifactRequest(header=header)
    yield pb.UploadArtifactRequest(chunk=data)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ---- names as long as the server allows ------------------------------------------------------------
def test_a_255_byte_name_inside_a_directory_round_trips_and_resumes(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    files = {name: hashlib.shake_256(name.encode()).digest(300_000) for name in LONG_NAMES}
    files["sub/" + LONG_NAMES[0]] = b"nested"
    uploaded = client_artifacts.upload_dir(channel, run_id, _tree(tmp_path / "ckpt", files), progress=False)
    assert sorted(a.path for a in uploaded) == sorted(f"ckpt/{p}" for p in files)

    out = client_artifacts.download(channel, run_id, "ckpt", tmp_path / "out", progress=False)
    assert _files(out) == files

    # An interrupted download of the long name resumes from its partial file.
    target = out / LONG_NAMES[1]
    target.unlink()
    partial = client_paths.partial_path(target)
    partial.write_bytes(files[LONG_NAMES[1]][:100_000])
    moved: list[int] = []
    client_artifacts.download(channel, run_id, "ckpt", out, progress=lambda done, total: moved.append(done))
    steps = [done - before for before, done in zip([0, *moved], moved, strict=False)]
    assert 100_000 in steps  # the partial file's bytes counted at once: resumed, not started over
    assert moved[-1] == sum(len(data) for data in files.values())  # and each file fetched once
    assert _files(out) == files and not partial.exists()
    assert [p for p in out.iterdir() if p.name.endswith(client_paths.PARTIAL_SUFFIX)] == []


def test_a_local_write_failure_is_a_runledger_error_naming_the_file(
    channel: grpc.Channel, run_id: str, tmp_path: Path
) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(b"weights")
    client_artifacts.upload_file(channel, run_id, src, "ckpt/sub/x.bin", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_bytes(b"a file where the download needs a directory")
    with pytest.raises(LocalFileError) as info:
        client_artifacts.download(channel, run_id, "ckpt", out, progress=False)
    err = info.value
    assert isinstance(err, RunledgerError) and isinstance(err, OSError)  # `except OSError` still catches it
    assert err.errno in (errno.EEXIST, errno.ENOTDIR) and err.reason == "LOCAL_FILE_ERROR"
    assert str(out / "sub" / "x.bin") in err.message and "ckpt/sub/x.bin" in err.message
    assert err.metadata["path"] == "ckpt/sub/x.bin" and err.metadata["localPath"] == str(out / "sub" / "x.bin")


# ---- one Unicode spelling per name -----------------------------------------------------------------
def _refused_naming(call: Callable[[], object], field: str) -> None:
    r = refusal(call)
    assert (r.code, r.reason, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARTIFACT_PATH", field)
    assert "NFC" in r.message


def test_paths_not_in_nfc_are_refused_by_every_call_naming_the_field(
    artifacts: Stub, registry: registry_service_pb2_grpc.RegistryServiceStub, run_id: str
) -> None:
    _refused_naming(lambda: artifacts.UploadArtifact(_requests(run_id, f"d/{NFD}", b"one")), "path")
    assert _paths(artifacts, run_id) == []
    artifacts.UploadArtifact(_requests(run_id, f"d/{NFC}", b"one"))

    _refused_naming(
        lambda: list(artifacts.DownloadArtifact(pb.DownloadArtifactRequest(run_id=run_id, path=f"d/{NFD}"))), "path"
    )
    _refused_naming(
        lambda: artifacts.ListArtifacts(pb.ListArtifactsRequest(run_id=run_id, prefix=f"d/{NFD}")), "prefix"
    )
    _refused_naming(
        lambda: artifacts.GetArtifactManifest(pb.GetArtifactManifestRequest(run_id=run_id, path=NFD)), "path"
    )
    _refused_naming(
        lambda: registry.CreateModelVersion(
            rpb.CreateModelVersionRequest(model="models/m", run_id=run_id, artifact_path=f"d/{NFD}")
        ),
        "artifact_path",
    )
    # The composed spelling is the one name: it cannot also become a directory in the other spelling.
    _refused_naming(lambda: artifacts.UploadArtifact(_requests(run_id, f"d/{NFD}/x", b"two")), "path")
    assert _paths(artifacts, run_id) == [f"d/{NFC}"]


def test_the_client_uploads_decomposed_local_names_under_their_nfc_paths(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    src = tmp_path / NFD  # as a macOS file system hands out the name
    src.write_bytes(b"one")
    assert client_artifacts.upload_file(channel, run_id, src, progress=False).path == NFC

    root = tmp_path / unicodedata.normalize("NFD", "modèle")
    _tree(root, {f"{unicodedata.normalize('NFD', 'répertoire')}/{NFD}": b"two"})
    uploaded = client_artifacts.upload_dir(channel, run_id, root, progress=False)
    expected = unicodedata.normalize("NFC", f"modèle/répertoire/{NFC}")
    assert [a.path for a in uploaded] == [expected]
    assert _paths(artifacts, run_id) == sorted([NFC, expected])

    # A name the caller spells out is not rewritten: it is refused before the file is read.
    with pytest.raises(InvalidArgument) as info:
        client_artifacts.upload_file(channel, run_id, src, f"x/{NFD}", progress=False)
    assert info.value.metadata["field"] == "path" and "NFC" in info.value.message


# ---- a directory is uploaded whole or not at all -----------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        "z\\bad.bin",  # a backslash: a fine name on Linux, a separator elsewhere
        "z\nbad.bin",
        "/".join(["z" * 200] * 6),  # longer than 1024 characters
        os.fsdecode(b"z\xff.bin"),  # not UTF-8
        f"z/{NFC}",  # its decomposed twin below is the same artifact path
        "z\x85bad.bin",  # a C1 control character (NEXT LINE)
    ],
)
def test_a_directory_with_one_name_the_server_would_refuse_uploads_nothing(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path, bad: str
) -> None:
    root = _tree(tmp_path / "dir", {"a.bin": b"first in path order", bad: b"bad"})
    if bad.endswith(NFC):
        (root / "z" / NFD).write_bytes(b"twin")
    with pytest.raises(InvalidArgument) as info:
        client_artifacts.upload_dir(channel, run_id, root, progress=False)
    assert info.value.reason == "INVALID_ARTIFACT_PATH" and info.value.metadata["field"] == "path"
    assert "nothing below" in info.value.message
    assert _paths(artifacts, run_id) == []


def test_a_file_and_a_directory_that_are_one_name_once_normalised_upload_nothing(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    root = _tree(tmp_path / "dir", {"a.bin": b"first", unicodedata.normalize("NFD", "café"): b"a file"})
    _tree(root, {f"{unicodedata.normalize('NFC', 'café')}/x.bin": b"below a directory"})
    with pytest.raises(InvalidArgument) as info:
        client_artifacts.upload_dir(channel, run_id, root, progress=False)
    assert info.value.metadata["field"] == "path" and "also a file" in info.value.message
    assert _paths(artifacts, run_id) == []  # refused before the first file was sent


def test_the_server_refuses_c1_control_characters_in_new_paths(artifacts: Stub, run_id: str) -> None:
    r = refusal(lambda: artifacts.UploadArtifact(_requests(run_id, "a\x85b.bin", b"x")))
    assert (r.code, r.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "path")
    assert "control character" in r.message and _paths(artifacts, run_id) == []


# ---- a download writes only below its destination, and never one of its files over another ------------
def test_a_download_leaves_files_named_like_other_tools_partial_files_alone(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    artifacts.UploadArtifact(_requests(run_id, "d/x.part", b"an artifact that happens to end in .part"))
    artifacts.UploadArtifact(_requests(run_id, "d/x", b"the model"))
    out = tmp_path / "out"
    out.mkdir()
    client_artifacts.download(channel, run_id, "d/x.part", out, progress=False)
    client_artifacts.download(channel, run_id, "d/x", out, progress=False)
    assert _files(out) == {"x.part": b"an artifact that happens to end in .part", "x": b"the model"}


def test_a_set_holding_the_partial_name_of_another_of_its_files_is_refused(
    channel: grpc.Channel, artifacts: Stub, run_id: str, tmp_path: Path
) -> None:
    artifacts.UploadArtifact(_requests(run_id, "d/x", b"the model"))
    artifacts.UploadArtifact(_requests(run_id, f"d/.x{client_paths.PARTIAL_SUFFIX}", b"made on purpose"))
    with pytest.raises(FailedPrecondition) as info:
        client_artifacts.download(channel, run_id, "d", tmp_path / "out", progress=False)
    assert info.value.reason == "ARTIFACT_PATHS_COLLIDE" and not (tmp_path / "out").exists()


def test_a_download_path_is_checked_and_named_as_the_caller_gave_it(channel: grpc.Channel, run_id: str) -> None:
    for bad in ("a\\b", f"d/{NFD}"):
        with pytest.raises(InvalidArgument) as info:
            client_artifacts.download(channel, run_id, bad, "unused", progress=False)
        assert info.value.metadata["field"] == "path"


def test_a_listed_path_outside_the_destination_is_refused_before_anything_is_written(
    channel: grpc.Channel, run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our server cannot list such a path; a hostile or broken one could.
    listed = [
        artifact_pb2.Artifact(run_id=run_id, path="d/ok.bin", sha256="0" * 64, size=1),
        artifact_pb2.Artifact(run_id=run_id, path="d/../../escape.bin", sha256="0" * 64, size=1),
    ]
    monkeypatch.setattr(client_artifacts, "list_artifacts", lambda *a, **k: iter(listed))
    here = tmp_path / "client"
    here.mkdir()
    with pytest.raises(FailedPrecondition) as info:
        client_artifacts.download(channel, run_id, "d", here / "deep" / "out", progress=False)
    assert info.value.reason == "UNSAFE_ARTIFACT_PATH" and "../../escape.bin" in info.value.message
    assert list(here.rglob("*")) == []


def test_paths_differing_in_case_are_refused_only_where_the_file_system_ignores_case(
    channel: grpc.Channel, run_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path, data in (("d/Model.bin", b"upper"), ("d/model.bin", b"lower"), ("d/other.bin", b"x")):
        src = tmp_path / "src"
        src.write_bytes(data)
        client_artifacts.upload_file(channel, run_id, src, path, progress=False)

    if not client_paths.ignores_case(tmp_path):  # e.g. ext4 or tmpfs: two distinct files, both kept
        out = client_artifacts.download(channel, run_id, "d", tmp_path / "linux", progress=False)
        assert _files(out) == {"Model.bin": b"upper", "model.bin": b"lower", "other.bin": b"x"}
    assert list(tmp_path.glob(".runledger-case-probe-*")) == []  # the probe cleans up after itself

    monkeypatch.setattr(client_paths, "ignores_case", lambda directory: True)  # as on macOS or Windows
    with pytest.raises(FailedPrecondition) as info:
        client_artifacts.download(channel, run_id, "d", tmp_path / "mac", progress=False)
    assert info.value.reason == "ARTIFACT_PATHS_COLLIDE"
    assert "'Model.bin' and 'model.bin'" in info.value.message
    assert not (tmp_path / "mac").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a case-sensitive file system")
def test_the_case_probe_sees_a_case_sensitive_file_system_and_leaves_nothing(tmp_path: Path) -> None:
    assert client_paths.ignores_case(tmp_path / "not" / "yet") is False
    assert list(tmp_path.iterdir()) == []


# ---- downloads racing into one destination ------------------------------------------------------------
@pytest.mark.parametrize("resume", [True, False])
def test_downloads_of_one_file_racing_into_one_destination_both_leave_it_whole(
    channel: grpc.Channel, run_id: str, tmp_path: Path, resume: bool
) -> None:
    """Ranks of one node fetching the same checkpoint into a shared cache: they share its partial file, and one
    renamed the other's unfinished bytes into place and returned success. They take turns now."""
    import threading

    data = hashlib.shake_256(b"racing").digest(8 << 20)
    Stub(channel).UploadArtifact(_chunked(run_id, "ckpt.bin", data))

    def fetch(dest: Path, start: threading.Barrier, outcomes: list[str]) -> None:
        start.wait(timeout=30)
        try:
            client_artifacts.download(channel, run_id, "ckpt.bin", dest, resume=resume, presigned=False)
            outcomes.append("ok")
        except RunledgerError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    for trial in range(6):
        dest = tmp_path / f"cache-{trial}" / "ckpt.bin"
        start = threading.Barrier(2)
        outcomes: list[str] = []
        threads = [threading.Thread(target=fetch, args=(dest, start, outcomes)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outcomes == ["ok", "ok"], (trial, outcomes)
        assert dest.read_bytes() == data, trial
        assert sorted(p.name for p in dest.parent.iterdir()) == ["ckpt.bin"]  # no partial file left


def _chunked(run_id: str, path: str, data: bytes, chunk: int = 1 << 20) -> Iterator[pb.UploadArtifactRequest]:
    header = pb.UploadArtifactHeader(run_id=run_id, path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    yield pb.UploadArtifactRequest(header=header)
    for lo in range(0, len(data), chunk):
        yield pb.UploadArtifactRequest(chunk=data[lo : lo + chunk])


def test_a_presigned_fetch_after_a_closing_response_still_waits_the_read_timeout(tmp_path: Path) -> None:
    """A store that closes its connection after each response (moto does) and is slow to start the next body:
    the next fetch opens a connection of its own with the read timeout, not the (shorter) connect timeout."""
    import http.server
    import io
    import threading
    import time

    body = b"adapter weights " * 4096
    served = []

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            served.append(self.path)
            if len(served) > 1:
                time.sleep(0.6)  # longer than the connect timeout below, far shorter than the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class QuickToConnect(client_artifacts._Direct):
        CONNECT_TIMEOUT = 0.2

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    direct = QuickToConnect(True)
    try:
        for name in ("a", "b"):
            out, digest = io.BytesIO(), hashlib.sha256()
            sink = client_artifacts._Sink(out, digest)
            with client_artifacts._Meter(False, len(body), name) as meter:
                url = f"http://127.0.0.1:{server.server_address[1]}/{name}?X-Amz-Signature=x"
                assert direct.fetch(url, 0, len(body), sink, meter) == len(body)
            sink.close()
            assert out.getvalue() == body and digest.hexdigest() == hashlib.sha256(body).hexdigest()
    finally:
        direct.close()
        server.shutdown()
        server.server_close()
    assert served == ["/a?X-Amz-Signature=x", "/b?X-Amz-Signature=x"]
