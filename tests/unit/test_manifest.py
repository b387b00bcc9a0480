"""The stored form of a directory manifest, read back."""

from __future__ import annotations

import json

from runledger_server.domain.manifest import ManifestEntry, build, parse


def test_a_canonical_manifest_reads_back_as_itself_and_nothing_else_does() -> None:
    manifest = build([ManifestEntry("b.bin", "b" * 64, 2), ManifestEntry("a.bin", "a" * 64, 1)])
    items = [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in manifest.entries]
    body = json.dumps(items, sort_keys=True, separators=(",", ":")).encode()
    assert parse(body) == manifest
    assert parse(json.dumps(items).encode()) is None  # the same files, spelt otherwise: another digest
    assert parse(json.dumps(items[::-1], sort_keys=True, separators=(",", ":")).encode()) is None  # unsorted
    for other in (b"", b"not json", b"{}", b"[1, 2]", b'[{"path": "a"}]', bytes(range(256))):
        assert parse(other) is None
