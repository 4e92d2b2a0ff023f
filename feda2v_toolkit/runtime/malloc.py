"""Allocator tuning for the CLI's own process (glibc only, best effort).

glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and unmaps them on free, so
a loop that allocates a few hundred MB per batch page-faults (and the kernel zeroes) every byte again on
every batch. Raising the thresholds keeps freed blocks in the heap for reuse: measured on the 2-core
machine, ``generate`` at AST shape writes about twice as fast, and it cuts the system time of ``train``'s
streaming passes by about three quarters (docs/performance.md, "Scale"). Memory stays bounded by the loop's peak working set.
Only CLI commands call these (``generate`` with the default 1 GiB, ``train`` with
:data:`STREAM_BUFFER_BYTES`; :func:`one_arena` also ``convert-data``, ``split``, ``evaluate``, ``analyze`` and
``embed``); the library never changes process-wide allocator settings.
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
_M_ARENA_MAX = -8


_kept = False  # whether this process asked glibc to keep freed blocks (release_freed_memory acts only then)
_libc: list[ctypes.CDLL | None] = []  # the C library, once looked up


def libc() -> ctypes.CDLL | None:
    """The C library (Linux only; ``None`` elsewhere or where it cannot be loaded), looked up once: by its usual
    name first, since ``ctypes.util.find_library`` runs ``ldconfig``. Loaded with ``use_errno``."""
    if not sys.platform.startswith("linux"):
        return None
    if not _libc:
        found = None
        for name in ("libc.so.6", None):
            try:
                found = ctypes.CDLL(name or ctypes.util.find_library("c"), use_errno=True)
                break
            except (OSError, TypeError):
                continue
        _libc.append(found)
    return _libc[0]


def one_arena() -> bool:
    """Ask glibc to serve every thread of the process from one heap (``M_ARENA_MAX`` = 1); False where that is not
    possible. Commands that stream chunks through background threads (the read-ahead reader, the dataset writer)
    call it first thing: with an arena per thread, chunk-sized blocks freed in one heap were not found again by
    the next chunk's allocation in another, and the peak rose in steps as a run went on -- measured on 8,000
    AST clips, ``generate`` 0.91 -> 1.14 GB of anonymous memory over the run, ``convert-data`` 0.49-0.59 GB from
    moment to moment; flat at 0.78 and 0.49 GB with one arena (docs/performance.md, "Scale"). The threads allocate
    little besides the chunks, so they hardly ever wait for one another's allocations."""
    mallopt = getattr(libc(), "mallopt", None)
    return bool(mallopt(_M_ARENA_MAX, 1)) if mallopt is not None else False


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to ``limit_bytes`` for reuse, in one arena (:func:`one_arena`: freed
    blocks are reusable only by allocations from the same heap); False where that is not possible."""
    global _kept
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    one_arena()
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * limit_bytes))
    return _kept


def release_freed_memory() -> bool:
    """Return the heap's freed blocks to the kernel (glibc's ``malloc_trim(0)``) if this process asked to keep
    them (:func:`reuse_freed_memory`, which CLI commands call); False otherwise or where that is not possible.
    Changes no setting: the pipeline calls it between stages, after its passes over full-length sequences."""
    malloc_trim = getattr(libc(), "malloc_trim", None) if _kept else None
    return bool(malloc_trim(0)) if malloc_trim is not None else False
