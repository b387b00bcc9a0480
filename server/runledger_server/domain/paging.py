"""Opaque page tokens over a keyset cursor (AIP-158): never raw offsets, bound to the query they page."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from runledger_server.domain.errors import InvalidArgument
from runledger_server.domain.text import is_utf8

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Longer than any token the server issues (a cursor holds a few short values; see `long_value`), so a forged
# one of megabytes is refused before it is decoded: decoding costs several times its size in memory.
MAX_TOKEN_CHARS = 16 << 10
# A text sort value whose JSON form is longer than this goes into a token as its digest (`long_value`), and the
# value is read again from the database.
MAX_CURSOR_TEXT = 1024
_REREAD = "reread"


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}", field="page_size")
    return min(requested or default, maximum)


def _query_hash(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(cursor: list[Any], query: Any) -> str:
    raw = json.dumps({"c": cursor, "q": _query_hash(query)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, query: Any) -> list[Any] | None:
    """The cursor of a token, or None for the first page; a token from another query is refused."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(
            f"page_token is malformed (longer than any token the server issues: {len(token)} characters)",
            field="page_token",
        )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        cursor, qhash = data["c"], data["q"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # deep nesting: json's recursion limit
        raise InvalidArgument("page_token is malformed", field="page_token") from exc
    if qhash != _query_hash(query):
        raise InvalidArgument(
            "page_token belongs to a different query (filter, order or parent changed)", field="page_token"
        )
    if not isinstance(cursor, list) or not cursor:  # every token names the row it continues after
        raise InvalidArgument("page_token is malformed", field="page_token")
    return cursor


def long_value(value: Any) -> Any:
    """`value` as a cursor holds it: text whose JSON form is longer than MAX_CURSOR_TEXT (a param of up to 1 MiB;
    a non-BMP character takes 12) becomes its sha256, and the page after it reads the value again by the row's key
    (`reread_digest`)."""
    if isinstance(value, str) and len(json.dumps(value)) > MAX_CURSOR_TEXT:
        return {_REREAD: text_digest(value)}
    return value


def reread_digest(value: Any) -> str | None:
    """The digest a cursor holds in place of a long sort value, or None for a value held as it is."""
    if not isinstance(value, dict):
        return None
    digest = value.get(_REREAD)
    if len(value) != 1 or not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return digest


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def fields(cursor: list[Any], *kinds: type | tuple[type, ...]) -> list[Any]:
    """The cursor's values when they have the expected number and types: a token is opaque to its holder, but
    one edited by hand must be refused as malformed, not reach the database as a wrong-typed value."""
    if len(cursor) != len(kinds) or not all(_fits(v, k) for v, k in zip(cursor, kinds, strict=True)):
        raise InvalidArgument("page_token is malformed", field="page_token")
    return cursor


def _fits(value: Any, kind: type | tuple[type, ...]) -> bool:
    """Of the kind, and storable: JSON's true/false are not integers here, integers stay within int64 and
    text has no NUL and no lone surrogate (JSON's "\\ud800", which no UTF-8 text holds): the databases refuse
    both with errors of their own."""
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    if isinstance(value, int):
        return _INT64_MIN <= value <= _INT64_MAX
    if isinstance(value, str):
        return "\x00" not in value and is_utf8(value)
    return True


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
