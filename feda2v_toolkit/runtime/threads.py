"""Threads and the math libraries under torch's CPU ops.

LAPACK calls on matrices of a few hundred rows (``eigh``, ``svdvals``) take milliseconds on one thread
but can stall for seconds when their thread pool competes with other processes for the cores (measured
on a busy 2-core machine). :func:`few_threads` runs a block with one intra-op thread and restores the
previous setting.

:func:`settle_vector_math` works around a race in oneMKL's vector math (VML), which torch's CPU unary ops
(``sqrt``, ``exp``, ``log``, ...) on contiguous float tensors call from each intra-op thread on its chunk:
oneMKL picks each function's kernel on its first call, and when that first call runs on several threads at
once one thread can compute its whole chunk with a low-accuracy kernel (pytorch/pytorch#188792; errors of
up to thousands of ulp). Measured here: ``train`` at AST shape wrote a model differing in the last bits in
about one run in six, and ``torch.sqrt`` of the same float64 vector differed between fresh processes in two
of ten; with every function called once on one thread first, neither varied.
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


#: torch's unary ops that call oneMKL's vector math for float tensors (aten/src/ATen/cpu/vml.h)
VML_OPS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "floor",
           "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt", "sigmoid", "sin",
           "sinh", "sqrt", "tan", "tanh", "trunc")
_SETTLED = {"done": False}


def settle_vector_math() -> None:
    """Call every vector-math function torch's CPU ops use once, on one thread, in float32 and float64, so
    that oneMKL resolves its kernels before any op runs them on several threads (module docstring). Cheap
    (a few milliseconds, once per process); the commands and pipelines that promise the same bytes call it."""
    if _SETTLED["done"]:
        return
    with few_threads(1):
        for dtype in (torch.float32, torch.float64):
            x = torch.full((4096,), 0.5, dtype=dtype)
            for name in VML_OPS:
                getattr(torch, name)(x)
    _SETTLED["done"] = True
