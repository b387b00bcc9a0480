"""An upload of content already stored, against a real local blob store: whichever way the check of the stored
copy and the upload's bytes interleave, the blob ends up intact, and an abandoned upload changes nothing."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from runledger_server.backends.artifacts.local import LocalBlobStore
from runledger_server.services.duplicate_upload import DuplicateUpload

CHUNK = 64 << 10


def _content(n: int) -> bytes:
    return hashlib.shake_256(b"duplicate").digest(n)


def _store_with(tmp_path: Path, content: bytes, damage: bool) -> tuple[LocalBlobStore, str]:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = hashlib.sha256(content).hexdigest()
    store.put(digest, io.BytesIO(content), len(content))
    if damage:
        path = store.path(digest)
        path.chmod(0o644)
        rotten = bytearray(content)
        rotten[len(content) // 2] ^= 1
        path.write_bytes(bytes(rotten))
    return store, digest


def _feed(writer: DuplicateUpload, content: bytes) -> None:
    for i in range(0, len(content), CHUNK):
        writer.write(content[i : i + CHUNK])


@pytest.mark.parametrize("damage", [False, True], ids=["intact", "damaged"])
@pytest.mark.parametrize("hold", [0, CHUNK, 64 << 20], ids=["written at once", "held a little", "held whole"])
def test_the_stored_blob_ends_up_intact_however_the_check_and_the_upload_interleave(
    tmp_path: Path, damage: bool, hold: int
) -> None:
    content = _content(3 << 20)
    store, digest = _store_with(tmp_path, content, damage)
    writer = DuplicateUpload(store, digest, len(content), lambda: store.writer(digest, len(content)), hold)
    _feed(writer, content)
    assert writer.commit(digest) == store.uri(digest)
    assert store.path(digest).read_bytes() == content
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []  # no temporary copy left


@pytest.mark.parametrize("hold", [0, 64 << 20], ids=["written at once", "held whole"])
def test_an_abandoned_duplicate_upload_leaves_the_store_as_it_was(tmp_path: Path, hold: int) -> None:
    content = _content(1 << 20)
    store, digest = _store_with(tmp_path, content, damage=True)
    before = store.path(digest).read_bytes()
    writer = DuplicateUpload(store, digest, len(content), lambda: store.writer(digest, len(content)), hold)
    _feed(writer, content[: len(content) // 2])
    writer.abort()
    assert store.path(digest).read_bytes() == before
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_stored_copy_that_cannot_be_read_is_replaced(tmp_path: Path) -> None:
    content = _content(1 << 20)
    store, digest = _store_with(tmp_path, content, damage=False)
    store.path(digest).unlink()  # gone between the size check and the read
    writer = DuplicateUpload(store, digest, len(content), lambda: store.writer(digest, len(content)))
    _feed(writer, content)
    writer.commit(digest)
    assert store.path(digest).read_bytes() == content
