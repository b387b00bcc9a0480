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
