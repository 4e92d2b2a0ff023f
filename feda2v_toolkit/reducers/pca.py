"""``pca``: position PCA, the optimal linear reduction to ``length`` positions (fitted on training data).

``forward`` returns ``V^T (X - M)``: the coordinates of each sequence's deviation from the mean training
sequence ``M [L, D]`` along the top-``length`` principal components over positions ``V [L, length]``
(see :mod:`feda2v_toolkit.reducers.position_moments`). The reduced "positions" are components, ordered by
variance, not stretches of time: pair ``pca`` with an upsampler that learns its decoder -- ``lstsq``
recovers ``M + V r``, the least-squares optimum -- not with an interpolating one (``linear`` would
interpolate between components, which means nothing). ``inverse`` is the exact decoder.

State (persistent buffers, so model files round-trip): ``basis [L, length]``, ``mean [L, D]``,
``explained [length]`` (variance per component), ``fitted_sequences`` (how many sequences the fit saw).
Fitting streams the training data once and costs ``2 N L^2 D`` flops (about 8 s for 180 AST clips on two
CPU cores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from feda2v_toolkit.components import Reducer
from feda2v_toolkit.reducers.position_moments import PositionMoments, PositionPCA


class PCAReducer(Reducer):
    """Principal components over positions, fitted on full-length training sequences."""

    fitted: ClassVar[bool] = True
    #: the reduced axis holds components, not stretches of the sequence: interpolating it means nothing
    positional: ClassVar[bool] = False

    def __init__(self, *, length: int, full_length: int, dim: int) -> None:
        super().__init__(length=length)
        if length > full_length:
            raise ValueError(f"reduced length {length} exceeds the full length {full_length}")
        self.full_length = int(full_length)
        self.dim = int(dim)
        self.register_buffer("basis", torch.zeros(self.full_length, self.length))
        self.register_buffer("mean", torch.zeros(self.full_length, self.dim))
        self.register_buffer("explained", torch.zeros(self.length))
        self.register_buffer("fitted_sequences", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, length: int, full_length: int, dim: int) -> PCAReducer:
        return cls(length=length, full_length=full_length, dim=dim)

    def init_args(self) -> dict[str, Any]:
        return {"length": self.length, "full_length": self.full_length, "dim": self.dim}

    def fit(self, batches: Callable[[], Iterable[Tensor]]) -> None:
        """One streaming pass over ``batches()`` (float32 ``[B, L, D]``), then an eigen-decomposition."""
        from feda2v_toolkit.runtime.progress import activity, counted

        with activity("fitting the pca reducer", unit="sequence") as bar:
            self.fit_from_statistics(self.fit_statistics(lambda: counted(batches(), bar, lambda x: x.shape[0])))

    def fit_statistics(self, batches: Callable[[], Iterable[Tensor]]) -> dict[str, Tensor]:
        """The position moments of ``batches()`` as float64 sums: sums over parts of the data add up exactly."""
        moments = PositionMoments(self.full_length, self.dim).update(batches())
        return {"sum": moments.sum, "outer": moments.outer, "count": torch.tensor(moments.count, dtype=torch.float64)}

    def fit_from_statistics(self, stats: Mapping[str, Tensor]) -> None:
        """Fit from (summed) :meth:`fit_statistics`: the eigen-decomposition of the summed covariance."""
        moments = PositionMoments(self.full_length, self.dim)
        moments.sum = stats["sum"].to(torch.float64)
        moments.outer = stats["outer"].to(torch.float64)
        moments.count = int(stats["count"])
        self.set_pca(PositionPCA(moments), sequences=moments.count)

    def set_pca(self, pca: PositionPCA, *, sequences: int) -> None:
        """Take the fit from an existing decomposition (``analyze`` shares one across lengths)."""
        with torch.no_grad():
            self.basis.copy_(pca.basis(self.length).to(self.basis))
            self.mean.copy_(pca.mean.to(self.mean))
            self.explained.copy_(pca.eigenvalues[:self.length].to(self.explained))
            self.fitted_sequences.fill_(int(sequences))

    def _check(self, x: Tensor, positions: int, what: str) -> None:
        if int(self.fitted_sequences) == 0:
            raise RuntimeError("the pca reducer is not fitted: call fit() on training sequences first")
        if x.dim() != 3 or x.shape[1] != positions or x.shape[2] != self.dim:
            raise ValueError(f"expected {what} [B, {positions}, {self.dim}], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, self.full_length, "full sequences")
        basis = self.basis.to(x.dtype)
        return torch.matmul(basis.T, x) - basis.T @ self.mean.to(x.dtype)

    def inverse(self, r: Tensor) -> Tensor:
        """``M + V r``: the least-squares reconstruction ``[B, L, D]`` of reduced ``r [B, length, D]``."""
        self._check(r, self.length, "reduced sequences")
        return torch.matmul(self.basis.to(r.dtype), r) + self.mean.to(r.dtype)
