"""The linear optimum: the best any linear reduction to ``l`` positions can do (position PCA).

A linear reduction over positions maps a sequence ``X [L, D]`` to ``R = W X`` (``W [l, L]``, the same for
every feature), and the best decoder from ``R`` back is affine: ``X^ = b + U R``. Over the training
sequences the squared error is smallest for ``W = V^T``, ``U = V`` and ``b = (I - V V^T) M``, where ``M``
is the mean sequence ``[L, D]`` and ``V [L, l]`` holds the top-``l`` eigenvectors of the position
covariance ``C = sum_n (X_n - M)(X_n - M)^T`` (each of the ``N * D`` columns of the data is one sample
in ``R^L``). That is principal components over positions; ``analyze`` fits it on the training split and
reports it on the held-out split as the reference line. The ``pca`` reducer uses the same fit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from feda2v_toolkit.runtime.linalg import eigh


class PositionMoments:
    """Streaming first and second moments over positions of ``[B, L, D]`` batches (float64 sums)."""

    def __init__(self, length: int, dim: int) -> None:
        self.length = int(length)
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.length, self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.length, self.length, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        """Add a batch ``[B, L, D]``: ``sum += sum_b X_b``, ``outer += sum_b X_b X_b^T``."""
        if x.dim() != 3 or x.shape[1:] != (self.length, self.dim):
            raise ValueError(f"expected [B, {self.length}, {self.dim}], got {tuple(x.shape)}")
        x = x.float()
        cols = x.permute(1, 0, 2).reshape(self.length, -1)  # [L, B*D]: every column a sample in R^L
        self.outer += (cols @ cols.T).double()
        self.sum += x.sum(0).double()
        self.count += x.shape[0]

    def update(self, batches: Iterable[Tensor]) -> PositionMoments:
        for x in batches:
            self.add(x)
        return self

    def mean(self) -> Tensor:
        """The mean sequence ``M [L, D]`` (float64)."""
        if self.count == 0:
            raise ValueError("no sequences were added")
        return self.sum / self.count

    def covariance(self) -> Tensor:
        """``C = sum_n (X_n - M)(X_n - M)^T = outer - N M M^T`` ``[L, L]`` (float64, symmetric)."""
        m = self.mean()
        c = self.outer - self.count * (m @ m.T)
        return (c + c.T) / 2


class PositionPCA:
    """Eigen-decomposition of the position covariance, shared by every reduced length."""

    def __init__(self, moments: PositionMoments) -> None:
        evals, evecs = eigh(moments.covariance())
        order = torch.argsort(evals, descending=True, stable=True)
        self.eigenvalues = evals[order].clamp(min=0)
        vecs = evecs[:, order]
        # a deterministic sign: the largest-magnitude entry of each component is positive
        pivot = vecs.abs().argmax(0)
        signs = torch.sign(vecs[pivot, torch.arange(vecs.shape[1])])
        signs[signs == 0] = 1
        self.components = vecs * signs  # [L, L], column k = k-th component
        self.mean = moments.mean()
        self.total_variance = float(self.eigenvalues.sum())

    def basis(self, length: int) -> Tensor:
        """``V [L, length]`` (float64): the top ``length`` components."""
        if not 1 <= length <= self.components.shape[1]:
            raise ValueError(f"length must be in 1..{self.components.shape[1]}, got {length}")
        return self.components[:, :length]

    def explained(self, length: int) -> float:
        """Share of the position variance (around the mean sequence) the top ``length`` components keep."""
        if self.total_variance <= 0:
            return float("nan")
        return float(self.eigenvalues[:length].sum()) / self.total_variance
