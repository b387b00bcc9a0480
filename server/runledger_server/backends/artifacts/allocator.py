"""Keep glibc from handing transfer buffers back to the kernel between chunks.

Artifact transfers allocate and free megabyte-sized buffers (gRPC chunks, multipart parts) on several
threads, chunk after chunk. With glibc's defaults such buffers are mmapped, or trimmed off a thread
arena's top as soon as they are freed, so every chunk page-faults its memory in again: measured here,
4-5 page faults per transferred page, which doubled to tripled the server's CPU time per byte. Serving
blocks of up to 32 MiB from the arenas and trimming only above 32 MiB of free top memory makes the
buffers reused instead, with a bounded amount of idle memory kept (at most 32 MiB per arena). Only
glibc has `mallopt`; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

_LOGGER = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# glibc's dynamic thresholds rise this far by themselves (32 MiB mmap, 64 MiB trim) in a process that
# frees large blocks; fixing them from the start, with a top pad, is all that changes. The number of arenas
# is left alone: an embedded server shares its process with the user's threads.
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 32 << 20), (M_TOP_PAD, 8 << 20))
_done = False


def keep_transfer_buffers() -> bool:
    """Tune glibc malloc once per process; True when it took effect."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = all(mallopt(param, value) for param, value in SETTINGS)
    _LOGGER.debug("glibc malloc tuned for transfer buffers: %s", _done)
    return _done
