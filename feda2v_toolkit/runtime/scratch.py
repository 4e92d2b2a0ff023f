"""Reads and writes at an offset of an unlinked temporary file, whole: what waits out of memory (the reduced
cache of :mod:`feda2v_toolkit.training.streams`, the merge tree's halves of :mod:`feda2v_toolkit.runtime.ranks`)."""

from __future__ import annotations

import os


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` (bytes) at ``offset`` of ``fd`` (``pwrite`` until done)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def read_at(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill ``view`` (bytes) from ``offset`` of ``fd``; a file that ends first is an ``OSError`` naming ``what``."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read from {what} at byte {offset + done}")
        done += n
