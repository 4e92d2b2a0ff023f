"""Metrics: reconstruction (R^2, cosine) and distribution comparison (Frechet distance, mean and
covariance gaps, diversity, precision/recall, density/coverage). See ``docs/evaluation.md``.

Sample sets are ``[n, F]`` matrices (flatten sequences first). Everything distribution-level is computed
in float64 from Gram matrices of the centred samples, never from ``F x F`` covariances, so it works
for ``F = l * D`` in the tens of thousands with a few hundred samples.
"""

from __future__ import annotations

from collections.abc import Iterator
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

#: rows converted to float64 at a time: at most 16 MB a block (341 rows of 16 x 768 numbers), so no float64
#: copy of a whole set
BLOCK_BYTES = 2**24
#: rows whose distances to a whole set (and whose float64 sums) are taken at a time
DISTANCE_ROWS = 256


def _distance_blocks(a: Tensor, b: Tensor, rows: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(i, j, cdist(a[i:i + rows], b[j:j + rows]))`` in float64 over every pair of blocks of rows."""
    for i in range(0, a.shape[0], rows):
        left = a[i:i + rows].double()
        for j in range(0, b.shape[0], rows):
            yield i, j, torch.cdist(left, b[j:j + rows].double())


def nearest_distances(x: Tensor, reference: Tensor, rows: int = DISTANCE_ROWS) -> Tensor:
    """Euclidean distance from each row of ``x`` ``[n, ...]`` to its nearest row of ``reference`` (float64),
    ``rows`` x ``rows`` blocks at a time (no float64 copy of either set)."""
    a, b = _flat(x), _flat(reference)
    out = torch.full((a.shape[0],), float("inf"), dtype=torch.float64)
    for i, _, d in _distance_blocks(a, b, rows):
        torch.minimum(out[i:i + rows], d.min(dim=1).values, out=out[i:i + rows])
    return out


def nearest_both_ways(x: Tensor, reference: Tensor, rows: int = DISTANCE_ROWS) -> tuple[Tensor, Tensor]:
    """``(nearest_distances(x, reference), nearest_distances(reference, x))`` from one pass over the
    distances between the two sets (each block's row and column minima). The first is bit for bit
    ``nearest_distances(x, reference)``; the second comes from the same ``cdist(x, reference)`` blocks, so it
    may differ from ``nearest_distances(reference, x)`` in the last bits."""
    a, b = _flat(x), _flat(reference)
    out_a = torch.full((a.shape[0],), float("inf"), dtype=torch.float64)
    out_b = torch.full((b.shape[0],), float("inf"), dtype=torch.float64)
    for i, j, d in _distance_blocks(a, b, rows):
        torch.minimum(out_a[i:i + rows], d.min(dim=1).values, out=out_a[i:i + rows])
        torch.minimum(out_b[j:j + rows], d.min(dim=0).values, out=out_b[j:j + rows])
    return out_a, out_b


def principal_directions(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(mean [F], basis [F, k])``: the mean of ``x`` ``[n, F]`` and its top ``k`` principal directions
    (right singular vectors of the centred rows, signs arbitrary), from the centred Gram matrix's
    eigenvectors -- float64 blocks, never a float64 copy of ``x``."""
    mu = _mean(x)
    w, u = eigh(_gram(x, mu))  # ascending
    top = torch.arange(w.numel() - 1, w.numel() - 1 - k, -1)
    u, s = u[:, top], w[top].clamp(min=0).sqrt()
    basis = torch.zeros(x.shape[1], k, dtype=torch.float64)
    for i, block in _blocks(x, mu):
        basis += block.T @ u[i:i + block.shape[0]]
    kept = s > s.max() * 1e-5  # beyond x's rank (Gram eigenvalues at round-off): a zero column, not amplified noise
    return mu, torch.where(kept, basis / torch.where(kept, s, torch.ones_like(s)), torch.zeros_like(basis))


def project(x: Tensor, mu: Tensor, basis: Tensor) -> Tensor:
    """``(x - mu) @ basis`` (float64) a block of rows at a time."""
    return torch.cat([block @ basis for _, block in _blocks(_flat(x), mu)]) if x.shape[0] else \
        torch.empty(0, basis.shape[1], dtype=torch.float64)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _mean(x: Tensor) -> Tensor:
    """Float64 mean of the rows of ``x`` ``[n, F]``, summed a block at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], DISTANCE_ROWS):
        total += x[i:i + DISTANCE_ROWS].sum(0, dtype=torch.float64)
    return total / x.shape[0]


def _blocks(x: Tensor, mu: Tensor, stop: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(start, rows - mu)`` in float64 for ``x``'s rows ``[0, stop)``, one block of at most
    :data:`BLOCK_BYTES` at a time."""
    end = x.shape[0] if stop is None else stop
    step = max(1, BLOCK_BYTES // (8 * x.shape[1]))
    for i in range(0, end, step):
        yield i, x[i:min(i + step, end)].to(torch.float64, copy=True).sub_(mu)


def _gram(a: Tensor, mu_a: Tensor, b: Tensor | None = None, mu_b: Tensor | None = None) -> Tensor:
    """``(a - mu_a)(b - mu_b)^T`` in float64 ``[n_a, n_b]`` (``b`` defaults to ``a``), from float64 blocks
    of at most :data:`BLOCK_BYTES`: memory is the result and two blocks, not a float64 copy of the data."""
    out = torch.empty(a.shape[0], a.shape[0] if b is None else b.shape[0], dtype=torch.float64)
    for i, x in _blocks(a, mu_a):
        if b is None:  # symmetric: the lower triangle of blocks, mirrored
            for j, y in _blocks(a, mu_a, stop=i + x.shape[0]):
                block = x @ y.T
                out[i:i + x.shape[0], j:j + y.shape[0]] = block
                out[j:j + y.shape[0], i:i + x.shape[0]] = block.T
        else:
            assert mu_b is not None
            for j, y in _blocks(b, mu_b):
                out[i:i + x.shape[0], j:j + y.shape[0]] = x @ y.T
    return out


@dataclass
class SetFigures:
    """What the distribution metrics need of one sample set ``x [n, F]``, taken from its centred Gram
    matrix while it is held; the Gram itself is not kept (:func:`pair_figures` holds one ``n x n`` matrix at
    a time).

    ``mean``: float64 ``[F]``; ``trace`` and ``sum_squares``: of the Gram (``tr`` and ``||.||_F^2`` of the
    scatter ``(x - mean)^T (x - mean)``); ``norms2``: its diagonal, the centred rows' squared norms;
    ``radius``: each row's distance to its ``k``-th nearest other row (when asked); ``diversity``: the mean
    distance between two different rows; ``halves``: the Frechet distance between two seeded random halves
    (when asked: the sampling-noise reference).
    """

    n: int
    mean: Tensor
    trace: float
    sum_squares: float
    norms2: Tensor
    diversity: float
    radius: Tensor | None = None
    halves: float | None = None

    @classmethod
    def of(cls, x: Tensor, *, k: int | None = None, halves_seed: int | None = None) -> SetFigures:
        x = _flat(x)
        if x.shape[0] < 2:
            raise ValueError("need at least 2 samples per set")
        mu = _mean(x)
        gram = _gram(x, mu)
        out = cls(n=x.shape[0], mean=mu, trace=float(gram.diagonal().sum()), sum_squares=_sum_squares(gram),
                  norms2=gram.diagonal().clone(), diversity=mean_pairwise_distance(x, gram),
                  radius=None if k is None else _kth_neighbour_radius(gram, k),
                  halves=None if halves_seed is None else frechet_of_halves(gram, halves_seed))
        del gram
        return out


@dataclass
class PairFigures:
    """Every distribution metric of a synthetic set ``s`` against a real set ``r`` (see
    :func:`pair_figures`)."""

    s: SetFigures
    r: SetFigures
    frechet: float
    mean_gap: float  # ||mu_s - mu_r|| / sqrt(tr S_r)
    covariance_gap: float  # ||S_s - S_r||_F / ||S_r||_F (unbiased covariances)
    manifold: ManifoldMetrics | None


def pair_figures(s: Tensor, r: Tensor, *, k: int | None = None, halves_seed: int | None = None) -> PairFigures:
    """The distribution metrics of ``s [n_s, ...]`` against ``r [n_r, ...]`` from centred Gram matrices
    (float64), **one at a time**: ``s``'s own (its figures taken, then released), ``r``'s, then the cross Gram
    ``(s - mu_s)(r - mu_r)^T``, whose singular values give the Frechet distance last. Memory: the largest
    ``n x n`` matrix and its decomposition's copy, whatever ``F``.

    ``k``: also the k-NN manifold metrics (reduced to ``min(k, n - 1)`` for small sets); ``halves_seed``: also
    the Frechet distance between two random halves of ``r``. The cross Gram turns into distances between
    raw rows with ``s_shift = (s - mu_s).(mu_s - mu_r)`` and ``r_shift = (r - mu_r).(mu_s - mu_r)``.
    """
    s, r = _flat(s), _flat(r)
    if s.shape[0] < 2 or r.shape[0] < 2:
        raise ValueError("need at least 2 samples per set")
    if k is not None:
        k = max(1, min(k, r.shape[0] - 1, s.shape[0] - 1))
    fs = SetFigures.of(s, k=k)
    fr = SetFigures.of(r, k=k, halves_seed=halves_seed)
    diff = fs.mean - fr.mean
    mean_diff2 = float(diff.square().sum())
    s_shift = project(s, fs.mean, diff.unsqueeze(1)).squeeze(1)
    r_shift = project(r, fr.mean, diff.unsqueeze(1)).squeeze(1)
    cross = _gram(s, fs.mean, r, fr.mean)
    manifold = None
    if k is not None:
        manifold = _manifold(cross, fs, fr, mean_diff2, s_shift, r_shift, k)
    ws, wr = 1.0 / (fs.n - 1), 1.0 / (fr.n - 1)
    ref2 = fr.sum_squares * wr * wr
    diff2 = fs.sum_squares * ws * ws + ref2 - 2 * _sum_squares(cross) * ws * wr
    spread = fr.trace / (fr.n - 1)
    frechet = _frechet_from_traces(fs.trace, fr.trace, fs.n, fr.n, cross, mean_diff2)
    return PairFigures(s=fs, r=fr, frechet=frechet,
                       mean_gap=mean_diff2 ** 0.5 / spread ** 0.5 if spread > 0 else float("nan"),
                       covariance_gap=max(diff2, 0.0) ** 0.5 / ref2 ** 0.5 if ref2 > 0 else float("nan"),
                       manifold=manifold)


def _cross_distances(cross: Tensor, fs: SetFigures, fr: SetFigures, mean_diff2: float, s_shift: Tensor,
                     r_shift: Tensor, rows: slice) -> Tensor:
    """Euclidean distances ``[len(rows), n_r]`` from rows ``rows`` of ``s`` to every row of ``r``."""
    d2 = (fs.norms2[rows].unsqueeze(1) + fr.norms2.unsqueeze(0) + mean_diff2
          - 2 * cross[rows] + 2 * s_shift[rows].unsqueeze(1) - 2 * r_shift.unsqueeze(0))
    return d2.clamp_(min=0).sqrt_()


def _self_distances(gram: Tensor, rows: slice) -> Tensor:
    """Distances ``[len(rows), n]`` between rows ``rows`` and every row of a set, from its centred Gram."""
    diag = gram.diagonal()
    d2 = diag[rows].unsqueeze(1) + diag.unsqueeze(0) - 2 * gram[rows]
    return d2.clamp_(min=0).sqrt_()


def _row_slices(n: int) -> list[slice]:
    return [slice(i, min(i + DISTANCE_ROWS, n)) for i in range(0, n, DISTANCE_ROWS)]


def _frechet_from_traces(tr1: float, tr2: float, n1: int, n2: int, g12: Tensor, mean_diff2: float) -> float:
    """Frechet distance from the traces of two sets' centred Grams, their centred cross Gram ``g12`` and mean
    difference: ``||mu_1 - mu_2||^2 + tr S_1 + tr S_2 - 2 ||a b^T||_*`` with ``a = (x_1 - mu_1) / sqrt(n_1 - 1)``."""
    nuclear = _nuclear_norm(g12) / ((n1 - 1) * (n2 - 1)) ** 0.5
    return max(mean_diff2 + tr1 / (n1 - 1) + tr2 / (n2 - 1) - 2.0 * nuclear, 0.0)


def _sum_squares(t: Tensor) -> float:
    """The sum of the squared entries (a reduction: no squared copy of an ``n x n`` matrix)."""
    return float(torch.linalg.vector_norm(t)) ** 2


def _recentre(g: Tensor) -> Tensor:
    """Double-centre a Gram block in place: rows and columns about their own means."""
    row, col, total = g.mean(0, keepdim=True), g.mean(1, keepdim=True), g.mean()
    return g.sub_(row).sub_(col).add_(total)


def frechet_of_subsets(gram: Tensor, first: Tensor, second: Tensor) -> float:
    """Frechet distance between two subsets (row indices) of one set, from its centred Gram matrix."""
    g11, g22, g12 = (gram[a.unsqueeze(1), b] for a, b in ((first, first), (second, second), (first, second)))
    mean_diff2 = float(g11.mean() + g22.mean() - 2 * g12.mean())
    tr1, tr2 = float(_recentre(g11).diagonal().sum()), float(_recentre(g22).diagonal().sum())
    n1, n2 = g11.shape[0], g22.shape[0]
    del g11, g22  # only their traces are needed: the decomposition's copy of g12 takes their place
    return _frechet_from_traces(tr1, tr2, n1, n2, _recentre(g12), max(mean_diff2, 0.0))


def frechet_of_halves(gram: Tensor, seed: int) -> float | None:
    """Frechet distance between two seeded random halves of a set (its centred Gram): the sampling-noise
    reference; None below 4 rows."""
    if gram.shape[0] < 4:
        return None
    perm = torch.randperm(gram.shape[0], generator=torch.Generator().manual_seed(seed))
    half = gram.shape[0] // 2
    return frechet_of_subsets(gram, perm[:half], perm[half:2 * half])


def trace_sqrt_product(a: Tensor, b: Tensor) -> float:
    """``tr sqrt(S1^(1/2) S2 S1^(1/2))`` for ``S1 = a^T a``, ``S2 = b^T b`` (``a [n1, F]``, ``b [n2, F]``).

    The non-zero eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` are those of ``S1 S2``, which are the squared
    singular values of ``a b^T`` (``[n1, n2]``); so the trace is the nuclear norm of ``a b^T`` -- exact,
    and stable (no matrix square roots of ill-conditioned matrices, no negative eigenvalues).
    """
    return _nuclear_norm(a @ b.T)


def _nuclear_norm(cross: Tensor) -> float:
    """The sum of the singular values of ``cross`` (see :func:`trace_sqrt_product` for why it is the trace term)."""
    with few_threads():
        return float(torch.linalg.svdvals(cross).sum())


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians fitted to sample sets ``x`` and ``y``:

    ``||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x^(1/2) S_y S_x^(1/2))`` (unbiased covariances),
    the trace term as the nuclear norm of the cross Gram matrix (:func:`trace_sqrt_product`).
    """
    return pair_figures(x, y).frechet


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
    return pair_figures(x, reference).mean_gap


def covariance_gap(x: Tensor, reference: Tensor) -> float:
    """``||S_x - S_ref||_F / ||S_ref||_F``, from Gram matrices: ``||a^T a - b^T b||_F^2 =
    ||a a^T||_F^2 + ||b b^T||_F^2 - 2 ||a b^T||_F^2``."""
    return pair_figures(x, reference).covariance_gap


def mean_pairwise_distance(x: Tensor, gram: Tensor | None = None) -> float:
    """Average Euclidean distance between two different samples of the set (diversity); ``gram``: the
    set's centred Gram matrix when already computed."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    g = _gram(_flat(x), _mean(_flat(x))) if gram is None else gram
    return sum(float(_self_distances(g, rows).sum()) for rows in _row_slices(n)) / (n * (n - 1))


# -- manifold metrics -----------------------------------------------------------------------------


def _kth_neighbour_radius(gram: Tensor, k: int) -> Tensor:
    """Distance from each row to its ``k``-th nearest other row, a block of rows at a time."""
    return torch.cat([_self_distances(gram, rows).kthvalue(k + 1, dim=1).values  # +1: the point itself
                      for rows in _row_slices(gram.shape[0])])


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
    manifold = pair_figures(synthetic, real, k=k).manifold
    assert manifold is not None
    return manifold


def _manifold(cross: Tensor, fs: SetFigures, fr: SetFigures, mean_diff2: float, s_shift: Tensor,
              r_shift: Tensor, k: int) -> ManifoldMetrics:
    """The manifold metrics from the cross Gram and each set's k-NN radii, a block of synthetic rows at a time."""
    assert fs.radius is not None and fr.radius is not None
    precise = density = 0.0
    recalled = torch.zeros(fr.n, dtype=torch.bool)
    covered = torch.zeros(fr.n, dtype=torch.bool)
    for rows in _row_slices(fs.n):
        d = _cross_distances(cross, fs, fr, mean_diff2, s_shift, r_shift, rows)  # [b, n_real]
        inside_real = d <= fr.radius.unsqueeze(0)
        precise += float(inside_real.any(dim=1).sum())
        density += float(inside_real.sum())
        covered |= inside_real.any(dim=0)
        recalled |= (d <= fs.radius[rows].unsqueeze(1)).any(dim=0)
    return ManifoldMetrics(precision=precise / fs.n, recall=float(recalled.double().mean()),
                           density=density / (k * fs.n), coverage=float(covered.double().mean()), k=k)
