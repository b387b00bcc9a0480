"""Client-chosen identifiers: run IDs that make a retried CreateRun safe, and writer IDs for metric streams."""

from __future__ import annotations

import logging
import os
import time
import uuid

from runledger import errors
from runledger._convert import sendable

_LOGGER = logging.getLogger(__name__)

MAX_WRITER_ID = 128


def new_run_id() -> str:
    """A UUIDv7 as 32 lowercase hex characters (time-ordered like the server's own IDs)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return f"{value:032x}"


def check_writer_id(writer_id: object, field: str = "writer_id") -> str:
    """The server's rule for a writer ID, checked when it is chosen: once points are buffered under a writer
    ID the server refuses, none of them could be stored."""
    if (
        isinstance(writer_id, str)
        and 0 < len(writer_id) <= MAX_WRITER_ID
        and "\x00" not in writer_id
        and sendable(writer_id)  # a lone surrogate cannot be sent
    ):
        return writer_id
    raise errors.InvalidArgument(
        f"{field} {writer_id!r} is not valid (1-{MAX_WRITER_ID} characters, no NUL, valid Unicode)",
        reason="INVALID_ARGUMENT",
        metadata={"field": field},
    )


def new_writer_id() -> str:
    return uuid.uuid4().hex


def forked_writer_id(parent: str) -> str:
    """A writer ID for a forked child of a writer: recognisably derived from the parent's, and never equal to it."""
    suffix = f"-fork-{uuid.uuid4().hex[:12]}"
    return parent[: MAX_WRITER_ID - len(suffix)] + suffix
