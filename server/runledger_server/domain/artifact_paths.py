"""Artifact paths and digests: what a run may name its files, checked before anything touches storage.

The Python client keeps its own copy of the path rule (runledger.artifacts.path_problem) to refuse a directory
before uploading any of it; tests/unit/test_artifact_paths.py runs both on the same cases.
"""

from __future__ import annotations

import re
import unicodedata

from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.text import is_utf8

# In UTF-8 bytes: the database indexes (run, path), and PostgreSQL refuses an index row over 2704 bytes.
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255  # what a filesystem accepts as one name when the artifact is downloaded
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_C1_CONTROL = re.compile(r"[\x80-\x9f]")  # refused in new paths; stored ones stay readable (see file_path)
INVALID_PATH = "INVALID_ARTIFACT_PATH"
NOT_NFC = "is not in Unicode NFC form (normalise it first: unicodedata.normalize('NFC', ...))"


def _is_nfc(text: str) -> bool:
    """Only one spelling of each name: `café` composed and decomposed would otherwise be two artifacts that
    overwrite each other on a file system that treats them as one name (macOS, Windows)."""
    return unicodedata.is_normalized("NFC", text)


def _problem(path: str) -> str | None:
    """Why `path` is not a valid relative file path, or None when it is."""
    if not path:
        return "is empty"
    if not is_utf8(path):
        return "is not valid Unicode (a lone surrogate: a file name in another encoding?)"
    if len(path.encode()) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes in UTF-8"
    if "\x00" in path:
        return "contains NUL"
    if _CONTROL.search(path):
        return "contains a control character"
    if not _is_nfc(path):
        return NOT_NFC
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


def file_path(path: str, field: str = "path", *, incoming: bool = False) -> str:
    """A file's path within a run: relative, `/`-separated, NFC, no `.`/`..`/empty segments, no backslash or NUL.

    `incoming`: a path about to be stored, which may not hold C1 control characters either (U+0080-U+009F);
    paths stored before that rule stay valid for reading them back."""
    problem = _problem(path)
    if problem is None and incoming and _C1_CONTROL.search(path):
        problem = "contains a control character"
    if problem is not None:
        raise InvalidArgument(f"{field} {path[:200]!r} {problem}", field=field, reason=INVALID_PATH)
    return path


def directory_path(path: str, field: str = "path") -> str:
    """A directory within a run; "" is the run's root and one trailing `/` is dropped."""
    if path == "":
        return ""
    return file_path(path[:-1] if len(path) > 1 and path.endswith("/") else path, field)


def prefix(value: str, field: str = "prefix") -> str:
    """A listing prefix: any leading part of a path, possibly ending inside a segment."""
    if (
        len(value.encode(errors="replace")) > MAX_PATH_BYTES
        or _CONTROL.search(value)
        or value.startswith("/")
        or "\\" in value
    ):
        raise InvalidArgument(
            f"{field} {value[:200]!r} must be a relative '/'-separated prefix of at most {MAX_PATH_BYTES} "
            "bytes in UTF-8 without control characters",
            field=field,
            reason=INVALID_PATH,
        )
    if not _is_nfc(value):  # no stored path is in another form, so such a prefix could only match nothing
        raise InvalidArgument(f"{field} {value[:200]!r} {NOT_NFC}", field=field, reason=INVALID_PATH)
    return value


def sha256_hex(value: str, field: str = "sha256") -> str:
    """A sha256 digest as 64 hex characters (case-insensitive; returned lowercase)."""
    lowered = value.lower()
    if not _SHA256.fullmatch(lowered):
        raise InvalidArgument(f"{field} {value[:80]!r} is not a sha256 hex digest (64 hex characters)", field=field)
    return lowered


def ancestors(path: str) -> list[str]:
    """The directories above a file path: `a/b/c` -> [`a`, `a/b`]."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def within(directory: str) -> str:
    """The prefix every path strictly below `directory` starts with ("" for the root)."""
    return f"{directory}/" if directory else ""


def relative(path: str, directory: str) -> str:
    """`path` relative to `directory`, which must contain it."""
    return path[len(within(directory)) :]
