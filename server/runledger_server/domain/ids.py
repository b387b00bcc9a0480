"""Identifiers that need no coordination between replicas: time-ordered UUIDv7 in hex."""

from __future__ import annotations

import os
import time


def new_id(now_ms: int | None = None) -> str:
    """A UUIDv7 as 32 lowercase hex characters: sortable by creation time, random within a millisecond."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return f"{value:032x}"
