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
