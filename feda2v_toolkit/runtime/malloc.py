"""Allocator tuning for the ``generate`` command's own process (glibc only, best effort).

glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and unmaps them on free, so
a loop that allocates a few hundred MB per batch page-faults every byte again on every batch. Raising
the thresholds keeps freed blocks in the heap for reuse: measured on the 2-core machine, ``generate``
at AST shape writes about twice as fast (docs/performance.md). Memory stays bounded by the loop's peak
working set. Only CLI commands call this; the library never changes process-wide allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to ``limit_bytes`` for reuse; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * limit_bytes))
