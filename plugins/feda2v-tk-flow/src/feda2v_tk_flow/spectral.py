"""``dct`` reducer and upsampler: resampling along the sequence by keeping the lowest DCT frequencies.

With ``M_n`` the orthonormal DCT-II matrix of size ``n``, resampling a sequence from length ``a`` to
length ``b`` keeps its ``k = min(a, b)`` lowest cosine coefficients::

    T(a -> b) = sqrt(b / a) * M_b[:k]^T @ M_a[:k]          ([b, a], applied along the sequence axis)

The ``sqrt(b / a)`` keeps amplitudes (a constant sequence stays the same constant). Reducing with
``T(L -> l)`` is an ideal low-pass filter followed by sampling -- no aliasing, unlike pooling -- and
upsampling with ``T(l -> L)`` is band-limited interpolation. The two are a matched pair:
``T(l -> L) @ T(L -> l)`` is the orthogonal projection of a sequence onto its ``l`` lowest
frequencies (the best ``l``-coefficient approximation in the least-squares sense), and
``T(L -> l) @ T(l -> L)`` is the identity. Nothing is learned or fitted.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from feda2v_toolkit.components import Reducer, Upsampler


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix ``[n, n]`` (row ``k`` is frequency ``k``)."""
    pos = torch.arange(n, dtype=torch.float64) + 0.5
    freq = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    m = torch.cos(math.pi / n * freq * pos) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


def resample_matrix(src: int, dst: int) -> Tensor:
    """``T(src -> dst)`` ``[dst, src]`` in float64 (see the module docstring)."""
    k = min(src, dst)
    return math.sqrt(dst / src) * dct_matrix(dst)[:k].T @ dct_matrix(src)[:k]


class _Resampler:
    """A small per-instance cache of resampling matrices by (src, dst, dtype, device)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}

    def __call__(self, x: Tensor, length: int) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected [B, S, D], got shape {tuple(x.shape)}")
        src = x.shape[1]
        if src == length:
            return x
        key = (src, length, x.dtype, x.device)
        matrix = self._cache.get(key)
        if matrix is None:
            if len(self._cache) > 16:
                self._cache.clear()
            matrix = self._cache[key] = resample_matrix(src, length).to(x.device, x.dtype)
        return torch.einsum("ts,bsd->btd", matrix, x)


class DCTReducer(Reducer):
    """Keeps the ``length`` lowest DCT frequencies of each feature along the sequence."""

    def __init__(self, *, length: int) -> None:
        super().__init__(length=length)
        self._resample = _Resampler()

    def forward(self, x: Tensor) -> Tensor:
        return self._resample(x, self.length)


class DCTUpsampler(Upsampler):
    """Band-limited (DCT) interpolation: the matched inverse of the ``dct`` reducer."""

    def __init__(self) -> None:
        super().__init__()
        self._resample = _Resampler()

    def forward(self, x: Tensor, length: int) -> Tensor:
        return self._resample(x, length)
