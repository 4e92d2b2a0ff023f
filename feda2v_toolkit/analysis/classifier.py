"""The one downstream classifier of ``analyze`` and ``evaluate``: ridge regression on pooled features.

Features: each full-length sequence ``[L, D]`` is adaptive-average-pooled along the sequence to ``P``
positions (default 64) and flattened to ``P * D`` numbers. Pooling to a fixed number of positions keeps
sequence structure (which frequency band, early or late in a frequency row) while making every
reconstruction comparable with the originals at one resolution.

Classifier: one-hot targets, an unpenalised intercept (features centred on the training mean) and an L2
penalty ``alpha``, solved in the dual (``n x n`` kernel, so ``P * D`` may be large). ``alpha`` is chosen
from a grid ``mean(eig(K)) * 10^[-3..3]`` by exact leave-one-out cross-validation on the training set
(the closed form ``e_i / (1 - h_ii)`` of ridge regression): the grid point with the best LOO accuracy,
ties broken by LOO squared error, then by the larger penalty. No randomness: the same data give the
same predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.runtime.linalg import eigh
from feda2v_toolkit.runtime.threads import few_threads

DEFAULT_POOL_POSITIONS = 64
ALPHA_GRID = tuple(10.0 ** (e / 2) for e in range(-6, 7))  # 1e-3 .. 1e3, half decades


def pooled_features(x: Tensor, positions: int = DEFAULT_POOL_POSITIONS) -> Tensor:
    """``[B, L, D] -> [B, min(P, L) * D]`` float32: adaptive average pooling along the sequence."""
    if x.dim() != 3:
        raise ValueError(f"expected [B, L, D], got shape {tuple(x.shape)}")
    p = min(positions, x.shape[1])
    pooled = F.adaptive_avg_pool1d(x.float().transpose(1, 2), p).transpose(1, 2)
    return pooled.reshape(x.shape[0], -1)


def summary_features(x: Tensor) -> Tensor:
    """``[B, L, D] -> [B, D]`` float32: the clip feature AST's own classification head reads -- the mean of
    the two summary tokens (positions 0 and 1: cls and distillation), as ``ASTForAudioClassification``
    pools ``(h[:, 0] + h[:, 1]) / 2``. Sequences of one token give that token."""
    if x.dim() != 3:
        raise ValueError(f"expected [B, L, D], got shape {tuple(x.shape)}")
    x = x.float()
    return (x[:, 0] + x[:, 1]) / 2 if x.shape[1] > 1 else x[:, 0].clone()


@dataclass
class RidgeClassifier:
    """Multi-class ridge classifier with leave-one-out choice of the penalty (see the module docstring)."""

    num_classes: int
    alphas: tuple[float, ...] = ALPHA_GRID
    alpha: float = field(default=float("nan"), init=False)
    loo_accuracy: float = field(default=float("nan"), init=False)
    _mean: Tensor | None = field(default=None, init=False, repr=False)
    _train: Tensor | None = field(default=None, init=False, repr=False)
    _coef: Tensor | None = field(default=None, init=False, repr=False)
    _intercept: Tensor | None = field(default=None, init=False, repr=False)
    _weights: Tensor | None = field(default=None, init=False, repr=False)

    def fit(self, features: Tensor, labels: Tensor, *, copy: bool = True) -> RidgeClassifier:
        """Fit on ``features`` ``[n, ...]``; ``copy=False`` centres a float32 ``features`` in place (the caller
        hands it over: the classifier keeps it as its training set, so no second copy of ``n x F`` numbers)."""
        x = features.reshape(features.shape[0], -1).float()
        n = x.shape[0]
        if n < 2:
            raise ValueError("the classifier needs at least 2 training samples")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the classifier's training features are not finite (NaN or inf samples)")
        self._mean = (x.sum(0, dtype=torch.float64) / n).float()
        # float32: the kernel's float32 products over F features are exact to ~1e-6
        xc = x - self._mean if copy else x.sub_(self._mean)
        kernel = (xc @ xc.T).double()
        if not bool(torch.isfinite(kernel).all()):  # float32 products overflow on huge (e.g. very noisy) samples
            kernel = xc.double() @ xc.double().T
        self._solve(kernel, labels)
        self._train, self._weights = xc, None
        return self

    def fit_rows(self, read: Callable[[int, int], Tensor], n: int, labels: Tensor, *, block: int
                 ) -> RidgeClassifier:
        """Fit on ``n`` training rows that are never all in memory: ``read(lo, hi)`` returns rows ``lo .. hi``
        ``[hi - lo, F]`` float32 (e.g. from a temporary file), ``block`` rows at a time. The kernel is taken
        block by block (the same float32 products as :meth:`fit`, summed per block) and the classifier keeps
        its primal weights ``X_c^T coef`` (``F x C`` float64), not the rows."""
        if n < 2:
            raise ValueError("the classifier needs at least 2 training samples")
        block = max(1, int(block))
        starts = list(range(0, n, block))
        total: Tensor | None = None
        for lo in starts:
            x = read(lo, min(lo + block, n))
            if not bool(torch.isfinite(x).all()):
                raise ValueError("the classifier's training features are not finite (NaN or inf samples)")
            part = x.sum(0, dtype=torch.float64)
            total = part if total is None else total.add_(part)
        assert total is not None
        self._mean = (total / n).float()
        kernel = torch.empty(n, n, dtype=torch.float64)
        for i, lo in enumerate(starts):
            hi = min(lo + block, n)
            xi = read(lo, hi).sub_(self._mean)
            for lo2 in starts[:i + 1]:
                hi2 = min(lo2 + block, n)
                xj = xi if lo2 == lo else read(lo2, hi2).sub_(self._mean)
                k = (xi @ xj.T).double()
                if not bool(torch.isfinite(k).all()):  # as fit(): float32 products overflowed
                    k = xi.double() @ xj.double().T
                kernel[lo:hi, lo2:hi2] = k
                kernel[lo2:hi2, lo:hi] = k.T
        self._solve(kernel, labels)
        assert self._coef is not None
        del kernel
        weights = torch.zeros(self._mean.numel(), self._coef.shape[1], dtype=torch.float64)
        for lo in starts:
            hi = min(lo + block, n)
            weights += read(lo, hi).sub_(self._mean).double().T @ self._coef[lo:hi]
        self._weights, self._train = weights, None
        return self

    def _solve(self, kernel: Tensor, labels: Tensor) -> None:
        """The penalty by exact leave-one-out over the grid, and the dual coefficients, from the centred
        training kernel ``[n, n]`` float64."""
        n = kernel.shape[0]
        y = F.one_hot(labels.long(), self.num_classes).double()
        y_mean = y.mean(0)
        yc = y - y_mean
        with few_threads():
            evals, evecs = eigh(kernel)
        evals = evals.clamp(min=0)
        scale = float(evals.mean()) or 1.0
        qty = evecs.T @ yc  # [n, C]
        # every grid point at once (few large ops rather than many small ones)
        alphas = torch.tensor(self.alphas, dtype=torch.float64) * scale  # [A]
        shrink = evals / (evals + alphas.unsqueeze(1))  # [A, n]
        fitted = torch.matmul(evecs, shrink.unsqueeze(2) * qty) + y_mean  # [A, n, C]
        leverage = shrink @ evecs.square().T + 1.0 / n  # [A, n]
        loo = y - (y - fitted) / (1.0 - leverage).clamp(min=1e-12).unsqueeze(2)
        accs = (loo.argmax(2) == labels.long()).double().mean(1).tolist()
        mses = (loo - y).square().mean((1, 2)).tolist()
        best = max(zip(accs, [-m for m in mses], alphas.tolist(), strict=True))
        self.loo_accuracy, self.alpha = best[0], best[2]
        self._coef = evecs @ (qty / (evals + self.alpha).unsqueeze(1))  # dual coefficients [n, C]
        self._intercept = y_mean

    def decision_function(self, features: Tensor) -> Tensor:
        if self._coef is None or self._mean is None or self._intercept is None or \
                (self._train is None and self._weights is None):
            raise RuntimeError("fit the classifier first")
        flat = features.reshape(features.shape[0], -1)
        if self._weights is not None:  # fitted from rows (fit_rows): primal weights, a block of rows at a time
            out = torch.empty(flat.shape[0], self._weights.shape[1], dtype=torch.float64)
            for lo in range(0, flat.shape[0], 256):
                out[lo:lo + 256] = (flat[lo:lo + 256].float() - self._mean).double() @ self._weights
            return out + self._intercept
        assert self._train is not None
        x = flat.float() - self._mean
        return (x @ self._train.T).double() @ self._coef + self._intercept

    def predict(self, features: Tensor) -> Tensor:
        return self.decision_function(features).argmax(1)

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        if labels.numel() == 0:
            return float("nan")
        return float((self.predict(features) == labels.long()).double().mean())

