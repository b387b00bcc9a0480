"""Fewer glibc malloc arenas for the server process: its resident memory stays near what it uses.

glibc gives threads their own arenas (up to 8 per core) and keeps freed memory in each. The server moves
artifacts in megabyte chunks on dozens of pool threads, so freed chunks pile up in many arenas: an S3 upload
of 256 MiB left a peak of 186-213 MiB resident, 166 MiB with two arenas (bench/bench_artifacts.py). Two arenas
cost nothing measurable here: the threads mostly wait on the network, the disk and the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_LOGGER = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2


def limit() -> bool:
    """Cap the arenas at ARENAS unless MALLOC_ARENA_MAX is set (glibc then applies the operator's choice). Call
    it before the server starts its threads; True when glibc took the setting."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_ARENA_MAX, ARENAS))
    _LOGGER.debug("malloc arenas capped at %d: %s", ARENAS, done)
    return done
