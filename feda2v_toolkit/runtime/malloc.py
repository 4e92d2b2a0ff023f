"""Allocator tuning for the CLI's own process (glibc only, best effort).

glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and unmaps them on free, so
a loop that allocates a few hundred MB per batch page-faults (and the kernel zeroes) every byte again on
every batch. Raising the thresholds keeps freed blocks in the heap for reuse: measured on the 2-core
machine, ``generate`` at AST shape writes about twice as fast, and ``train``'s streaming passes spend a
third of the system time (docs/performance.md). Memory stays bounded by the loop's peak working set.
Only CLI commands call this (``generate`` with the default 1 GiB, ``train`` with
:data:`STREAM_BUFFER_BYTES`); the library never changes process-wide allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: what ``train`` keeps for reuse: a read chunk's float32 copy (8 AST clips: 30 MB) and its temporaries;
#: the heap then holds at most twice this in freed blocks
STREAM_BUFFER_BYTES = 64 * 2**20

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


def release_freed_memory() -> bool:
    """Return the heap's freed blocks to the kernel (glibc's ``malloc_trim(0)``); False where that is not
    possible. Changes no setting: called between stages, after a streaming pass whose freed buffers
    :func:`reuse_freed_memory` kept."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
