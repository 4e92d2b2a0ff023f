"""Metrics: reconstruction (R^2, cosine) and distribution comparison (Frechet distance, mean and
covariance gaps, diversity, precision/recall, density/coverage). See ``docs/evaluation.md``.

Sample sets are ``[n, F]`` matrices (flatten sequences first). Everything distribution-level is computed
in float64 from Gram matrices of the centred samples, never from ``F x F`` covariances, so it works
for ``F = l * D`` in the tens of thousands with a few hundred samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from feda2v_toolkit.runtime.linalg import eigh, eigvalsh
from feda2v_toolkit.runtime.threads import few_threads

# -- reconstruction --------------------------------------------------------------------------------


@dataclass
class ReconstructionStats:
    """Running sums for R^2 and cosine similarity over streamed batches of ``[B, L, D]`` sequences.

    * ``r2 = 1 - SSE / SST`` with ``SST`` the squared deviation of every sequence from the **per-position
      (and feature) mean of the scored sequences**: what is specific to each clip. The positional pattern
      every clip shares is not information a reducer keeps -- any decoder that has learned the mean
      sequence reproduces it -- so it is not in the denominator. 1 is perfect, 0 is no better than
      outputting the mean sequence, negative is worse than that.
    * ``r2_about_sequence_mean``: the older figure, ``SST`` about each sequence's own mean over positions
      (it counts the shared positional pattern as kept information, so it flatters decoders that learn
      the mean sequence and nothing else; kept for comparison).
    * ``cosine``: the cosine similarity of each reconstructed token with the original token
      (``[D]`` vectors), averaged over tokens and sequences.
    """

    sse: float = 0.0
    sst_sequence_mean: float = 0.0
    cosine_sum: float = 0.0
    tokens: int = 0
    count: int = 0
    sumsq: float = 0.0
    total: Tensor | None = None  # per-position sums [L, D] (float64)

    def add(self, original: Tensor, reconstruction: Tensor, sst: float | None = None) -> None:
        """Add a batch; ``sst`` (from :func:`sum_squares_about_sequence_mean`) skips recomputing that sum.

        Float32 arithmetic with float64 totals (torch's reductions sum pairwise, so per-batch sums keep
        about 7 significant digits).
        """
        if original.shape != reconstruction.shape:
            raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(reconstruction.shape)}")
        x = original.float().contiguous()
        y = reconstruction.float().contiguous()
        self.sse += float(torch.dist(x, y)) ** 2
        self.sst_sequence_mean += sum_squares_about_sequence_mean(x) if sst is None else sst
        self.sumsq += float(torch.linalg.vector_norm(x)) ** 2
        batch_sum = x.sum(0, dtype=torch.float64)
        self.total = batch_sum if self.total is None else self.total + batch_sum
        self.count += x.shape[0]
        self.cosine_sum += float(token_cosines(x, y).double().sum())
        self.tokens += x.shape[0] * x.shape[1]

    @property
    def sst(self) -> float:
        """``sum ||x - mean_pos||^2`` over the scored sequences (per-position, per-feature mean)."""
        if self.total is None or self.count < 2:
            return 0.0
        return max(self.sumsq - float(self.total.square().sum()) / self.count, 0.0)

    @property
    def r2(self) -> float:
        sst = self.sst
        return 1.0 - self.sse / sst if sst > 0 else float("nan")

    @property
    def r2_about_sequence_mean(self) -> float:
        return 1.0 - self.sse / self.sst_sequence_mean if self.sst_sequence_mean > 0 else float("nan")

    @property
    def cosine(self) -> float:
        return self.cosine_sum / self.tokens if self.tokens else float("nan")


def sum_squares_about_sequence_mean(x: Tensor) -> float:
    """``sum ||x - mean over positions of x||^2`` of a batch ``[B, L, D]``."""
    x = x.float()
    return float(torch.dist(x, x.mean(dim=1, keepdim=True).expand_as(x))) ** 2


def token_cosines(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of corresponding tokens of ``[B, L, D]`` batches: ``[B, L]``."""
    d = x.shape[-1]
    dots = torch.bmm(x.reshape(-1, 1, d), y.reshape(-1, d, 1)).reshape(x.shape[:-1])
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return dots / norms.clamp(min=eps)


def r2_score(original: Tensor, reconstruction: Tensor) -> float:
    """R^2 of ``reconstruction`` about the per-position mean of ``original`` (see :class:`ReconstructionStats`)."""
    stats = ReconstructionStats()
    stats.add(original, reconstruction)
    return stats.r2


# -- Gaussian statistics from samples ----------------------------------------------------------------


def _centred(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean [F], A [n, F])`` with ``A^T A`` the unbiased covariance."""
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples per set")
    mu = x.mean(0)
    return mu, (x - mu) / (x.shape[0] - 1) ** 0.5


def trace_sqrt_product(a: Tensor, b: Tensor) -> float:
    """``tr sqrt(S1^(1/2) S2 S1^(1/2))`` for ``S1 = a^T a``, ``S2 = b^T b`` (``a [n1, F]``, ``b [n2, F]``).

    The non-zero eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` are those of ``S1 S2``, which are the squared
    singular values of ``a b^T`` (``[n1, n2]``); so the trace is the nuclear norm of ``a b^T`` -- exact,
    and stable (no matrix square roots of ill-conditioned matrices, no negative eigenvalues).
    """
    cross = a @ b.T
    with few_threads():
        return float(torch.linalg.svdvals(cross).sum())


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians fitted to sample sets ``x`` and ``y``:

    ``||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x^(1/2) S_y S_x^(1/2))`` (unbiased covariances).
    """
    mx, a = _centred(x)
    my, b = _centred(y)
    value = float((mx - my).square().sum()) + float(a.square().sum()) + float(b.square().sum()) \
        - 2.0 * trace_sqrt_product(a, b)
    return max(value, 0.0)


def frechet_distance_gaussians(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The same distance from means and (symmetric PSD) covariances, via the symmetric product
    ``S1^(1/2) S2 S1^(1/2)`` and its eigenvalues (for small ``F``; tests use it as the closed form)."""
    c1, c2 = cov1.double(), cov2.double()
    w, v = eigh(c1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = eigvalsh(root @ c2 @ root).clamp(min=0).sqrt().sum()
    return float((mu1.double() - mu2.double()).square().sum() + c1.trace() + c2.trace() - 2 * inner)


def mean_gap(x: Tensor, reference: Tensor) -> float:
    """``||mu_x - mu_ref|| / sqrt(tr S_ref)``: the mean difference in units of the reference's RMS spread."""
    mx, _ = _centred(x)
    mr, a = _centred(reference)
    spread = float(a.square().sum()) ** 0.5
    return float((mx - mr).norm()) / spread if spread > 0 else float("nan")


def covariance_gap(x: Tensor, reference: Tensor) -> float:
    """``||S_x - S_ref||_F / ||S_ref||_F``, from Gram matrices: ``||a^T a - b^T b||_F^2 =
    ||a a^T||_F^2 + ||b b^T||_F^2 - 2 ||a b^T||_F^2``."""
    _, a = _centred(x)
    _, b = _centred(reference)
    ref2 = float((b @ b.T).square().sum())
    diff2 = float((a @ a.T).square().sum()) + ref2 - 2 * float((a @ b.T).square().sum())
    return max(diff2, 0.0) ** 0.5 / ref2 ** 0.5 if ref2 > 0 else float("nan")


def mean_pairwise_distance(x: Tensor) -> float:
    """Average Euclidean distance between two different samples of the set (diversity)."""
    x = x.reshape(x.shape[0], -1).double()
    n = x.shape[0]
    if n < 2:
        return float("nan")
    return float(torch.cdist(x, x).sum()) / (n * (n - 1))


# -- manifold metrics -----------------------------------------------------------------------------


def _kth_neighbour_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


@dataclass
class ManifoldMetrics:
    """k-NN manifold metrics (Kynkaanniemi et al. 2019; Naeem et al. 2020), all in [0, 1] except density.

    precision: share of synthetic samples inside some real sample's k-NN ball (fidelity);
    recall: share of real samples inside some synthetic sample's k-NN ball (coverage of the real variety);
    density: how many real balls hold each synthetic sample, / k (about 1 when matched, > 1 = crowded
    in dense real regions); coverage: share of real balls holding at least one synthetic sample.
    """

    precision: float
    recall: float
    density: float
    coverage: float
    k: int


def manifold_metrics(synthetic: Tensor, real: Tensor, k: int = 5) -> ManifoldMetrics:
    """Precision, recall, density and coverage of ``synthetic`` against ``real`` with ``k`` neighbours
    (reduced to ``min(k, n - 1)`` for small sets)."""
    s = synthetic.reshape(synthetic.shape[0], -1).double()
    r = real.reshape(real.shape[0], -1).double()
    k = max(1, min(k, r.shape[0] - 1, s.shape[0] - 1))
    real_radius = _kth_neighbour_radius(r, k)  # [n_real]
    synth_radius = _kth_neighbour_radius(s, k)  # [n_synth]
    d = torch.cdist(s, r)  # [n_synth, n_real]
    inside_real = d <= real_radius.unsqueeze(0)
    inside_synth = d <= synth_radius.unsqueeze(1)
    return ManifoldMetrics(
        precision=float(inside_real.any(dim=1).double().mean()),
        recall=float(inside_synth.any(dim=0).double().mean()),
        density=float(inside_real.double().sum()) / (k * s.shape[0]),
        coverage=float(inside_real.any(dim=0).double().mean()),
        k=k,
    )
