"""An upload of content already stored, against a real local blob store: an intact stored copy is never
written again, a damaged one (anywhere, or cut short, or grown) ends up replaced by the upload's bytes, and an
abandoned upload changes nothing."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from runledger_server.backends.artifacts.local import LocalBlobStore
from runledger_server.domain.errors import Aborted
from runledger_server.services.duplicate_upload import DuplicateUpload
from runledger_server.store.artifacts import BlobWriter

SIZE = 12 << 20  # larger than any chunk or read size on the way, so the comparison runs over many


def _content(n: int = SIZE) -> bytes:
    return hashlib.shake_256(b"duplicate").digest(n)


class _Store:
    """A local blob store holding `content`, and the duplicate uploads made against it."""

    def __init__(self, root: Path, content: bytes) -> None:
        self.root = root
        self.blobs = LocalBlobStore(root)
        self.content = content
        self.digest = hashlib.sha256(content).hexdigest()
        self.blobs.put(self.digest, io.BytesIO(content), len(content))
        self.writers_opened = 0

    @property
    def path(self) -> Path:
        return self.blobs.path(self.digest)

    def damage(self, stored: bytes) -> None:
        self.path.chmod(0o644)
        self.path.write_bytes(stored)

    def upload(self) -> DuplicateUpload:
        def new_writer() -> BlobWriter:
            self.writers_opened += 1
            return self.blobs.writer(self.digest, len(self.content))

        return DuplicateUpload(self.blobs, self.digest, len(self.content), new_writer)

    def temp_files(self) -> list[Path]:
        return list((self.root / "tmp").iterdir())


def _feed(writer: DuplicateUpload, content: bytes, chunk: int) -> None:
    for i in range(0, len(content), chunk):
        writer.write(content[i : i + chunk])


@pytest.fixture
def store(tmp_path: Path) -> _Store:
    return _Store(tmp_path / "blobs", _content())


@pytest.mark.parametrize("chunk", [1 << 20, (64 << 10) + 7, SIZE], ids=["aligned", "misaligned", "one chunk"])
def test_an_intact_stored_copy_is_not_written_again(store: _Store, chunk: int) -> None:
    before = store.path.stat()
    upload = store.upload()
    _feed(upload, store.content, chunk)
    assert upload.commit(store.digest) == store.blobs.uri(store.digest)
    after = store.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.writers_opened == 0 and store.temp_files() == []


@pytest.mark.parametrize("at", [0, (1 << 20) + 5, SIZE - 1], ids=["first byte", "middle", "last byte"])
@pytest.mark.parametrize("chunk", [1 << 20, (64 << 10) + 7], ids=["aligned", "misaligned"])
def test_a_stored_copy_damaged_anywhere_is_replaced_by_the_uploads_bytes(store: _Store, at: int, chunk: int) -> None:
    rotten = bytearray(store.content)
    rotten[at] ^= 0x10
    store.damage(bytes(rotten))
    upload = store.upload()
    _feed(upload, store.content, chunk)
    upload.commit(store.digest)
    assert store.path.read_bytes() == store.content
    assert store.writers_opened == 1 and store.temp_files() == []


@pytest.mark.parametrize("change", ["cut short", "grown"])
def test_a_stored_copy_that_changed_size_since_the_upload_began_is_replaced(store: _Store, change: str) -> None:
    upload = store.upload()  # the sizes matched when the upload began
    store.damage(store.content[: SIZE // 2] if change == "cut short" else store.content + b"tail")
    _feed(upload, store.content, 1 << 20)
    upload.commit(store.digest)
    assert store.path.read_bytes() == store.content
    assert store.temp_files() == []


def test_a_stored_copy_gone_before_the_upload_is_written_anew(store: _Store) -> None:
    upload = store.upload()
    store.path.unlink()
    _feed(upload, store.content, 1 << 20)
    upload.commit(store.digest)
    assert store.path.read_bytes() == store.content


@pytest.mark.parametrize("damaged", [False, True])
def test_an_abandoned_duplicate_upload_leaves_the_store_as_it_was(store: _Store, damaged: bool) -> None:
    if damaged:
        store.damage(store.content[:-1] + b"\x00")
    before = store.path.read_bytes()
    upload = store.upload()
    _feed(upload, store.content[: SIZE - 100], 1 << 20)  # past the damage, if any: a new write is open
    upload.abort()
    assert store.path.read_bytes() == before
    assert store.temp_files() == []
    with pytest.raises(ValueError):  # nothing may reopen a write once aborted
        upload.write(store.content[-100:])
    assert store.temp_files() == []


def test_a_replacement_whose_matched_part_changed_meanwhile_is_refused_and_leaves_nothing(store: _Store) -> None:
    """The bytes before the first difference are copied from the stored copy, read again: if that copy changed
    in between, the replacement would not hold the content, so it is refused rather than stored."""
    rotten = bytearray(store.content)
    rotten[5 << 20] ^= 1  # the difference that makes the upload replace the copy
    store.damage(bytes(rotten))
    upload = store.upload()
    _feed(upload, store.content[: 2 << 20], 1 << 20)  # compared and equal so far
    rotten[7] ^= 1  # meanwhile the part already compared changes too
    store.damage(bytes(rotten))
    with pytest.raises(Aborted) as info:
        _feed(upload, store.content[2 << 20 :], 1 << 20)
        upload.commit(store.digest)
    upload.abort()  # what the upload's own cleanup does after a refused commit
    assert info.value.reason == "BLOB_CHANGED"
    assert store.path.read_bytes() == bytes(rotten)  # not replaced by bytes that do not match the digest
    assert store.temp_files() == []


@pytest.mark.parametrize("change", ["deleted", "cut short"])
def test_a_copy_gone_or_cut_short_while_being_replaced_is_a_conflict_to_retry(store: _Store, change: str) -> None:
    """Its matched part is read again to start the replacement: if it is gone or shorter, the upload is refused
    as ABORTED BLOB_CHANGED (sent again, it is stored), not NOT_FOUND (final) nor UNAVAILABLE (the store is up)."""
    rotten = bytearray(store.content)
    rotten[5 << 20] ^= 1
    store.damage(bytes(rotten))
    upload = store.upload()
    _feed(upload, store.content[: 2 << 20], 1 << 20)  # compared and equal so far
    if change == "deleted":
        store.path.unlink()
    else:
        store.damage(bytes(rotten[: 1 << 20]))
    with pytest.raises(Aborted) as info:
        _feed(upload, store.content[2 << 20 :], 1 << 20)
    upload.abort()
    assert info.value.reason == "BLOB_CHANGED" and info.value.field == "sha256"
    assert store.temp_files() == []
