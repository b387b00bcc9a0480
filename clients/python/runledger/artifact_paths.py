"""Artifact paths on the client: the server's path rule, checked before a directory is uploaded, and where a
listed artifact may be written locally (below the destination, never overwriting another one).

The server keeps the authoritative copy of the rule (runledger_server/domain/artifact_paths.py), which the
client cannot import: the two are kept in step, and tests/unit/test_artifact_paths.py runs both on the same
cases.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from runledger._convert import sendable
from runledger.errors import FailedPrecondition, InvalidArgument

# Partial downloads and their locks are hidden files with this suffix: a download deletes and resumes only files
# named like this, never a file the user keeps next to the target (`model.bin.part` of another artifact).
PARTIAL_SUFFIX = ".runledger-part"
LOCK_SUFFIX = PARTIAL_SUFFIX + ".lock"
NAME_MAX = 255  # bytes in one file name on common file systems (UTF-16 units on Windows: never more)
# In UTF-8 bytes: the database indexes (run, path), and PostgreSQL refuses an index row over 2704 bytes.
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
INVALID_PATH = "INVALID_ARTIFACT_PATH"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_C1_CONTROL = re.compile(r"[\x80-\x9f]")  # refused in new uploads; paths stored before stay downloadable


def path_problem(path: str) -> str | None:
    """Why the server would refuse `path` as an artifact's path, or None when it accepts it."""
    if not path:
        return "is empty"
    if not sendable(path):
        return "is not valid Unicode (a lone surrogate: a file name in another encoding?)"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes in UTF-8"
    if "\x00" in path:
        return "contains NUL"
    if _CONTROL.search(path):
        return "contains a control character"
    if not unicodedata.is_normalized("NFC", path):
        return "is not in Unicode NFC form (normalise it first: unicodedata.normalize('NFC', ...))"
    if "\\" in path:
        return "contains a backslash (use '/')"
    if path.startswith("/"):
        return "is absolute (it must be relative to the run)"
    for segment in path.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def check_path(path: str, field: str = "path") -> str:
    """`path` when the server accepts it as an artifact's path; InvalidArgument naming `field` otherwise."""
    problem = path_problem(path)
    if problem is not None:
        raise InvalidArgument(f"{field} {path[:200]!r} {problem}", reason=INVALID_PATH, metadata={"field": field})
    return path


def local_target(dest: Path, relative: str) -> Path:
    """Where an artifact listed at `relative` (below the downloaded directory) is written below `dest`.

    The path comes from the server: one that breaks the path rule, or that this system would resolve to
    somewhere other than those names below `dest` (a Windows drive `C:x`, trailing dots, a device name),
    is refused with FailedPrecondition UNSAFE_ARTIFACT_PATH instead of being written wherever it points.
    """
    problem = path_problem(relative)
    if problem is None and not _stays_below(dest, relative.split("/")):
        problem = "does not name a file below the destination on this system"
    if problem is not None:
        raise FailedPrecondition(
            f"the server listed the artifact path {relative[:200]!r}, which {problem}: refusing to write it "
            f"(nothing was written below {dest})",
            reason="UNSAFE_ARTIFACT_PATH",
            metadata={"field": "path", "path": relative[:200]},
        )
    return dest.joinpath(*relative.split("/"))


def colliding_paths(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of paths that name the same file when case and Unicode normalisation are ignored, as on macOS
    and Windows by default: two files, or a file and another file's directory (`Model` and `model/x`)."""
    seen: dict[str, tuple[str, bool]] = {}  # folded name -> (first name seen, is a file)
    clashes: list[tuple[str, str]] = []
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            name, is_file = "/".join(parts[:i]), i == len(parts)
            first, first_is_file = seen.setdefault(_fold(name), (name, is_file))
            if first != name and (is_file or first_is_file):  # directories differing in case just merge
                clashes.append((first, name))
    return clashes


def partial_path(target: Path, suffix: str = PARTIAL_SUFFIX) -> Path:
    """Where `target` is downloaded before its digest is checked: the hidden `.<name>.runledger-part` next to
    it, or a short hidden name derived from the name's hash when that would exceed NAME_MAX (the server accepts
    names of up to 255 bytes). The same target always maps to the same file, so an interrupted download
    resumes. Another `suffix` names another file that goes with the download (its lock)."""
    name = target.name
    if len(os.fsencode(f".{name}{suffix}")) <= NAME_MAX:
        return target.with_name(f".{name}{suffix}")
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    return target.with_name(f".{name[:16]}.{digest}{suffix}")  # at most 79 bytes and the suffix


def refuse_own_names(targets: list[Path]) -> None:
    """Refuse a download whose files include the partial or lock file of another of them: writing one would
    destroy the other's (only a set made on purpose can do it, since those names are hidden and long)."""
    wanted = set(targets)
    for target in targets:
        for own in (partial_path(target), partial_path(target, LOCK_SUFFIX)):
            if own in wanted:
                raise FailedPrecondition(
                    f"the artifact written to {own} has the name of the partial download of {target}: download "
                    "them one by one to other names (nothing was written)",
                    reason="ARTIFACT_PATHS_COLLIDE",
                    metadata={"field": "path", "path": str(own)[:200]},
                )


def nfc(name: str) -> str:
    """A local name as the server wants it: macOS file systems hand out decomposed (NFD) names."""
    return unicodedata.normalize("NFC", name)


def _fold(name: str) -> str:
    return nfc(nfc(name).casefold())


def _stays_below(dest: Path, segments: list[str]) -> bool:
    """Whether this system resolves `dest` joined with `segments` to exactly those names below `dest`."""
    base = os.path.abspath(dest)
    full = os.path.abspath(os.path.join(base, *segments))
    return full == base.rstrip(os.sep) + os.sep + os.sep.join(segments)


def check_upload_plan(root: Path, plan: list[tuple[Path, str]]) -> None:
    """Refuse the whole directory before anything is sent: a path the server would refuse, or two local
    names that are one artifact path once normalised."""
    claimed: dict[str, Path] = {}
    files = {target for _, target in plan}
    for local, target in plan:
        problem = path_problem(target)
        if problem is None and _C1_CONTROL.search(target):
            problem = "contains a control character"
        if problem is None and claimed.setdefault(target, local) != local:
            problem = f"is also the NFC form of {claimed[target]}"
        if problem is None:
            parent = next((d for d in _ancestors(target) if d in files), None)
            if parent is not None:  # `café` a file (NFD on disk) and `café/x` below a directory (NFC)
                problem = f"is below {parent!r}, which is also a file of this directory once normalised"
        if problem is not None:
            raise InvalidArgument(
                f"path {target[:200]!r} (for {local}) {problem}; nothing below {root} was uploaded",
                reason=INVALID_PATH,
                metadata={"field": "path"},
            )


def refuse_collisions(destination: Path, paths: list[str]) -> None:
    """Refuse, before writing anything, paths that would overwrite each other under `destination`."""
    clashes = colliding_paths(paths)
    if not clashes or not ignores_case(destination):
        return
    shown = ", ".join(f"{a!r} and {b!r}" for a, b in clashes[:5]) + (", ..." if len(clashes) > 5 else "")
    raise FailedPrecondition(
        f"{destination} is on a file system that ignores case, where these artifact paths are the same file: "
        f"{shown}; download them to a case-sensitive file system, or one by one to other names "
        "(nothing was written)",
        reason="ARTIFACT_PATHS_COLLIDE",
        metadata={"paths": "\n".join(f"{a}\t{b}" for a, b in clashes)[:2000]},
    )


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def ignores_case(directory: Path) -> bool:
    """Whether files created in `directory` (or the nearest existing directory above it) are found under
    another case. Probed with a temporary file: the platform alone does not say (APFS, NTFS and ext4
    can each be either); when the probe cannot be made, assume the platform's default."""
    by_default = sys.platform in ("darwin", "win32")
    existing = next((p for p in (directory, *directory.parents) if p.is_dir()), None)
    if existing is None:
        return by_default
    try:
        fd, name = tempfile.mkstemp(prefix=".runledger-case-probe-", dir=existing)
    except OSError:
        return by_default
    os.close(fd)
    try:
        probe = Path(name)
        return probe.with_name(probe.name.upper()).exists()
    finally:
        os.unlink(name)
