"""Storing content whose digest is known up front: both blob stores check the bytes the same way."""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Protocol

from runledger_server.domain.errors import DataLoss
from runledger_server.store.artifacts import BlobWriter

READ_CHUNK = 1 << 20


class _Store(Protocol):
    def writer(self, sha256: str | None = None, size: int | None = None) -> BlobWriter: ...


def put_verified(store: _Store, sha256: str, stream: BinaryIO, size: int) -> str:
    """Copy `stream` into the store under `sha256`, published (over a stored copy) only if size and digest
    match; the URI. Whether a stored copy is intact is for the caller to decide: its size alone cannot tell."""
    w = store.writer(sha256)
    try:
        digest, total = hashlib.sha256(), 0
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
            total += len(chunk)
            w.write(chunk)
        if total != size or digest.hexdigest() != sha256:
            raise DataLoss(f"content does not match sha256 {sha256} / size {size}", field="sha256")
        return w.commit(sha256)
    except BaseException:
        w.abort()
        raise
