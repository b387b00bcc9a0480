"""The content address of a directory: sha256 of the canonical JSON of its sorted (path, sha256, size)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative to the directory, `/`-separated
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]
    sha256: str
    size: int


def build(entries: Iterable[ManifestEntry]) -> Manifest:
    """Order-independent: the same files give the same digest however they were uploaded."""
    ordered = tuple(sorted(entries, key=lambda e: e.path))
    canonical = json.dumps(
        [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in ordered],
        sort_keys=True,
        separators=(",", ":"),
    )
    return Manifest(ordered, hashlib.sha256(canonical.encode()).hexdigest(), sum(e.size for e in ordered))


def parse(body: bytes) -> Manifest | None:
    """Stored bytes back to the manifest they encode, or None when they are not a manifest in the canonical form
    `build` hashes (another file's bytes, or a damaged copy): their sha256 then tells them apart."""
    try:
        items = json.loads(body)
        entries = [ManifestEntry(str(i["path"]), str(i["sha256"]), int(i["size"])) for i in items]
    except (ValueError, TypeError, KeyError):
        return None
    manifest = build(entries)
    return manifest if manifest.sha256 == hashlib.sha256(body).hexdigest() else None
