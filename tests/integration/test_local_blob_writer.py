"""The local blob store's writer flushes an upload to disk while it streams in, and still publishes
atomically: complete on commit, nothing left on abort, even with a background flush in flight."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from runledger_server.backends.artifacts import local

MiB = 1 << 20


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Background flushes every MiB, each recorded (and slowed a little, so some are in flight at the end)."""
    seen: list[int] = []
    real = os.fdatasync
    lock = threading.Lock()

    def fdatasync(fd: int) -> None:
        with lock:
            seen.append(fd)
        threading.Event().wait(0.005)
        real(fd)

    monkeypatch.setattr(local, "WRITEBACK_BYTES", MiB)
    monkeypatch.setattr(local.os, "fdatasync", fdatasync)
    return seen


def _blobs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_commit_publishes_every_byte_after_background_flushes(tmp_path: Path, flushes: list[int]) -> None:
    store = local.LocalBlobStore(tmp_path / "a")
    data = os.urandom(8 * MiB + 123)
    writer = store.writer()
    for i in range(0, len(data), 256 * 1024):
        writer.write(data[i : i + 256 * 1024])
    digest = hashlib.sha256(data).hexdigest()
    writer.commit(digest)
    assert flushes, "no background flush was started"
    assert store.path(digest).read_bytes() == data
    assert _blobs(store.root) == [store.path(digest)]  # the temp file became the blob


def test_abort_with_a_flush_in_flight_leaves_nothing(tmp_path: Path, flushes: list[int]) -> None:
    store = local.LocalBlobStore(tmp_path / "a")
    writer = store.writer()
    for _ in range(3):
        writer.write(os.urandom(MiB))
    writer.abort()
    assert flushes
    assert _blobs(store.root) == []


def test_a_new_blob_s_directories_are_flushed_into_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob's fan-out directories (sha256/ab/cd) are made on its first commit; each new one's entry is
    flushed into its parent, then the rename into the last: after a power loss the recorded blob is there."""
    synced: list[Path] = []
    real = local._fsync_dir

    def fsync_dir(path: Path) -> None:
        synced.append(path)
        real(path)

    store = local.LocalBlobStore(tmp_path / "blobs")
    monkeypatch.setattr(local, "_fsync_dir", fsync_dir)
    data = b"adapter weights"
    digest = hashlib.sha256(data).hexdigest()
    writer = store.writer(digest, len(data))
    writer.write(data)
    writer.commit(digest)
    fan_out = store.path(digest).parent
    assert synced == [store.root / "sha256", fan_out.parent, fan_out]
    assert store.path(digest).read_bytes() == data

    synced.clear()  # a second blob under the same first two hex digits: only its own new directory
    more = next(d for d in (b"%d" % i for i in range(10_000)) if _same_first_not_second(_digest(d), digest))
    other = _digest(more)
    writer = store.writer(other, len(more))
    writer.write(more)
    writer.commit(other)
    assert synced == [fan_out.parent, store.path(other).parent]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _same_first_not_second(a: str, b: str) -> bool:
    """The same first fan-out directory (two hex digits), another second one."""
    return a[:2] == b[:2] and a[2:4] != b[2:4]


def test_a_restart_removes_the_partial_upload_of_a_killed_process_and_keeps_live_ones(tmp_path: Path) -> None:
    """A process killed mid-upload leaves its temp file; the next start removes it (once a minute old), while an
    upload another process still writes into the same directory keeps its file, however old."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "artifacts"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from runledger_server.backends.artifacts import local; "
            "w = local.LocalBlobStore(Path(sys.argv[1])).writer(); w.write(b'x' * 4096); "
            "print('writing', flush=True); time.sleep(60)",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    (orphan,) = (root / "tmp").glob("upload-*")
    live = local.LocalBlobStore(root).writer()  # held by this process, as by another server sharing the directory
    live.write(b"y" * 10)
    young = root / "tmp" / "upload-young"  # unheld, but just created: maybe an upload not yet locked
    young.write_bytes(b"z")
    an_hour_ago = time.time() - 3600
    for p in (orphan, *(root / "tmp").glob("upload-*")):
        if p != young:
            os.utime(p, (an_hour_ago, an_hour_ago))

    local.LocalBlobStore(root)  # the restart

    left = set((root / "tmp").glob("upload-*"))
    assert orphan not in left and young in left and len(left) == 2  # the live upload's file is the other one
    live.commit(hashlib.sha256(b"y" * 10).hexdigest())
    assert _blobs(root) and set((root / "tmp").glob("upload-*")) == {young}
