"""Small dense linear algebra on one thread.

LAPACK calls on matrices of a few hundred rows (``eigh``, ``svdvals``) take milliseconds on one thread
but can stall for seconds when their thread pool competes with other processes for the cores (measured
on a busy 2-core machine). :func:`few_threads` runs a block with one intra-op thread and restores the
previous setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def few_threads(n: int = 1) -> Iterator[None]:
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
