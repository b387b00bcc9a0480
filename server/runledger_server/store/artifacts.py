"""Artifact store interfaces: the blob store (bytes by sha256) and the index ((run, path) -> digest)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from runledger_server.store.entities import Page


@dataclass(frozen=True)
class ArtifactRecord:
    """One recorded file of a run: where its content lives by address."""

    run_id: str
    path: str
    sha256: str
    size: int
    uri: str
    create_time_us: int


class BlobStore(Protocol):
    """Content-addressed bytes. Writes are idempotent per digest; nothing is visible until complete."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int | None:
        """The stored blob's size, or None. Deduplication compares it with the content's size: a blob of another
        size (cut short by a failed write) is replaced, never trusted; one of the same size is re-hashed first."""
        ...

    def put(self, sha256: str, stream: BinaryIO, size: int) -> str:
        """Store a fully known content under its digest, checked on the way in (a stored copy is replaced);
        return its URI."""
        ...

    def open_range(self, sha256: str, offset: int) -> Iterator[bytes]: ...

    def uri(self, sha256: str) -> str: ...

    def delete(self, sha256: str) -> None: ...


class BlobWriter(Protocol):
    """One upload in progress: nothing is visible until `commit`, and `abort` leaves nothing behind."""

    def write(self, data: bytes) -> None: ...

    def commit(self, sha256: str) -> str:
        """Publish the bytes under their digest, replacing what is stored there (they were checked against the
        digest, what is stored may not be); return the URI."""
        ...

    def abort(self) -> None: ...


class StreamingBlobStore(BlobStore, Protocol):
    """A blob store that takes content of unknown digest as a stream."""

    def writer(self, sha256: str | None = None, size: int | None = None) -> BlobWriter:
        """`sha256` and `size`, when the client declared them, let a store write straight to the final
        address and choose its part size."""
        ...

    def presigned_get(self, sha256: str) -> str | None:
        """A short-lived URL from which a client may GET the blob itself, or None."""
        ...


class ArtifactIndex(Protocol):
    """Records which run path holds which content; one transaction per call."""

    def record(self, run_id: str, path: str, sha256: str, size: int, uri: str) -> ArtifactRecord: ...

    def get(self, run_id: str, path: str) -> ArtifactRecord | None: ...

    def by_digest(self, sha256: str) -> ArtifactRecord | None: ...

    def record_manifest(self, sha256: str, body: bytes) -> None:
        """Keep a published directory manifest's bytes (idempotent): the copy a download by its digest serves,
        whatever happens to the blob."""
        ...

    def manifest_body(self, sha256: str) -> bytes | None: ...

    def list(self, run_id: str, prefix: str, page_size: int, page_token: str) -> Page[ArtifactRecord]: ...

    def under(self, run_id: str, directory: str) -> Sequence[ArtifactRecord]:
        """Every file below a directory path (for manifests), sorted by path."""
        ...
