"""Artifact use cases: verified content-addressed uploads, resumable downloads, listings, directory manifests.

An upload is recorded only after its bytes are stored under their sha256 and checked against what the
header declared; an upload refused for its content or header leaves neither a record nor an object behind.
One refused at the very end, because another upload recorded the same path (or a clashing file or
directory) after this one's last check, leaves its stored content without a record: deleting it could pull
it from under a concurrent upload of the same bytes, so it waits for a collector of unreferenced blobs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

from runledger_server.domain import artifact_paths, manifest as manifest_rule, names, paging
from runledger_server.domain.errors import DataLoss, DomainError, InvalidArgument, NotFound
from runledger_server.services.duplicate_upload import DuplicateUpload
from runledger_server.store.artifacts import ArtifactIndex, ArtifactRecord, BlobWriter, StreamingBlobStore
from runledger_server.store.entities import Page

_LOGGER = logging.getLogger(__name__)

MAX_CHUNK = 1 << 20
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
NOT_FOUND = "ARTIFACT_NOT_FOUND"
# A manifest lists ~150 bytes per file: this is a directory of some 400,000 files.
MAX_MANIFEST_BYTES = 64 << 20


class CheckedIndex(ArtifactIndex, Protocol):
    def check(self, run_id: str, path: str, sha256: str | None) -> ArtifactRecord | None:
        """Refuse early what `record` would refuse; the path's existing record, if any."""
        ...

    def run_exists(self, run_id: str) -> bool: ...


class Description(NamedTuple):
    """What a run path holds, for the registry: one file, or a directory addressed by its manifest."""

    sha256: str
    size: int
    uri: str
    is_directory: bool


class ArtifactService:
    def __init__(self, index: CheckedIndex, blobs: StreamingBlobStore) -> None:
        self.index = index
        self.blobs = blobs

    # ---- upload ------------------------------------------------------------------------------
    def begin_upload(self, run_id: str, path: str, size: int | None, sha256: str) -> Upload:
        """Validate the header and refuse what would be refused at the end, before any byte is stored."""
        run_id = names.run_id(run_id)
        path = artifact_paths.file_path(path, incoming=True)
        if size is not None and size < 0:
            raise InvalidArgument(f"size must be >= 0, got {size}", field="size")
        declared = artifact_paths.sha256_hex(sha256) if sha256 else None
        self.index.check(run_id, path, declared)
        writer: BlobWriter
        if declared is not None and size is not None and self.blobs.size(declared) == size:
            # Stored once, unless the stored copy turns out damaged in place: then this upload replaces it.
            writer = DuplicateUpload(self.blobs, declared, size, lambda: self.blobs.writer(declared, size))
        else:  # new content, or a stored blob of another size, broken (cut short): this upload replaces it
            writer = self.blobs.writer(declared, size)
        return Upload(self.index, run_id, path, size, declared, writer)

    # ---- download ----------------------------------------------------------------------------
    def open_download(
        self, run_id: str, path: str, sha256: str, offset: int, *, presign: bool = False
    ) -> tuple[ArtifactRecord, Iterator[bytes], str | None]:
        """The artifact and its bytes from `offset` (the client checks the digest at the end); with `presign`,
        when the store can, a short-lived URL to fetch the bytes from the store directly instead."""
        if offset < 0:
            raise InvalidArgument(f"offset must be >= 0, got {offset}", field="offset")
        record, body = self._locate(run_id, path, sha256)
        if offset > record.size:
            raise InvalidArgument(
                f"offset {offset} is beyond the end of the artifact ({record.size} bytes)",
                field="offset",
                reason="OFFSET_OUT_OF_RANGE",
            )
        if offset == record.size:
            return record, iter(()), None
        if body is not None:  # a manifest: served from the index's copy, small, whatever the blob's state
            return record, iter((body[offset:],)), None
        if presign:
            url = self.blobs.presigned_get(record.sha256)
            if url is not None:
                return record, iter(()), url
        try:
            chunks = self.blobs.open_range(record.sha256, offset)
        except NotFound as exc:
            stored = self.blobs.size(record.sha256)  # an offset past the end of a blob cut short reads as missing
            if stored is not None and stored != record.size:
                raise _damaged(record, f"{stored} bytes, not its recorded {record.size}") from exc
            raise DataLoss(
                f"the content of {_describe(record)} (sha256 {record.sha256}) is missing from the artifact store",
                reason="BLOB_MISSING",
                metadata={"sha256": record.sha256},
            ) from exc
        return record, _Exactly(chunks, record.size - offset, record), None

    def _locate(self, run_id: str, path: str, sha256: str) -> tuple[ArtifactRecord, bytes | None]:
        """The artifact, and a manifest's bytes when the digest is a published manifest's."""
        if sha256 and path:
            raise InvalidArgument(
                "sha256 and path both name an artifact: give run_id and path, or sha256 alone", field="sha256"
            )
        if sha256:
            digest = artifact_paths.sha256_hex(sha256)
            found = self.index.by_digest(digest)
            if found is not None:
                return ArtifactRecord("", "", found.sha256, found.size, found.uri, found.create_time_us), None
            # Only recorded content: bytes in the store without a record (an upload refused at its record, one
            # whose server died first) are not an artifact.
            body = self.index.manifest_body(digest)
            if body is None:
                body = self._earlier_manifest(digest)
            if body is None:
                raise NotFound(f"no artifact or manifest has sha256 {digest}", field="sha256", reason=NOT_FOUND)
            return ArtifactRecord("", "", digest, len(body), self.blobs.uri(digest), 0), body
        run_id = names.run_id(run_id)
        path = artifact_paths.file_path(path)
        record = self.index.get(run_id, path)
        if record is None:
            self._require_run(run_id)
            raise NotFound(f"runs/{run_id}/artifacts/{path} not found", field="path", reason=NOT_FOUND)
        return record, None

    def _earlier_manifest(self, digest: str) -> bytes | None:
        """A manifest published before the index kept manifests (schema 0007): its stored blob, if that is
        intact and a manifest, which is then recorded. A blob of any other bytes is not served."""
        size = self.blobs.size(digest)
        if size is None or size > MAX_MANIFEST_BYTES:
            return None
        body = self._stored_bytes(digest)
        if body is None or manifest_rule.parse(body) is None:
            return None
        self.index.record_manifest(digest, body)
        return body

    def _require_run(self, run_id: str) -> None:
        if not self.index.run_exists(run_id):
            raise NotFound(f"runs/{run_id} not found", field="run_id")

    # ---- listing and manifests ---------------------------------------------------------------
    def list(self, run_id: str, prefix: str, page_size: int, page_token: str) -> Page[ArtifactRecord]:
        size = paging.page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        return self.index.list(names.run_id(run_id), artifact_paths.prefix(prefix), size, page_token)

    def manifest(self, run_id: str, path: str, field: str = "path") -> tuple[str, manifest_rule.Manifest]:
        """The directory (normalised) and the manifest of every file below it; a file is not a directory."""
        run_id = names.run_id(run_id)
        directory = artifact_paths.directory_path(path, field)
        records = self.index.under(run_id, directory)
        if not records:
            if directory and self.index.get(run_id, directory) is not None:
                raise NotFound(
                    f"runs/{run_id}/artifacts/{directory} is a file, not a directory: download it instead",
                    field=field,
                    reason="ARTIFACT_NOT_A_DIRECTORY",
                )
            where = f"under {directory!r}" if directory else "at all"
            raise NotFound(f"runs/{run_id} has no artifacts {where}", field=field, reason=NOT_FOUND)
        entries = [
            manifest_rule.ManifestEntry(artifact_paths.relative(r.path, directory), r.sha256, r.size) for r in records
        ]
        return directory, manifest_rule.build(entries)

    def published_manifest(self, run_id: str, path: str) -> tuple[str, manifest_rule.Manifest]:
        """`manifest()`, with the manifest stored under its digest, so that a download by that digest gives the
        list of files it stands for (content-addressed: storing it again changes nothing). Storing is best
        effort: a read must not fail because the store is full or read-only."""
        directory, manifest = self.manifest(run_id, path)
        try:
            self._publish(manifest)
        except DomainError as exc:
            _LOGGER.warning("manifest %s of runs/%s/%s not stored: %s", manifest.sha256, run_id, directory, exc)
        return directory, manifest

    def _publish(self, manifest: manifest_rule.Manifest) -> str:
        """Record the manifest's bytes in the index, then store its blob (written again when damaged)."""
        body = canonical_manifest(manifest)
        if self.index.manifest_body(manifest.sha256) is None:  # a read: published again, it takes no write lock
            self.index.record_manifest(manifest.sha256, body)
        if self.blobs.size(manifest.sha256) == len(body) and self._stored_bytes(manifest.sha256) == body:
            return self.blobs.uri(manifest.sha256)
        return self.blobs.put(manifest.sha256, io.BytesIO(body), len(body))  # new, or damaged: (re)written

    def _stored_bytes(self, sha256: str) -> bytes | None:
        """A small blob's stored bytes (a manifest's), or None when it cannot be read (then it is written again)."""
        try:
            return b"".join(self.blobs.open_range(sha256, 0))
        except Exception as exc:  # a missing blob, a bad sector, a store that is down: the write will tell
            _LOGGER.warning("stored blob sha256 %s could not be read to compare it: %s", sha256, exc)
            return None

    def describe(
        self,
        run_id: str,
        path: str,
        field: str = "artifact_path",
        before_publish: Callable[[], object] | None = None,
    ) -> Description:
        """A file's digest, or a directory's manifest digest (its content address), for the registry.

        For a directory the manifest itself is published as a blob, so its URI (and a download by its
        sha256) yields the exact list of files the digest stands for, however the directory grows later;
        `size` is then the total size of the files. `before_publish` runs just before that write: a caller's
        last check, so a refused call writes nothing.
        """
        run_id = names.run_id(run_id)
        directory = artifact_paths.directory_path(path, field)
        if directory:
            record = self.index.get(run_id, directory)
            if record is not None:
                return Description(record.sha256, record.size, record.uri, False)
        _, manifest = self.manifest(run_id, directory, field)
        if before_publish is not None:
            before_publish()
        return Description(manifest.sha256, manifest.size, self._publish(manifest), True)


class Upload:
    """One UploadArtifact stream: chunks are hashed as they pass into the blob writer."""

    def __init__(
        self,
        index: CheckedIndex,
        run_id: str,
        path: str,
        size: int | None,
        sha256: str | None,
        writer: BlobWriter,
    ) -> None:
        self._index = index
        self.run_id = run_id
        self.path = path
        self._declared_size = size
        self._declared_sha256 = sha256
        self._writer = writer
        self._digest = hashlib.sha256()
        self.received = 0
        self._open = True

    def write(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:
            if len(chunk) > MAX_CHUNK:
                raise InvalidArgument(
                    f"chunk of {len(chunk)} bytes exceeds the {MAX_CHUNK}-byte limit",
                    field="chunk",
                    reason="CHUNK_TOO_LARGE",
                )
            self.received += len(chunk)
            if self._declared_size is not None and self.received > self._declared_size:
                raise self._size_mismatch()
            self._digest.update(chunk)
            self._writer.write(chunk)

    def finish(self) -> ArtifactRecord:
        """Verify, publish the bytes under their digest, then record the path (see the module's note on a
        refusal at the record itself)."""
        try:
            if self._declared_size is not None and self.received != self._declared_size:
                raise self._size_mismatch()
            actual = self._digest.hexdigest()
            if self._declared_sha256 is not None and actual != self._declared_sha256:
                raise DataLoss(
                    f"uploaded content of {self.path!r} has sha256 {actual}, not the declared {self._declared_sha256}; "
                    "nothing was recorded",
                    field="sha256",
                    reason="DIGEST_MISMATCH",
                    metadata={"expectedSha256": self._declared_sha256, "actualSha256": actual},
                )
            self._index.check(self.run_id, self.path, actual)  # e.g. the same path was recorded meanwhile
            uri = self._writer.commit(actual)
            self._open = False
        except BaseException:
            self.abort()
            raise
        return self._index.record(self.run_id, self.path, actual, self.received, uri)

    def abort(self) -> None:
        if self._open:
            self._open = False
            self._writer.abort()

    def _size_mismatch(self) -> InvalidArgument:
        return InvalidArgument(
            f"the header declared size {self._declared_size} for {self.path!r} but "
            f"{'at least ' if self.received > (self._declared_size or 0) else ''}{self.received} bytes were sent",
            field="size",
            reason="SIZE_MISMATCH",
        )


class _Exactly:
    """The stored bytes of a download, checked to be as many as the record says: a blob cut short (or grown) in
    the store is a DATA_LOSS at the end of the stream, not an OK that only a verifying client would doubt."""

    def __init__(self, chunks: Iterator[bytes], expected: int, record: ArtifactRecord) -> None:
        self._chunks = chunks
        self._left = expected
        self._record = record

    def __iter__(self) -> _Exactly:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            if self._left:
                raise _damaged(
                    self._record, f"{self._left} bytes shorter than its recorded {self._record.size}"
                ) from None
            raise
        self._left -= len(chunk)
        if self._left < 0:
            raise _damaged(self._record, f"{-self._left} bytes longer than its recorded {self._record.size}")
        return chunk

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _damaged(record: ArtifactRecord, how: str) -> DataLoss:
    return DataLoss(
        f"the stored content of {_describe(record)} (sha256 {record.sha256}) is {how} bytes: the artifact store "
        "damaged it; upload the file again to repair it",
        reason="BLOB_DAMAGED",
        metadata={"sha256": record.sha256},
    )


def canonical_manifest(manifest: manifest_rule.Manifest) -> bytes:
    """The bytes whose sha256 is the manifest's digest (the rule of domain/manifest.py)."""
    body = json.dumps(
        [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in manifest.entries],
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    if hashlib.sha256(body).hexdigest() != manifest.sha256:
        raise RuntimeError("canonical manifest encoding disagrees with domain.manifest.build")
    return body


def _describe(record: ArtifactRecord) -> str:
    return f"runs/{record.run_id}/artifacts/{record.path}" if record.run_id else f"sha256 {record.sha256}"
