"""``gaussian``: a class-conditional Gaussian over flattened reduced sequences, fitted in closed form.

A few hundred clips of ``l * D`` numbers (12,288 at ``l = 16``) are far too few for a deep generator to
learn a distribution from: an MLP VAE with 25 M parameters per class either memorises its handful of
training clips or collapses onto their mean. A Gaussian with a shrunk covariance is the estimator that
small-sample statistics recommend, and on embeddings of real recorded sound it is what makes synthetic
data stand in for real data (``docs/evaluation.md``: train-on-synthetic accuracy and distance to closest
record). The model, on standardised data ``x in R^F`` (``F = l * D``)::

    x | class c  ~  N(mu_c, Sigma),     Sigma = (1 - a) S + a m I

* ``mu_c``: the class mean (conditioned, label); one mean for an unconditioned generator; ``mu_0 + A e``
  when conditioned on per-sample condition embeddings ``e`` (ridge regression of ``x`` on ``e``);
* ``S``: the covariance of the deviations from those means, pooled over the generator's classes (the
  within-class covariance), kept as its top ``r = generator_latent_dim`` principal directions plus the
  variance they leave out, spread evenly (``m`` = average variance per element, so ``tr Sigma = tr S``);
* ``a``: the Ledoit-Wolf shrinkage intensity (``gaussian_shrinkage: "auto"``, Ledoit & Wolf 2004), or a
  fixed value in ``[0, 1]``. With far fewer samples than dimensions the sample covariance is zero outside
  the span of the training clips; shrinkage gives new samples variance there too, as new real clips
  have -- which is why they are not closer to the training clips than new real clips are.

Sampling draws ``mu_c + sqrt(1 - a) V diag(sqrt(lambda)) z + sqrt(a m + (1 - a) m_rest) eps`` from the
given ``torch.Generator`` only. Nothing is trained by gradient descent: :meth:`fit` sees the generator's
training sequences once (``fitted = True``; the trainer calls it instead of running epochs), in float64,
through the smaller of the ``n x n`` and ``F x F`` scatter matrices (up to :data:`GRAM_ROWS`; beyond, a
randomised SVD and a seeded subset of rows for the shrinkage estimate). Validation reports the exact negative log-likelihood per element
(Woodbury identity) and the mean squared distance to the class mean.

State: ``means [C, F]`` (rows of classes without data stay zero and cannot be sampled), ``counts [C]``,
``components [r, F]`` (``sqrt(lambda_i) v_i``), ``residual`` (``m_rest``, variance per element outside
the components), ``shrinkage`` (``a``), ``scale`` (``m``) and, for embedding conditioning,
``coef [E, F]``. A model file of 12 classes at ``l = 16`` with ``r = 256`` holds 3.3 M numbers (the
VAE: 25 M per generator).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, TrainContext
from feda2v_toolkit.generators._common import cfg, conditioning_kind, noise_like
from feda2v_toolkit.runtime.linalg import eigh

#: fits up to this many sequences work on the exact n x n Gram matrix
GRAM_ROWS = 8192
#: random probes ``g`` whose products ``S g`` statistics about merged means carry once a streamed factor was cut
#: (``probe_sums``): the part of ``||S||_F^2`` (Ledoit-Wolf's shrinkage) in the directions cut is estimated from them
SCATTER_PROBES = 128
#: their seed (public and fixed: every block, rank and site draws the same probes)
PROBE_SEED = 20261203
#: while streaming, a factor is re-factored once its rows not yet orthogonal reach this fraction of what it keeps
#: (and it has more rows than that): every block of 512 at the default rank, the least work per row measured
#: (``bench/bench_streamed_fit.py --time``)
REFACTOR = 0.5
#: the dtype of a streaming cut's products (its Gram and re-factored rows; the eigendecomposition is float64):
#: float32 halves their time and memory; the statistics' sums stay float64 and a site's release is re-factored
#: in float64 (docs/scale.md)
STREAM_DTYPE = torch.float32
#: a cut in STREAM_DTYPE that left out no more than this share of the variance is taken again in float64 (its
#: rounding, not directions: data with no more directions than kept stay exact); the same share of the largest
#: eigenvalue bounds the directions it keeps
STREAM_EXACT = 1e-6
#: ridge of the condition-embedding regression, relative to the mean eigenvalue of E^T E
CONDITION_RIDGE = 1e-2
LOG_2PI = math.log(2 * math.pi)


def ledoit_wolf(scatter: Tensor, sq_norms: Tensor, features: int, n: int | None = None) -> float:
    """Ledoit-Wolf shrinkage intensity of the covariance ``S = X^T X / n`` towards ``m I`` (float64), from
    either scatter matrix of the ``n`` centred rows -- ``X X^T`` or ``X^T X``, whose Frobenius norms agree --
    and the rows' squared norms ``sq_norms``.

    ``a = min(1, b^2 / d^2)`` with ``d^2 = ||S - m I||_F^2`` and ``b^2 = (1/n^2) sum_i ||x_i x_i^T - S||_F^2
    = (sum_i |x_i|^4 - n ||S||_F^2) / n^2`` (``sum_i <x_i x_i^T, S> = n ||S||_F^2``).
    """
    n = int(sq_norms.numel()) if n is None else n
    return ledoit_wolf_from_sums(float(scatter.square().sum()), float(sq_norms.sum()),
                                 float(sq_norms.square().sum()), features, n)


def ledoit_wolf_from_sums(scatter_norm2: float, square: float, quartic: float, features: int, n: int) -> float:
    """:func:`ledoit_wolf` from sums alone: ``||X^T X||_F^2``, ``sum_i |x_i|^2`` and ``sum_i |x_i|^4``."""
    if n < 2:
        return 1.0
    s_norm2 = scatter_norm2 / n ** 2
    m = square / (n * features)
    d2 = s_norm2 - m * m * features
    b2 = (quartic - n * s_norm2) / n ** 2
    if d2 <= 0:
        return 1.0
    return float(min(1.0, max(0.0, b2 / d2)))


def low_rank_factor(d: Tensor, max_rank: int | None = None) -> Tensor:
    """Rows ``f [r, F]`` with ``f^T f = d^T d`` (float64): every non-zero direction of the scatter of the rows
    ``d [n, F]``, by decreasing variance, or the top ``max_rank`` of them. Computed through the smaller of
    ``d d^T`` and ``d^T d``; the rows of ``f`` are orthogonal."""
    return stacked_factor([d], max_rank)[0]


def stacked_factor(pieces: Sequence[Tensor], max_rank: int | None = None,
                   norms: Sequence[Tensor | None] | None = None,
                   dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, float]:
    """:func:`low_rank_factor` of the rows of ``pieces`` stacked, never concatenated when they are no more than
    the features: the Gram ``d d^T`` is taken block by block and ``f`` summed piece by piece. ``norms[i]``:
    the squared row norms of a piece whose rows are orthogonal (a factor this function returned: its Gram
    is ``diag(norms)``), so that block is not computed -- checked against the rows, and computed if they
    disagree. Returns ``f``, its rows' squared norms (``f f^T = diag``) and ``||d^T d||_F^2`` (every eigenvalue's
    square, before any cut: exact).

    ``dtype``: of the products (the pieces are converted to it, ``f`` is returned in it); the eigendecomposition
    is float64 whatever it is. ``float32`` for the streaming cuts (:data:`STREAM_DTYPE`): ``f f^T = diag`` then
    holds to that dtype's rounding, and directions below :data:`STREAM_EXACT` of the largest are not kept."""
    pieces = [p.to(dtype) for p in pieces]
    floor = 1e-12 if dtype == torch.float64 else STREAM_EXACT  # eigenvalues above the products' rounding
    features = pieces[0].shape[1]
    sizes = [int(p.shape[0]) for p in pieces]
    n = sum(sizes)
    if n == 0:
        return pieces[0].new_zeros(0, features), pieces[0].new_zeros(0), 0.0
    if n > features:  # d^T d is the smaller
        d = pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))
        evals, evecs = eigh((d.T @ d).double())
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
        keep = _kept(evals, max_rank, floor)
        f = (evecs[:, :keep].T * evals[:keep].sqrt().unsqueeze(1)).to(dtype)
        return f, evals[:keep], float(evals.square().sum())
    offsets = [sum(sizes[:i]) for i in range(len(pieces) + 1)]
    gram = pieces[0].new_empty(n, n)
    rtol = 1e-9 if dtype == torch.float64 else 1e-4  # how orthogonal a factor's rows come out of this function
    for i, pi in enumerate(pieces):
        a, b = offsets[i], offsets[i + 1]
        known = norms[i] if norms is not None else None
        if known is not None and known.shape == (sizes[i],) and \
                torch.allclose(known.to(pi), torch.linalg.vector_norm(pi, dim=1).square(), rtol=rtol, atol=0.0):
            gram[a:b, a:b] = torch.diag(known.to(pi))
        else:
            gram[a:b, a:b] = pi @ pi.T
        for j in range(i + 1, len(pieces)):
            block = pi @ pieces[j].T
            gram[a:b, offsets[j]:offsets[j + 1]] = block
            gram[offsets[j]:offsets[j + 1], a:b] = block.T
    evals, evecs = eigh(gram.double())
    del gram
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1).to(dtype)
    keep = _kept(evals, max_rank, floor)
    f = evecs[offsets[0]:offsets[1], :keep].T @ pieces[0]
    for i in range(1, len(pieces)):
        f.addmm_(evecs[offsets[i]:offsets[i + 1], :keep].T, pieces[i])
    return f, evals[:keep], float(evals.square().sum())


@functools.lru_cache(maxsize=2)
def scatter_probes(features: int, count: int = SCATTER_PROBES) -> Tensor:
    """The fixed random probes ``[F, count]`` (float64, standard normal; shared, not to be modified) whose
    products with the scatter statistics about merged means carry once a factor was cut."""
    return torch.randn(features, count, generator=torch.Generator().manual_seed(PROBE_SEED), dtype=torch.float64)


def scatter_norm2_from_probes(held: Tensor | Sequence[Tensor], probe_sums: Tensor, held_norm2: float) -> float:
    """``||S||_F^2`` of a scatter ``S = A + C`` of which rows ``held`` (a factor, or its pieces) hold ``A``
    (``||A||_F^2 = held_norm2``) and the probes' sums ``Y = S G`` (:func:`scatter_probes`) are exact: with ``C G =
    Y - A G``, ``||S||^2 = ||A||^2 + 2 tr(A C) + ||C||^2``, the last two estimated from the probes (Hutchinson:
    ``E[g^T M g] = tr M``). The estimate bears only on the part that was cut, the flat tail of the spectrum,
    where random probes are accurate; exact when nothing was cut (``C = 0``)."""
    pieces = [p.double() for p in ([held] if isinstance(held, Tensor) else held)]
    probes = scatter_probes(pieces[0].shape[1], probe_sums.shape[1]).to(pieces[0])
    ag = sum(_times_scatter(p, probes) for p in pieces)
    cg = probe_sums.to(pieces[0]) - ag
    k = probes.shape[1]
    return max(held_norm2 + 2 * float((ag * cg).sum()) / k + float(cg.square().sum()) / k, held_norm2)


def _kept(evals: Tensor, max_rank: int | None, floor: float = 1e-12) -> int:
    """How many of the (decreasing) eigenvalues are directions: above ``floor`` of the largest (the products'
    rounding), at most ``max_rank``."""
    keep = int((evals > evals[0] * floor).sum()) if evals[0] > 0 else 0
    return keep if max_rank is None else min(keep, int(max_rank))


def _merge_about_means(parts: list[Mapping[str, Tensor]], *, max_rank: int | None, compact: bool) -> dict[str, Tensor]:
    """:meth:`GaussianGenerator.merge_statistics` of statistics about the same given means: counts and moments
    add, the pooled factors stack (streaming, re-factored to ``max_rank`` directions once there are more rows
    than that and :data:`REFACTOR` x ``max_rank`` of them are not yet orthogonal, the products in
    :data:`STREAM_DTYPE` when directions are cut; from their pieces: a re-factored factor carries its rows'
    squared norms, ``factor_norms`` -- of its leading rows once more rows are stacked under them -- so their
    block of the Gram is not recomputed).

    ``||S||_F^2`` (the shrinkage's) is tracked so that cutting directions does not lose it: once a factor was
    cut while streaming, the parts carry ``probe_sums`` (``S G``, exact sums); ``compact`` (a site's release)
    turns them into the number ``scatter_norm2`` -- exact when nothing was cut before, estimated from the probes
    otherwise -- and leaves out the probes and the norms (nothing but that number leaves the site); merging
    releases adds their numbers and the cross terms of their factors (exact when every release keeps all its
    directions), and estimates the cross terms of what the releases left out (:func:`_left_out_cross_terms`)."""
    means = parts[0]["means"].to("cpu", torch.float64)
    for p in parts[1:]:
        if not torch.equal(p["means"].to("cpu", torch.float64), means):
            raise ValueError("gaussian statistics taken about different means cannot be merged")
    out = {"means": means, **{k: sum(p[k].to("cpu", torch.float64) for p in parts)
                              for k in ("counts", "square", "quartic")}}
    factors = [p["factors"].to("cpu") for p in parts]  # float64, or float32 while streaming (STREAM_DTYPE)
    pieces: list[Tensor] = []
    norms: list[Tensor | None] = []
    for p, f in zip(parts, factors, strict=True):  # a factor's leading orthogonal rows (``factor_norms``): a piece
        m = p.get("factor_norms")
        lead = 0 if m is None else min(int(m.shape[0]), int(f.shape[0]))
        if lead:
            pieces.append(f[:lead])
            norms.append(m[:lead])
        if lead < f.shape[0]:
            pieces.append(f[lead:])
            norms.append(None)
    rows = sum(int(f.shape[0]) for f in pieces)
    released = [p for p in parts if "scatter_norm2" in p]
    if released and len(released) < len(parts):
        raise ValueError("gaussian statistics of a site's release cannot be merged with a site's blocks")
    stacked_norm2 = 0.0
    whole = sum(_norm2(x) for x in pieces)  # the stacked scatter's trace, before any cut
    pending = rows - (int(norms[0].shape[0]) if norms and norms[0] is not None else 0)  # rows not yet orthogonal
    if pieces and (compact or (max_rank is not None and rows > max_rank and pending >= REFACTOR * max_rank)
                   or (max_rank is None and len(parts) > 1)):
        # a streaming cut (more rows and features than kept) works in STREAM_DTYPE, unless it left out no more
        # than that dtype's rounding (data with no more directions than kept): then again in float64, exact
        cuts = max_rank is not None and not compact and not released and min(rows, means.shape[1]) > max_rank
        f, kept, stacked_norm2 = stacked_factor(pieces, max_rank, norms, STREAM_DTYPE if cuts else torch.float64)
        if cuts and f.dtype != torch.float64 and whole - float(kept.sum()) <= STREAM_EXACT * whole:
            f, kept, stacked_norm2 = stacked_factor(pieces, max_rank, norms)
    else:  # stacked as they are: the first part's leading orthogonal rows stay the leading rows
        f = factors[0] if len(factors) == 1 else torch.cat([x.to(factors[0].dtype) for x in factors])
        kept = parts[0].get("factor_norms")
    out["factors"] = f
    cut = bool(pieces) and whole - (float(kept.sum()) if kept is not None and kept.shape[0] == f.shape[0]
                                    else _norm2(f)) > 1e-9 * whole
    probed = any("probe_sums" in p for p in parts)
    if probed or (cut and not compact and not released):
        probes = scatter_probes(means.shape[1])
        probe_sums = sum(p["probe_sums"].to("cpu", torch.float64) if "probe_sums" in p else
                         _times_scatter(f_p.double(), probes)
                         for p, f_p in zip(parts, factors, strict=True))
    if released:  # each release's own number, plus the cross terms between the releases' factors
        total = float(parts[0]["scatter_norm2"])
        if len(parts) > 1:  # stacked_norm2 = ||sum F_i^T F_i||^2; each release adds what its factor leaves out
            total = stacked_norm2 + sum(float(p["scatter_norm2"]) - float(_gram(f_p.double()).square().sum())
                                        for p, f_p in zip(parts, factors, strict=True))
            total += _left_out_cross_terms(parts, factors)
        out["scatter_norm2"] = torch.tensor(total, dtype=torch.float64)
    elif compact:
        total = scatter_norm2_from_probes(pieces, probe_sums, stacked_norm2) if probed else stacked_norm2
        out["scatter_norm2"] = torch.tensor(total, dtype=torch.float64)
    else:
        if probed or cut:
            out["probe_sums"] = probe_sums
        if kept is not None:
            out["factor_norms"] = kept.to(torch.float64)
    return out


def _left_out_cross_terms(parts: Sequence[Mapping[str, Tensor]], factors: Sequence[Tensor]) -> float:
    """An estimate of what ``||sum_i S_i||_F^2`` gets from the directions the sites' releases left out: ``2 sum_{i<j}
    (<A_i, T_j> + <T_i, A_j> + <T_i, T_j>)`` for each release's kept scatter ``A_i = F_i^T F_i`` and left-out part
    ``T_i = S_i - A_i``, taking ``T_i`` as its variance (``sum |d|^2 - |F_i|^2``, exact) spread evenly over the
    ``features - r_i`` directions ``F_i`` does not hold. Zero when every release keeps all its directions (then
    the merge is exact); without it, sites that cut their factors understate ``||S||_F^2`` and over-shrink
    (docs/scale.md: 4 sites of alternate clips on a flat spectrum, shrinkage 0.881 against the whole data's 0.655,
    with it 0.791; split by class 0.704, with it 0.655)."""
    features = int(factors[0].shape[1])
    rows, mass, units, tails = [], [], [], []
    for p, f in zip(parts, factors, strict=True):
        f = f.double()
        norms = f.square().sum(1)
        keep = norms > 0
        rows.append(f)
        mass.append(float(norms.sum()))  # |F_i|^2 = tr A_i
        units.append(f[keep] / norms[keep].sqrt().unsqueeze(1))  # the kept directions (orthogonal rows)
        square = float(p["square"].sum())
        spread = square - mass[-1]
        spread = spread if spread > 1e-9 * square else 0.0  # rounding: the release kept every direction
        tails.append(spread / max(features - int(keep.sum()), 1))
    total = 0.0
    for i in range(len(factors)):
        for j in range(i + 1, len(factors)):
            if tails[i] == 0.0 and tails[j] == 0.0:
                continue
            outside_ij = mass[i] - float((rows[i] @ units[j].T).square().sum())  # F_i beyond j's kept span
            outside_ji = mass[j] - float((rows[j] @ units[i].T).square().sum())
            shared = features - units[i].shape[0] - units[j].shape[0] + float((units[i] @ units[j].T).square().sum())
            total += 2 * (tails[j] * max(outside_ij, 0.0) + tails[i] * max(outside_ji, 0.0)
                          + tails[i] * tails[j] * max(shared, 0.0))
    return total


def _varied(total: float, comps: Tensor) -> Tensor:
    """``comps``, once a fit of the data itself found variance about the means (``total``, ``tr S``, above zero);
    else a ``ValueError``: the model would draw the means -- copies of the training data. (A private fit's noisy
    total is not checked here: :meth:`GaussianGenerator.set_parameters`.)"""
    if not total > 0:
        raise ValueError("the training sequences do not vary about their class means (one sequence per class, or "
                         "identical sequences): the model would draw the means, copies of the training data; train "
                         "on more, distinct clips per class")
    return comps


def _norm2(x: Tensor) -> float:
    """``|x|^2`` over every entry (in float64), without a squared copy."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _gram(rows: Tensor) -> Tensor:
    """``rows rows^T`` or ``rows^T rows``, the smaller (their Frobenius norms agree)."""
    return rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows


def _times_scatter(factor: Tensor, probes: Tensor) -> Tensor:
    """``(factor^T factor) probes`` without forming the scatter."""
    return factor.T @ (factor @ probes)


class GaussianGenerator(Generator):
    """Class-conditional Gaussian with a shrunk low-rank-plus-isotropic covariance (module docstring)."""

    supports_conditioning: ClassVar[bool] = True
    #: fitted in closed form by :meth:`fit`; the trainer runs no epochs for it
    fitted: ClassVar[bool] = True
    #: what :meth:`membership_scores` computes
    membership_score_name: ClassVar[str] = "log-likelihood"

    def __init__(self, *, seq_len: int, dim: int, rank: int, num_classes: int = 0, condition_dim: int = 0,
                 conditioning: str | None = None, shrinkage: float | str = "auto") -> None:
        super().__init__(seq_len=seq_len, dim=dim, num_classes=num_classes, condition_dim=condition_dim)
        if conditioning not in (None, "label", "embedding"):
            raise ValueError(f"conditioning must be None, 'label' or 'embedding' (got {conditioning!r})")
        if conditioning == "label" and self.num_classes < 1:
            raise ValueError("label conditioning needs num_classes >= 1")
        if conditioning == "embedding" and self.condition_dim < 1:
            raise ValueError("embedding conditioning needs condition_dim >= 1")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if shrinkage != "auto" and not (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1):
            raise ValueError(f"shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
        self._conditioning = conditioning
        self.rank = int(rank)
        self.shrinkage_setting = shrinkage if shrinkage == "auto" else float(shrinkage)
        flat = self.seq_len * self.dim
        rows = self.num_classes if conditioning == "label" else 1
        self.register_buffer("means", torch.zeros(rows, flat))
        self.register_buffer("counts", torch.zeros(rows, dtype=torch.long))
        self.register_buffer("components", torch.zeros(self.rank, flat))
        self.register_buffer("residual", torch.zeros(()))
        self.register_buffer("shrinkage", torch.zeros(()))
        self.register_buffer("scale", torch.zeros(()))
        if conditioning == "embedding":
            self.register_buffer("coef", torch.zeros(self.condition_dim, flat))
            self.register_buffer("condition_mean", torch.zeros(self.condition_dim))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seq_len: int, dim: int, num_classes: int = 0,
                    condition_dim: int = 0) -> GaussianGenerator:
        kind = conditioning_kind(bool(cfg(config, "gaussian_conditioned")), num_classes, condition_dim)
        return cls(seq_len=seq_len, dim=dim, rank=cfg(config, "generator_latent_dim"), num_classes=num_classes,
                   condition_dim=condition_dim, conditioning=kind, shrinkage=cfg(config, "gaussian_shrinkage"))

    def init_args(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "dim": self.dim, "rank": self.rank, "num_classes": self.num_classes,
                "condition_dim": self.condition_dim, "conditioning": self._conditioning,
                "shrinkage": self.shrinkage_setting}

    @property
    def conditioning(self) -> str | None:
        return self._conditioning

    @property
    def is_fitted(self) -> bool:
        return bool(self.counts.sum() > 0)

    def configure_optimizers(self, config: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
        return {}  # nothing is trained by gradient descent

    # -- fitting ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
            seed: int = 0) -> dict[str, float]:
        """Fit on every training sequence of this generator at once: ``x [n, seq_len, dim]`` (standardised).

        Returns JSON-serialisable fit metrics (rank used, shrinkage, share of variance in the components).
        A fit that runs long says so (:func:`feda2v_toolkit.runtime.progress.activity`).
        """
        from feda2v_toolkit.runtime.progress import activity

        with activity("fitting the gaussian generator"):
            return self._fit(x, labels=labels, conditions=conditions, seed=seed)

    def _fit(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None, seed: int) -> dict[str, float]:
        n = x.shape[0]
        if n < 1:
            raise ValueError("the gaussian generator needs at least one training sequence")
        if x.shape[1:] != (self.seq_len, self.dim):
            raise ValueError(f"expected [n, {self.seq_len}, {self.dim}], got {tuple(x.shape)}")
        if self._conditioning != "embedding" and min(n, self.seq_len * self.dim) <= GRAM_ROWS:
            return self.fit_from_statistics(self.fit_statistics(x, labels=labels))
        return self._fit_direct(x, labels=labels, conditions=conditions, seed=seed)

    @torch.no_grad()
    def _fit_direct(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                    seed: int = 0) -> dict[str, float]:
        """:meth:`fit` on the data itself: embedding conditioning, and fits beyond :data:`GRAM_ROWS` sequences
        (randomised SVD, shrinkage from a seeded subset); :meth:`fit_from_statistics` does the rest."""
        n = x.shape[0]
        flat = x.reshape(n, -1).to(torch.float64)
        features = flat.shape[1]
        groups = 1
        if self._conditioning == "label":
            if labels is None or labels.shape != (n,):
                raise ValueError(f"label conditioning: pass labels of shape [{n}]")
            lab = labels.long().to(flat.device)
            counts = torch.bincount(lab, minlength=self.num_classes)[:self.num_classes]
            sums = torch.zeros(self.num_classes, features, dtype=torch.float64, device=flat.device)
            means = sums.index_add_(0, lab, flat) / counts.clamp(min=1).to(sums).unsqueeze(1)
            dev = flat - means[lab]
            groups = int((counts > 0).sum())
        elif self._conditioning == "embedding":
            if conditions is None or conditions.shape != (n, self.condition_dim):
                raise ValueError(f"embedding conditioning: pass conditions of shape [{n}, {self.condition_dim}]")
            e = conditions.to(flat.device, torch.float64)
            e_mean = e.mean(0)
            ec = e - e_mean
            mean0 = flat.mean(0)
            xc = flat - mean0
            ete = ec.T @ ec
            lam = CONDITION_RIDGE * max(float(torch.linalg.eigvalsh(ete).mean()), 1e-12)
            coef = torch.linalg.solve(ete + lam * torch.eye(ete.shape[0], dtype=ete.dtype, device=ete.device),
                                      ec.T @ xc)  # [E, F]
            dev = xc - ec @ coef
            means, counts = mean0.unsqueeze(0), torch.tensor([n])
            groups = 1 + min(self.condition_dim, n - 1)
            self.coef.copy_(coef.to(self.coef))
            self.condition_mean.copy_(e_mean.to(self.condition_mean))
        else:
            means, counts = flat.mean(0, keepdim=True), torch.tensor([n])
            dev = flat - means.to(flat.device)
        dof = max(n - groups, 1)
        sq_norms = dev.square().sum(1)
        total = float(sq_norms.sum()) / dof  # tr S (unbiased)
        small = min(n, features)
        if small <= GRAM_ROWS:
            # eigen-decomposition of the smaller of the two scatter matrices (same non-zero spectrum)
            by_rows = n <= features
            scatter = dev @ dev.T if by_rows else dev.T @ dev
            evals, evecs = eigh(scatter)
            evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
            keep = int(min(self.rank, int((evals > evals[0] * 1e-12).sum()) if evals[0] > 0 else 0))
            if by_rows:
                comps = (evecs[:, :keep].T @ dev) / evals[:keep].sqrt().clamp(min=1e-300).unsqueeze(1)
            else:
                comps = evecs[:, :keep].T
            lam = evals[:keep] / dof
            shrink_scatter, shrink_norms, shrink_n = scatter, sq_norms, n
        else:
            g = torch.Generator(device="cpu").manual_seed(seed)
            state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            try:
                _, s, v = torch.svd_lowrank(dev, q=min(self.rank + 8, small), niter=4)
            finally:
                torch.random.set_rng_state(state)
            keep = min(self.rank, s.numel())
            comps, lam = v[:, :keep].T, s[:keep].square() / dof
            sub = torch.randperm(n, generator=g)[:GRAM_ROWS].to(dev.device)
            shrink_scatter = dev[sub] @ dev[sub].T
            shrink_norms, shrink_n = sq_norms[sub], int(sub.numel())
        if self.shrinkage_setting == "auto":
            a = ledoit_wolf(shrink_scatter, shrink_norms, features, shrink_n)
        else:
            a = float(self.shrinkage_setting)
        return self._set(means, counts, _varied(total, comps), lam, keep, total, a, n)

    # -- mergeable sufficient statistics (federated fitting) -----------------------------------------
    def _rows_of(self, n: int, labels: Tensor | None) -> Tensor:
        if self._conditioning == "label":
            if labels is None or labels.shape != (n,):
                raise ValueError(f"label conditioning: pass labels of shape [{n}]")
            return labels.long()
        return torch.zeros(n, dtype=torch.long)

    def _flat_rows(self, x: Tensor, labels: Tensor | None, own: bool = False) -> tuple[Tensor, Tensor]:
        """``x`` as float64 rows ``[n, F]`` (``own``: never ``x``'s own memory) and each row's mean row (class),
        checked."""
        if self._conditioning == "embedding":
            raise NotImplementedError("a gaussian generator conditioned on condition embeddings has no mergeable "
                                      "statistics (its residuals depend on the merged regression)")
        n = x.shape[0]
        if x.shape[1:] != (self.seq_len, self.dim):
            raise ValueError(f"expected [n, {self.seq_len}, {self.dim}], got {tuple(x.shape)}")
        flat = x.reshape(n, -1).to(torch.float64, copy=own)
        lab = self._rows_of(n, labels).to(flat.device)
        rows = self.means.shape[0]
        if n and bool((lab < 0).any() or (lab >= rows).any()):
            raise ValueError(f"labels must be in 0..{rows - 1}")
        return flat, lab

    @torch.no_grad()
    def mean_statistics(self, x: Tensor, *, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Per mean row ``c`` (class with label conditioning, else one row) the ``counts [C]`` and ``sums
        [C, F]`` of ``x [n, seq_len, dim]`` (float64; the sums of parts of the data add up): the first of the
        two exchanges of a streamed or federated fit. Their merged means go to :meth:`fit_statistics`
        (``means=``), whose statistics then need no per-class scatter (the merged means are
        the summed ``sums`` over the summed ``counts``, zero for a row without data)."""
        flat, lab = self._flat_rows(x, labels)
        rows, features = self.means.shape
        counts = torch.bincount(lab, minlength=rows).to(torch.float64)
        sums = torch.zeros(rows, features, dtype=torch.float64, device=flat.device).index_add_(0, lab, flat)
        return {"counts": counts.cpu(), "sums": sums.cpu()}

    @torch.no_grad()
    def fit_statistics(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                       max_rank: int | None = None, means: Tensor | None = None) -> dict[str, Tensor]:
        """Sufficient statistics of ``x [n, seq_len, dim]`` that :meth:`merge_statistics` combines exactly
        (float64). Embedding conditioning has no such statistics.

        With ``means [C, F]`` (the merged means of every part of the data, :meth:`mean_statistics`): the
        deviations ``d`` about them -- ``means`` and ``counts`` per mean row, ``square = sum |d|^2`` and
        ``quartic = sum |d|^4`` per mean row, and the **pooled** within-class scatter ``sum d d^T`` as
        ``factors``: the deviations themselves (their scatter, exactly) when ``max_rank`` is None and there
        are no more of them than features, else its top ``max_rank`` directions. Merging adds and stacks:
        what is held does not grow with the number of classes beyond the means.

        Without ``means`` (one exchange): per mean row ``c``, ``counts``, ``sums`` ``[C, F]``, and about the
        row's own mean ``m_c`` the deviations' ``square``, ``quartic``, ``cubic = sum |d|^2 d`` ``[C, F]`` and
        the scatter as low-rank ``factors`` per row (every non-zero direction, or the top ``max_rank`` per
        row; ``factor_rows [C]`` says how many rows of ``factors`` belong to each ``c``, in order): merging
        corrects each class's moments for the shift of its mean, so each class's own factor is kept."""
        flat, lab = self._flat_rows(x, labels, own=means is not None)
        n = flat.shape[0]
        rows, features = self.means.shape
        f64 = {"dtype": torch.float64, "device": flat.device}
        if means is not None:
            if tuple(means.shape) != (rows, features):
                raise ValueError(f"means of shape {tuple(means.shape)}, this generator has {(rows, features)}")
            m = means.to(**f64)
            d = flat.sub_(m[lab])  # ``flat`` is this call's own float64 copy
            sq = torch.linalg.vector_norm(d, dim=1).square()
            raw = max_rank is None and n <= features
            out = {"means": m.cpu().clone(), "counts": torch.bincount(lab, minlength=rows).to(torch.float64).cpu(),
                   "square": torch.zeros(rows, **f64).index_add_(0, lab, sq).cpu(),
                   "quartic": torch.zeros(rows, **f64).index_add_(0, lab, sq.square()).cpu(),
                   "factors": (d if raw else low_rank_factor(d, max_rank)).cpu()}
            if max_rank is not None:  # directions may have been cut: the probes' sums (see merge_statistics)
                out["probe_sums"] = _times_scatter(d, scatter_probes(features).to(d)).cpu()
            return out
        out = {"counts": torch.zeros(rows, **f64), "sums": torch.zeros(rows, features, **f64),
               "square": torch.zeros(rows, **f64), "quartic": torch.zeros(rows, **f64),
               "cubic": torch.zeros(rows, features, **f64), "factor_rows": torch.zeros(rows, **f64)}
        factors = []
        for c in torch.unique(lab).tolist():
            xc = flat[lab == c]
            d = xc - xc.mean(0)
            sq = d.square().sum(1)
            f = low_rank_factor(d, max_rank)
            out["counts"][c], out["sums"][c] = xc.shape[0], xc.sum(0)
            out["square"][c], out["quartic"][c], out["cubic"][c] = sq.sum(), sq.square().sum(), sq @ d
            out["factor_rows"][c] = f.shape[0]
            factors.append(f)
        out["factors"] = torch.cat(factors) if factors else torch.zeros(0, features, **f64)
        return out

    @staticmethod
    def merge_statistics(parts: list[Mapping[str, Tensor]], *, max_rank: int | None = None,
                         compact: bool = False) -> dict[str, Tensor]:
        """Statistics of the union of the parts' data, exactly (parallel-axis corrections of the parts' row
        means to the merged means; the stacked factors are re-factored). Same form as :meth:`fit_statistics`.

        With ``max_rank`` (streaming merges, one part at a time): a row's stacked factor is kept as it is (still
        exact) until it has more than ``2 * max_rank`` rows, then re-factored to its top ``max_rank`` directions
        (``compact``: always re-factored to them). Once directions were left out, later merges correct the third
        and fourth moments (``cubic``, ``quartic``: the Ledoit-Wolf shrinkage) for the mean shift with the kept
        directions only: close (1e-3 relative in ``tests/generators/test_gaussian.py``), no longer exact.

        About merged means (one pooled factor): stacked as it is up to ``max_rank`` rows, then re-factored to its
        top ``max_rank`` directions whenever :data:`REFACTOR` x ``max_rank`` rows that are not yet orthogonal are
        stacked under them, the products in :data:`STREAM_DTYPE` (:func:`_merge_about_means`)."""
        if not parts:
            raise ValueError("no statistics to merge")
        about = ["means" in p for p in parts]
        if any(about):
            if not all(about):
                raise ValueError("gaussian statistics taken about given means cannot be merged with per-class ones")
            return _merge_about_means(parts, max_rank=max_rank, compact=compact)
        shapes = {tuple(p["sums"].shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"gaussian statistics of different shapes: {sorted(shapes)}")
        parts = [{k: v.to("cpu", torch.float64) for k, v in p.items()} for p in parts]
        rows, features = parts[0]["sums"].shape
        counts = sum(p["counts"] for p in parts)
        sums = sum(p["sums"] for p in parts)
        out = {"counts": counts, "sums": sums, "square": torch.zeros(rows, dtype=torch.float64),
               "quartic": torch.zeros(rows, dtype=torch.float64),
               "cubic": torch.zeros(rows, features, dtype=torch.float64),
               "factor_rows": torch.zeros(rows, dtype=torch.float64)}
        slices = [torch.cat([torch.zeros(1, dtype=torch.long), p["factor_rows"].long().cumsum(0)]) for p in parts]
        factors = []
        for c in range(rows):
            if counts[c] <= 0:
                continue
            mu = sums[c] / counts[c]
            stacked = []
            for p, off in zip(parts, slices, strict=True):
                nk = float(p["counts"][c])
                if nk <= 0:
                    continue
                e = p["sums"][c] / nk - mu
                low = p["factors"][int(off[c]):int(off[c + 1])]
                se = low.T @ (low @ e)  # (sum d d^T) e
                e2 = float(e.square().sum())
                s2, t = float(p["square"][c]), p["cubic"][c]
                out["square"][c] += s2 + nk * e2
                out["cubic"][c] += t + 2 * se + s2 * e + nk * e2 * e
                out["quartic"][c] += (float(p["quartic"][c]) + 4 * float(e @ se) + nk * e2 * e2
                                      + 4 * float(t @ e) + 2 * e2 * s2)
                stacked += [low] if max_rank is not None and e2 == 0 else [low, (math.sqrt(nk) * e).unsqueeze(0)]
            both = torch.cat(stacked) if stacked else torch.zeros(0, features, dtype=torch.float64)
            if max_rank is None:
                f = low_rank_factor(both)
            elif compact or both.shape[0] > 2 * max_rank:
                f = low_rank_factor(both, max_rank)
            else:
                f = both
            out["factor_rows"][c] = f.shape[0]
            factors.append(f)
        out["factors"] = torch.cat(factors) if factors else torch.zeros(0, features, dtype=torch.float64)
        return out

    @torch.no_grad()
    def fit_from_statistics(self, stats: Mapping[str, Tensor]) -> dict[str, float]:
        """Set the model from (merged) :meth:`fit_statistics`; returns what :meth:`fit` returns."""
        counts = stats["counts"].to("cpu", torch.float64)
        rows, features = self.means.shape
        first = stats["means"] if "means" in stats else stats["sums"]
        if tuple(first.shape) != (rows, features):
            raise ValueError(f"statistics of shape {tuple(first.shape)}, this generator has {(rows, features)}")
        n = int(round(float(counts.sum())))
        if n < 1:
            raise ValueError("the gaussian generator needs at least one training sequence")
        means = first.to("cpu", torch.float64) if "means" in stats else \
            first.to("cpu", torch.float64) / counts.clamp(min=1).unsqueeze(1)
        dof = max(n - int((counts > 0).sum()), 1)
        square = float(stats["square"].sum())
        total = square / dof  # tr S (unbiased)
        low = stats["factors"].to("cpu", torch.float64)  # [R, F]: low^T low = the pooled within-row scatter
        keep, lam = 0, torch.zeros(0, dtype=torch.float64)
        comps = torch.zeros(0, features, dtype=torch.float64)
        scatter_norm2 = 0.0
        if low.shape[0]:
            by_rows = low.shape[0] <= features
            gram = _gram(low)
            scatter_norm2 = float(gram.square().sum())
            if "scatter_norm2" in stats:  # statistics about merged means: ||S||_F^2 kept through the cuts
                scatter_norm2 = float(stats["scatter_norm2"])
            elif "probe_sums" in stats:  # ``low`` may have been cut while streaming: what it left out, estimated
                scatter_norm2 = scatter_norm2_from_probes(low, stats["probe_sums"].to("cpu", torch.float64),
                                                          scatter_norm2)
            evals, evecs = eigh(gram)
            evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
            keep = int(min(self.rank, int((evals > evals[0] * 1e-12).sum()) if evals[0] > 0 else 0))
            if by_rows:
                comps = (evecs[:, :keep].T @ low) / evals[:keep].sqrt().clamp(min=1e-300).unsqueeze(1)
            else:
                comps = evecs[:, :keep].T
            lam = evals[:keep] / dof
        if self.shrinkage_setting == "auto":
            a = ledoit_wolf_from_sums(scatter_norm2, square, float(stats["quartic"].sum()), features, n)
        else:
            a = float(self.shrinkage_setting)
        return self._set(means, counts, _varied(total, comps), lam, keep, total, a, n)

    @torch.no_grad()
    def set_parameters(self, means: Tensor, counts: Tensor, directions: Tensor, variances: Tensor, total: float,
                       shrinkage: float = 0.0) -> dict[str, float]:
        """Set the model from estimates made elsewhere (e.g. differentially private statistics,
        :mod:`feda2v_toolkit.privacy.statistics`): ``means [rows, F]``, ``counts [rows]`` (0 = the row cannot
        be sampled), the within-class covariance's top ``directions [r, F]`` (orthonormal rows, by decreasing
        variance) with ``variances [r]`` (only the first ``rank`` are kept), its trace ``total`` (the rest is
        spread evenly over the elements) and the shrinkage intensity. Returns what :meth:`fit` returns."""
        rows, features = self.means.shape
        if tuple(means.shape) != (rows, features) or counts.shape != (rows,):
            raise ValueError(f"means must be [{rows}, {features}] and counts [{rows}], got "
                             f"{tuple(means.shape)} and {tuple(counts.shape)}")
        if directions.dim() != 2 or directions.shape[1] != features or variances.shape != directions.shape[:1]:
            raise ValueError(f"directions must be [r, {features}] with variances [r]")
        if not 0 <= shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        keep = int(min(self.rank, directions.shape[0]))
        lam = variances.to("cpu", torch.float64).clamp(min=0)[:keep]
        n = int(round(float(counts.to(torch.float64).clamp(min=0).sum())))
        return self._set(means.to("cpu", torch.float64), counts.to(torch.float64).clamp(min=0).round(),
                         directions.to("cpu", torch.float64)[:keep], lam, keep, float(total), float(shrinkage), n)

    def _set(self, means: Tensor, counts: Tensor, comps: Tensor, lam: Tensor, keep: int, total: float, a: float,
             n: int) -> dict[str, float]:
        features = self.means.shape[1]
        if keep:  # each component's sign fixed (largest entry positive): the same fit samples the same draws
            comps = comps[:keep]
            pivot = comps.abs().argmax(1, keepdim=True)
            comps = comps * torch.where(comps.gather(1, pivot) < 0, -1.0, 1.0).to(comps)
        m = total / features
        rest = max(total - float(lam.sum()), 0.0) / features
        self.means.zero_()
        self.means[:means.shape[0]].copy_(means.to(self.means))
        self.counts.copy_(counts.to(self.counts))
        self.components.zero_()
        self.components[:keep].copy_((comps * lam.sqrt().unsqueeze(1)).to(self.components))
        self.residual.fill_(rest)
        self.shrinkage.fill_(a)
        self.scale.fill_(m)
        explained = float(lam.sum()) / total if total > 0 else float("nan")
        return {"sequences": float(n), "rank": float(keep), "shrinkage": a, "explained": explained,
                "variance_per_element": m}

    # -- model --------------------------------------------------------------------------------------
    def _means_for(self, n: int, labels: Tensor | None, conditions: Tensor | None) -> Tensor:
        if self._conditioning == "label":
            if labels is None or labels.shape != (n,):
                raise ValueError(f"this gaussian generator is conditioned on class labels: pass labels of shape [{n}]")
            lab = labels.long().to(self.means.device)
            if bool((lab < 0).any() or (lab >= self.num_classes).any()):
                raise ValueError(f"labels must be in 0..{self.num_classes - 1}")
            missing = torch.unique(lab[self.counts[lab] == 0]).tolist()
            if missing:
                raise ValueError(f"class label(s) {missing} had no training sequences in this generator")
            return self.means[lab]
        if self._conditioning == "embedding":
            if conditions is None or conditions.shape != (n, self.condition_dim):
                raise ValueError(f"this gaussian generator is conditioned on per-sample condition embeddings: "
                                 f"pass conditions of shape [{n}, {self.condition_dim}]")
            e = conditions.to(self.coef) - self.condition_mean
            return self.means[0] + e @ self.coef
        return self.means[0].expand(n, -1)

    def _noise_std(self) -> float:
        a, m, rest = float(self.shrinkage), float(self.scale), float(self.residual)
        return math.sqrt(max(a * m + (1 - a) * rest, 0.0))

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        if not self.is_fitted:
            raise RuntimeError("the gaussian generator is not fitted: train it first")
        mu = self._means_for(n, labels, conditions)
        z = noise_like((n, self.rank), generator, self.components)
        eps = noise_like((n, self.components.shape[1]), generator, self.components)
        x = mu + math.sqrt(1 - float(self.shrinkage)) * (z @ self.components) + self._noise_std() * eps
        return x.view(n, self.seq_len, self.dim).float()

    def training_step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                      optimizers: Mapping[str, torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        raise RuntimeError("the gaussian generator is fitted in closed form: call fit(), not training_step()")

    def _nll_per_record(self, x: Tensor, labels: Tensor | None, conditions: Tensor | None) -> tuple[Tensor, Tensor]:
        """Exact negative log-likelihood per element of each record ``[n]`` (float64; Woodbury identity)
        and the deviations from the means ``[n, F]``."""
        n = x.shape[0]
        d = x.reshape(n, -1).double() - self._means_for(n, labels, conditions).double()
        features = d.shape[1]
        a = float(self.shrinkage)
        s2 = a * float(self.scale) + (1 - a) * float(self.residual)
        low = math.sqrt(1 - a) * self.components.double()  # Sigma = low^T low + s2 I
        if s2 <= 0:
            return torch.full((n,), float("inf"), dtype=torch.float64, device=d.device), d
        inner = torch.eye(low.shape[0], dtype=torch.float64, device=low.device) + low @ low.T / s2
        chol = torch.linalg.cholesky(inner)
        proj = torch.cholesky_solve((d @ low.T).T, chol).T  # [n, r]
        quad = (d.square().sum(1) - (d @ low.T * proj).sum(1) / s2) / s2
        logdet = features * math.log(s2) + 2 * float(torch.log(torch.diagonal(chol)).sum())
        return 0.5 * (quad + logdet + features * LOG_2PI) / features, d

    @torch.no_grad()
    def loss_terms(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                   ctx: TrainContext) -> dict[str, float]:
        """Negative log-likelihood per element (``loss``) and mean squared distance to the mean (``mse``)."""
        nll, d = self._nll_per_record(x, labels, conditions)
        return {"loss": float(nll.mean()), "mse": float(d.square().mean())}

    @torch.no_grad()
    def membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                          config: Mapping[str, Any] | None = None) -> Tensor:
        """The exact log-likelihood per element of each record ``[n]`` (float64): the model's own density."""
        if not self.is_fitted:
            raise RuntimeError("the gaussian generator is not fitted: train it first")
        return -self._nll_per_record(x, labels, conditions)[0].cpu()

    @torch.no_grad()
    def extra_membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                                config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """``span residual``: minus the share of each record's deviation from its mean ``|d|^2`` that lies
        outside the span of the stored components. With ``rank >=`` the training clips the components span
        exactly the training deviations, so a training record has (almost) nothing outside them."""
        if not self.is_fitted:
            raise RuntimeError("the gaussian generator is not fitted: train it first")
        n = x.shape[0]
        d = x.reshape(n, -1).double() - self._means_for(n, labels, conditions).double()
        comps = self.components.double()
        comps = comps[comps.square().sum(1) > 0]
        total = d.square().sum(1).clamp(min=1e-300)
        if comps.shape[0] == 0:
            return {"span residual": torch.full((n,), -1.0, dtype=torch.float64)}
        q = torch.linalg.qr(comps.T).Q  # [F, r]: orthonormal basis of the components' span
        inside = (d @ q).square().sum(1)
        return {"span residual": (-(1 - inside / total).clamp(0, 1)).cpu()}
