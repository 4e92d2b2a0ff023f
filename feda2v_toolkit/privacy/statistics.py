"""Differentially private versions of every statistic the closed-form path fits from clips.

Each statistic follows the pipeline's stage shape, with the privacy in the middle:

1. ``local(...) -> part``: sums over this site's records of per-record contributions **clipped** to the
   declared bound (exact, float64; nothing leaves yet);
2. :func:`privatize` ``(part, plan, stage, rng, ledger)``: Gaussian noise of ``noise_multiplier *
   sensitivity`` on every key (symmetric noise on matrices), recorded in the ledger -- *before* the part
   leaves the site (no trusted server: each site adds the full noise);
3. the parts of the sites are summed (:func:`feda2v_toolkit.training.stages.sum_parts`);
4. ``finish(merged, ...)``: post-processing only (it never reads a record), so it costs nothing.

Release names are ``"<stage>.<key>"``; :meth:`releases` of each class declares them, with its sensitivity
and default budget weight. A key a stage sends that the plan does not declare is refused
(:class:`~feda2v_toolkit.privacy.spec.PrivacyError`): nothing leaves unprotected.

What each releases (``C`` a clip norm; add/remove-one sensitivities):

| stage / key | contribution of record ``i`` | sensitivity |
|---|---|---|
| ``classes.counts`` | one-hot of its class | 1 |
| ``<name>.norm_histogram`` (:class:`DPNormQuantile`) | one-hot of its ``log2`` norm bin | 1 |
| ``normalization.sum`` | ``clip(x_i, C)`` ``[l, D]`` | ``C`` |
| ``normalization.sum_sq`` | ``clip(x_i - mean, C)^2`` summed per scale group (all, per feature, per element) | ``C^2`` (``|d^2|_2 <= |d|^2``) |
| ``gaussian.basis`` | ``sum_t z_it z_it^T`` ``[D, D]`` of its clipped tokens | ``C^2`` (``|.|_F <= |z_i|^2``) |
| ``gaussian.sums`` | ``clip(u_i, C_u)`` in its class's row ``[C, k]`` | ``C_u`` |
| ``gaussian.scatter`` | ``u_i u_i^T`` in its generator's block ``[G, k, k]`` | ``C_u^2`` |
| ``gaussian.square`` | ``|clip(z_i, C)|^2`` in its generator's entry | ``C^2`` |
| ``lstsq.sxr / srr / sum_x / sum_r / sxx`` | ``X R^T``, ``R R^T``, ``X``, ``R``, ``|X|^2`` of clipped ``X``, ``R`` | ``C_x C_r``, ``C_r^2``, ``C_x``, ``C_r``, ``C_x^2`` |
| ``pca.sum / pca.outer`` | ``X``, ``X X^T`` of clipped full sequences | ``C_x``, ``C_x^2`` |

The record count used to turn sums into means is the noisy class counts' total (post-processing): no
statistic releases its own count. Clip norms are either public (the normalised space's typical norm is
``sqrt(l * D)`` by construction) or derived from an earlier release (a DP quantile of the records' norms,
:class:`DPNormQuantile`), never from the raw data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.privacy.accounting import BudgetPlan, PrivacyLedger
from feda2v_toolkit.privacy.mechanism import (
    add_noise,
    add_symmetric_noise,
    clip_factors,
    clip_rows,
    row_norms,
)
from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec, data_independent
from feda2v_toolkit.runtime.linalg import eigh

Part = dict[str, Tensor]
#: relative margin below a clip norm for records clipped in float32 (rounding stays within the bound)
FLOAT32_MARGIN = 1e-5


def privatize(part: Mapping[str, Tensor], plan: BudgetPlan, stage: str, rng: torch.Generator,
              ledger: PrivacyLedger, *, sensitivities: Mapping[str, float] | None = None) -> Part:
    """Noise every key of ``part`` as release ``"<stage>.<key>"`` of ``plan`` and record it in ``ledger``.

    ``sensitivities`` override the declared ones (clip norms known only at release time). A key without a
    declaration is refused. Returns float64 tensors (data-independent keys pass through unchanged). The keys
    draw their noise from ``rng`` in sorted order, whatever order ``part`` has them in (the ranks of a site share
    one generator and must draw alike)."""
    out: Part = {}
    for key, value in sorted(part.items()):
        planned = plan[f"{stage}.{key}"]
        sens = (sensitivities or {}).get(key, planned.spec.sensitivity)
        if not planned.spec.data_dependent:
            out[key] = value.detach().to("cpu", torch.float64)
            ledger.record_spec(planned)
            continue
        std = planned.noise_std(sens)
        noisy = add_symmetric_noise(value, std, rng) if planned.spec.symmetric else add_noise(value, std, rng)
        out[key] = noisy
        ledger.record_spec(planned, sensitivity=sens)
    return out


# -- class counts ----------------------------------------------------------------------------------

@dataclass
class NoisyCounts:
    """Post-processed class counts: ``counts`` (float64, negative values kept for the sums), the rounded
    ``kept`` counts (0 for classes dropped below ``threshold``) and the noise std they carry."""

    noisy: Tensor
    kept: Tensor
    threshold: float
    noise_std: float

    @property
    def total(self) -> float:
        """``N`` of the statistics over the kept classes' clips (the gaussian's): the kept counts' sum (>= 1)."""
        return max(float(self.kept.sum()), 1.0)

    @property
    def records(self) -> float:
        """``N`` of the statistics over every clip (normalisation, lstsq, pca): the noisy counts' sum (>= 1)."""
        return max(float(self.noisy.sum()), 1.0)


class DPClassCounts:
    """``classes.counts``: noisy per-class counts (sensitivity 1; class names are public).

    Tiny classes: their noisy count can be small or negative, and their statistics would be mostly noise. A
    class is kept iff its noisy count is at least ``max(min_clips, noise_floor * noise std)`` (2 by default;
    post-processing, so the decision costs nothing and reveals nothing beyond the noisy count); a dropped
    class gets count 0, its generator rows cannot be sampled, and the model file says so.
    """

    stage = "classes"

    def __init__(self, num_classes: int, *, weight: float = 1.0, min_clips: int = 2,
                 noise_floor: float = 2.0) -> None:
        self.num_classes = int(num_classes)
        self.weight = float(weight)
        self.min_clips = int(min_clips)
        self.noise_floor = float(noise_floor)

    def releases(self) -> list[ReleaseSpec]:
        return [ReleaseSpec("classes.counts", 1.0, weight=self.weight)]

    def local(self, labels: Tensor) -> Part:
        return {"counts": torch.bincount(labels.long().cpu(), minlength=self.num_classes)[:self.num_classes]
                .to(torch.float64)}

    def finish(self, merged: Mapping[str, Tensor], plan: BudgetPlan, sites: int = 1) -> NoisyCounts:
        std = plan.noise_std("classes.counts") * math.sqrt(sites)
        noisy = merged["counts"].to(torch.float64)
        threshold = max(float(self.min_clips), self.noise_floor * std)
        kept = torch.where(noisy >= threshold, noisy.round(), torch.zeros_like(noisy))
        return NoisyCounts(noisy, kept, threshold, std)


# -- a DP quantile of record norms (clip norms relative to the data's typical norm) -----------------

class DPNormQuantile:
    """``<name>.norm_histogram``: a noisy histogram of ``log2 |x_i|`` over fixed public bins (a quarter octave,
    ``2^-24 .. 2^40``; sensitivity 1), from which a quantile of the records' norms is read (post-processing).
    Used to set clip norms relative to the data's typical norm where no public scale exists (raw embeddings).

    Every empty bin carries noise too, and 256 bins of clamped noise would outweigh a thousand records: bins
    below ``3`` noise std are read as empty (a bin of records is a few hundred; pure noise exceeds 3 std in
    one bin of 740), and the quantile is taken over what is left. When no bin stands above that floor (a few
    dozen clips at a small epsilon), the bin with the largest noisy count stands in for the quantile."""

    LOW, HIGH, PER_OCTAVE = -24.0, 40.0, 4
    #: bins whose noisy count is below this many noise std are read as empty
    NOISE_FLOOR = 3.0

    def __init__(self, name: str, *, weight: float = 0.1) -> None:
        self.name = name
        self.weight = float(weight)
        self.edges = torch.arange(self.LOW, self.HIGH + 1e-9, 1.0 / self.PER_OCTAVE, dtype=torch.float64)

    def releases(self) -> list[ReleaseSpec]:
        return [ReleaseSpec(f"{self.name}.norm_histogram", 1.0, weight=self.weight)]

    def local(self, norms: Tensor) -> Part:
        logs = torch.log2(norms.double().clamp(min=2.0 ** self.LOW, max=2.0 ** self.HIGH))
        idx = torch.bucketize(logs, self.edges[1:-1])
        return {"norm_histogram": torch.bincount(idx, minlength=self.edges.numel() - 1).to(torch.float64)}

    def finish(self, merged: Mapping[str, Tensor], quantile: float = 0.5, noise_std: float = 0.0) -> float:
        """The upper edge of the bin where the cumulative count (bins above the noise floor only) first
        reaches ``quantile`` of their total; ``noise_std``: the std of the noise on each merged bin."""
        raw = merged["norm_histogram"].to(torch.float64)
        hist = torch.where(raw > self.NOISE_FLOOR * noise_std, raw, torch.zeros_like(raw)).clamp(min=0)
        total = float(hist.sum())
        if total <= 0:  # few clips for this epsilon: the bin with the largest noisy count (post-processing too)
            if not bool((raw > 0).any()):
                raise PrivacyError(f"{self.name}: every bin of the noisy norm histogram is empty (too few clips for "
                                   "this epsilon)")
            return float(2.0 ** self.edges[int(raw.argmax()) + 1])
        cum = hist.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor(quantile * total, dtype=torch.float64)))
        i = min(i, hist.numel() - 1)
        return float(2.0 ** self.edges[i + 1])


# -- normalisation -----------------------------------------------------------------------------------

class DPNormalization:
    """The mean and std ``[l, D]`` of the reduced training sequences under differential privacy.

    ``mode="dp"``: four releases, in order -- ``normalization.norm_histogram`` (a DP median ``R`` of the
    records' norms), ``normalization.sum`` (records clipped to ``clip * R``: the per position and feature
    mean is the noisy sum over the noisy count), ``normalization.deviation_histogram`` (a DP median ``R_d``
    of ``|x_i - mean|``) and ``normalization.sum_sq`` (``(x_i - mean)^2`` with ``x_i - mean`` clipped to
    ``clip * R_d``, summed over what shares one scale). ``scale`` says what shares one std:

    * ``"global"`` (default): one std for every element: ``sum_sq`` is a scalar, whose noise is negligible.
    * ``"feature"``: one per feature (pooled over positions): ``sum_sq`` is ``[D]``.
    * ``"element"``: one per position and feature, as without privacy: ``sum_sq`` is ``[l, D]``.

    A variance estimate is floored at twice its noise's std (below that it is indistinguishable from noise).
    Why ``global`` is the default: AST-like embeddings' per-element variances span three decades and the
    clip norm is set by the few high-gain dimensions, so per-element (and most per-feature) variances drown
    in the noise of ``sum_sq`` at thousands of clips (``docs/privacy.md``: measured). The std is taken about
    the *noisy* mean, so it includes the mean's error, and the normalised records have a typical norm of
    about ``sqrt(l * D)`` whatever the noise -- what later clip norms rely on; the mean's error that the
    generator's components do not absorb lands in its isotropic variance, so synthetic samples carry the
    uncertainty of the released mean (a classifier trained on them does not rely on what it cannot know).

    ``mode="fixed"``: mean 0, std 1 (data-independent): spends nothing.
    """

    stage = "normalization"
    SCALES = ("global", "feature", "element")

    def __init__(self, mode: str = "dp", *, clip: float = 1.5, scale: str = "global",
                 weights: Mapping[str, float] | None = None, floor: float = 1e-3) -> None:
        if mode not in ("dp", "fixed", "public"):
            raise PrivacyError(f"normalisation mode must be 'dp', 'fixed' or 'public' (got {mode!r})")
        if scale not in self.SCALES:
            raise PrivacyError(f"normalisation scale must be one of {', '.join(self.SCALES)} (got {scale!r})")
        if not clip > 0:
            raise PrivacyError(f"normalisation clip multiplier must be > 0 (got {clip})")
        self.mode = mode
        self.scale = scale
        self.clip = float(clip)
        self.weights = {"sum": 3.0, "sum_sq": 0.2, "norm_histogram": 0.1, "deviation_histogram": 0.1,
                        **(weights or {})}
        self.floor = float(floor)
        self.norms = DPNormQuantile("normalization", weight=self.weights["norm_histogram"])
        self.deviations = DPNormQuantile("normalization", weight=self.weights["deviation_histogram"])

    def releases(self) -> list[ReleaseSpec]:
        if self.mode in ("fixed", "public"):  # public: fitted on public clips (generator_dp_public_data)
            return [data_independent(f"normalization.{'fixed' if self.mode == 'fixed' else 'public_data'}")]
        w = self.weights
        return [ReleaseSpec("normalization.norm_histogram", 1.0, weight=w["norm_histogram"]),
                ReleaseSpec("normalization.sum", None, weight=w["sum"]),
                ReleaseSpec("normalization.deviation_histogram", 1.0, weight=w["deviation_histogram"]),
                ReleaseSpec("normalization.sum_sq", None, weight=w["sum_sq"])]

    # pass 1 ------------------------------------------------------------------------------------------
    def local_norms(self, x: Tensor) -> Part:
        return self.norms.local(row_norms(x))

    def clip_norm(self, merged_norms: Mapping[str, Tensor], noise_std: float = 0.0) -> float:
        """``noise_std``: of each merged bin (``plan.noise_std("normalization.norm_histogram")`` x sqrt(sites))."""
        return self.clip * self.norms.finish(merged_norms, noise_std=noise_std)

    # pass 2 ------------------------------------------------------------------------------------------
    def local_sum(self, x: Tensor, clip_norm: float) -> Part:
        return {"sum": clip_rows(x, clip_norm).sum(0)}

    def mean(self, merged_sum: Mapping[str, Tensor], count: float) -> Tensor:
        return merged_sum["sum"] / max(count, 1.0)

    # pass 3 ------------------------------------------------------------------------------------------
    def local_deviation_norms(self, x: Tensor, mean: Tensor) -> Part:
        return {"deviation_histogram": self.deviations.local(row_norms(x.double() - mean))["norm_histogram"]}

    def deviation_clip_norm(self, merged: Mapping[str, Tensor], noise_std: float = 0.0) -> float:
        return self.clip * self.deviations.finish({"norm_histogram": merged["deviation_histogram"]},
                                                  noise_std=noise_std)

    # pass 4 ------------------------------------------------------------------------------------------
    def local_sum_sq(self, x: Tensor, mean: Tensor, clip_norm: float) -> Part:
        sq = clip_rows(x.double() - mean, clip_norm).square().sum(0)  # [l, D]
        if self.scale == "feature":
            sq = sq.sum(0)
        elif self.scale == "global":
            sq = sq.sum()
        return {"sum_sq": sq}

    def finish(self, mean: Tensor, merged_sum_sq: Mapping[str, Tensor], count: float,
               noise_std: float = 0.0) -> dict[str, Tensor]:
        """``noise_std``: the std of the noise on each entry of the merged ``sum_sq``."""
        seq_len, dim = mean.shape
        per_entry = {"global": seq_len * dim, "feature": seq_len, "element": 1}[self.scale]
        n = max(count, 1.0)
        var = merged_sum_sq["sum_sq"].to(torch.float64) / (n * per_entry)
        positive = var[var > 0]
        floor = max((float(positive.mean()) if positive.numel() else 1.0) * self.floor ** 2,
                    2.0 * noise_std / (n * per_entry), 1e-16)
        std = var.clamp(min=floor).sqrt()
        std = std.unsqueeze(0).expand(seq_len, dim) if std.dim() == 1 else std.expand(seq_len, dim)
        return {"mean": mean.float(), "std": std.contiguous().float()}

    def fixed(self, seq_len: int, dim: int) -> dict[str, Tensor]:
        return {"mean": torch.zeros(seq_len, dim), "std": torch.ones(seq_len, dim)}

    def run(self, x: Tensor, counts: NoisyCounts, plan: BudgetPlan, rng: torch.Generator,
            ledger: PrivacyLedger) -> dict[str, Tensor]:
        """All passes on one site (``x`` the reduced training sequences ``[n, l, D]``)."""
        if self.mode == "fixed":
            ledger.record("normalization.fixed", 0.0, data_dependent=False)
            return self.fixed(x.shape[1], x.shape[2])
        n = counts.records
        c1 = self.clip_norm(privatize(self.local_norms(x), plan, self.stage, rng, ledger),
                            plan.noise_std("normalization.norm_histogram"))
        mean = self.mean(privatize(self.local_sum(x, c1), plan, self.stage, rng, ledger,
                                   sensitivities={"sum": c1}), n)
        c2 = self.deviation_clip_norm(privatize(self.local_deviation_norms(x, mean), plan, self.stage, rng, ledger),
                                      plan.noise_std("normalization.deviation_histogram"))
        sq = privatize(self.local_sum_sq(x, mean, c2), plan, self.stage, rng, ledger,
                       sensitivities={"sum_sq": c2 * c2})
        return self.finish(mean, sq, n, plan.noise_std("normalization.sum_sq", c2 * c2))


# -- the closed-form gaussian generator -------------------------------------------------------------

@dataclass
class GaussianDPFit:
    """What :class:`DPGaussian` derives for one generator key: F-space means per row, counts, the
    within-class covariance as ``directions [r, F]`` (orthonormal rows) with ``variances [r]``, the
    variance per element outside them, and the total within-class variance ``tr S``."""

    means: Tensor
    counts: Tensor
    directions: Tensor
    variances: Tensor
    residual: float
    total: float


class DPGaussian:
    """The closed-form ``gaussian`` generator's class sums and scatter, in a lower-dimensional basis.

    In the normalised space (``F = l * D``) the full scatter is ``F x F`` (151 M numbers at ``l = 16``):
    Analyze Gauss noise on it has spectral norm ``~ 2 z C^2 sqrt(F)``, far above every eigenvalue a few
    thousand clips give, and noise on ``F``-dim class means has norm ``z C sqrt(F) / n_c`` (``> 10`` times a
    typical record at 100 clips per class). So the statistics are released in the basis ``B = I_l (x) V``:
    every position, and the top ``k_f`` directions ``V [D, k_f]`` of the token covariance, itself released
    privately (``gaussian.basis``: ``sum_i sum_t z_it z_it^T``, ``D x D``, Analyze Gauss). ``k_f`` is the
    number of its noisy eigenvalues above the noise's expected spectral norm ``2 sigma sqrt(D)`` (those are
    signal), capped at ``max_features`` -- so it grows with epsilon. Then, with ``u_i = B z_i`` clipped to
    ``C_u`` (``clip`` times the typical in-basis norm, read off the released eigenvalues):

    * ``gaussian.sums`` ``[C, k]``: class sums (a record is in one row: parallel composition across classes
      -- class labels are assumed public, only the clips are protected);
    * ``gaussian.scatter`` ``[G, k, k]``: the uncentred scatter per generator key (or one pooled over all
      keys: ``shared_scatter``), Analyze Gauss;
    * ``gaussian.square`` ``[G]``: ``sum |clip(z_i)|^2`` per key (the total variance, for the variance
      outside the basis).

    Post-processing: means ``m_c = sums_c / n_c`` (mapped back ``B^T m_c``), the within-class covariance in
    the basis ``(S - sum n_c m_c m_c^T) / (n - rows)`` with negative eigenvalues zeroed, the variance per
    element outside the basis ``(total - between - tr within) / (F - k)``. No shrinkage estimate (it would
    need the fourth moments); the model samples ``mean + B^T W^(1/2) z + sqrt(residual) eps``.
    """

    stage = "gaussian"

    def __init__(self, seq_len: int, dim: int, *, clip: float = 1.0, max_features: int = 32,
                 shared_scatter: bool = True, weights: Mapping[str, float] | None = None,
                 normalized: bool = True, public_basis: bool = False) -> None:
        if not clip > 0:
            raise PrivacyError(f"gaussian clip multiplier must be > 0 (got {clip})")
        if max_features < 1:
            raise PrivacyError(f"gaussian max_features must be >= 1 (got {max_features})")
        self.seq_len, self.dim = int(seq_len), int(dim)
        self.features = self.seq_len * self.dim
        self.clip = float(clip)
        self.max_features = int(min(max_features, dim))
        self.shared_scatter = bool(shared_scatter)
        self.normalized = bool(normalized)
        self.public_basis = bool(public_basis)  # the feature basis comes from public clips: not released
        self.weights = {"basis": 1.0, "sums": 4.0, "scatter": 1.0, "square": 0.05, "norm_histogram": 0.1,
                        **(weights or {})}
        self.norms = DPNormQuantile("gaussian", weight=self.weights["norm_histogram"])

    def releases(self) -> list[ReleaseSpec]:
        w = self.weights
        specs = [] if self.normalized else self.norms.releases()
        specs += [data_independent("gaussian.basis.public_data")] if self.public_basis else \
            [ReleaseSpec("gaussian.basis", None, weight=w["basis"], symmetric=True)]
        return specs + [
                        ReleaseSpec("gaussian.sums", None, weight=w["sums"]),
                        ReleaseSpec("gaussian.scatter", None, weight=w["scatter"], symmetric=True),
                        ReleaseSpec("gaussian.square", None, weight=w["square"])]

    # the record clip norm ---------------------------------------------------------------------------------
    def public_clip_norm(self) -> float:
        """``clip * sqrt(l * D)``: in the normalised space a record's typical norm is ``sqrt(F)``."""
        return self.clip * math.sqrt(self.features)

    def min_clips_per_class(self, plan: BudgetPlan, k: int | None = None) -> int:
        """Below this many clips the noise on a class mean (norm ``z C_u sqrt(k) / n``) exceeds the clip norm
        ``C_u`` itself -- every record's own contribution: such a class mean is noise. ``k`` defaults to the
        smallest basis (every position, one feature direction)."""
        z = plan.noise_multiplier("gaussian.sums")
        k = self.seq_len if k is None else k
        return int(math.floor(z * math.sqrt(k))) + 1

    def check_classes(self, counts: NoisyCounts, plan: BudgetPlan, class_names: Sequence[str],
                      k: int | None = None) -> None:
        """Refuse when a kept class has fewer (noisy) clips than :meth:`min_clips_per_class` (post-processing
        of the noisy counts, so the refusal itself costs nothing)."""
        need = self.min_clips_per_class(plan, k)
        small = [f"{class_names[c]} (~{int(counts.noisy[c].round())})" for c in range(counts.noisy.numel())
                 if 0 < float(counts.kept[c]) < need]
        if small:
            from feda2v_toolkit.errors import short_list

            raise PrivacyError(f"too few clips per class for epsilon {plan.epsilon:g}: the gaussian generator's "
                               f"class means would be pure noise below {need} clips per class "
                               f"({short_list(small)}); raise epsilon, merge classes, or gather more clips")

    def fit_basis_to_classes(self, v: Tensor, evals: Tensor, counts: NoisyCounts,
                             plan: BudgetPlan) -> tuple[Tensor, Tensor]:
        """Keep at most as many feature directions as the smallest kept class supports: the noise on its mean
        (norm ``z C_u sqrt(l k_f) / n``) must stay below ``C_u`` (post-processing of the noisy counts)."""
        live = counts.kept[counts.kept > 0]
        if live.numel() == 0 or plan.noise_off:
            return v, evals
        z = plan.noise_multiplier("gaussian.sums")
        k_f = int(((float(live.min()) / max(z, 1e-12)) ** 2) // self.seq_len)
        k_f = max(1, min(k_f, v.shape[1]))
        return v[:, :k_f], evals[:k_f]

    # pass 1: the basis -----------------------------------------------------------------------------------
    def local_basis(self, z: Tensor, clip_norm: float) -> Part:
        """The token scatter of the clipped records: float32 products (clipped a hair below the bound so that
        rounding stays within it), summed in float64 per chunk."""
        flat = z.reshape(z.shape[0], -1)
        f = clip_factors(row_norms(flat), clip_norm * (1 - FLOAT32_MARGIN)).float()
        out = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for s in range(0, flat.shape[0], 1024):
            tokens = (flat[s:s + 1024].float() * f[s:s + 1024, None]).reshape(-1, self.dim)
            out += (tokens.T @ tokens).double()
        return {"basis": out}

    def finish_basis(self, merged: Mapping[str, Tensor], noise_std: float, count: float) -> tuple[Tensor, Tensor]:
        """``(V [D, k_f], eigenvalues [k_f])``: the noisy token scatter's top directions above the noise floor."""
        m = merged["basis"]
        evals, evecs = eigh((m + m.T) / 2)
        evals, evecs = evals.flip(0), evecs.flip(1)
        floor = 2.0 * noise_std * math.sqrt(self.dim)
        k_f = int((evals > floor).sum()) if noise_std > 0 else int((evals > evals[0] * 1e-12).sum())
        k_f = max(1, min(k_f, self.max_features))
        return evecs[:, :k_f], (evals[:k_f] / max(count, 1.0)).clamp(min=0)

    def project(self, z: Tensor, v: Tensor) -> Tensor:
        """``u = B z``: ``[n, l * k_f]`` (every position, the basis' feature directions)."""
        return (z.reshape(z.shape[0], self.seq_len, self.dim).double() @ v).reshape(z.shape[0], -1)

    def basis_clip_norm(self, eigenvalues: Tensor) -> float:
        """``clip`` times the typical in-basis norm ``sqrt(sum of the released per-record eigenvalues)``."""
        return self.clip * math.sqrt(max(float(eigenvalues.sum()), 1e-12))

    # pass 2: sums, scatter, square -----------------------------------------------------------------------
    def local_stats(self, z: Tensor, rows: Tensor, keys: Tensor, v: Tensor, clip_u: float, clip_norm: float,
                    num_rows: int, num_keys: int) -> Part:
        """``rows`` ``[n]``: each record's class row; ``keys`` ``[n]``: its generator key's index."""
        u = clip_rows(self.project(z, v), clip_u)
        k = u.shape[1]
        sums = torch.zeros(num_rows, k, dtype=torch.float64).index_add_(0, rows.long(), u)
        blocks = 1 if self.shared_scatter else num_keys
        key_idx = torch.zeros_like(keys) if self.shared_scatter else keys.long()
        scatter = torch.zeros(blocks, k, k, dtype=torch.float64)
        for b in range(blocks):
            ub = u[key_idx == b]
            scatter[b] = ub.T @ ub
        zc = clip_rows(z.reshape(z.shape[0], -1), clip_norm)
        square = torch.zeros(num_keys, dtype=torch.float64).index_add_(0, keys.long(), zc.square().sum(1))
        return {"sums": sums, "scatter": scatter, "square": square}

    def finish(self, merged: Mapping[str, Tensor], v: Tensor, counts: Tensor, key_rows: Sequence[Sequence[int]],
               *, conditioned: bool, scatter_noise_std: float = 0.0) -> list[GaussianDPFit | None]:
        """One fit per generator key. ``counts`` ``[C]``: the kept noisy counts; ``key_rows[g]``: the class rows
        of key ``g`` (``None`` for a key whose classes were all dropped by the noisy counts);
        ``conditioned``: one mean per class (else one per key, from its classes' sums);
        ``scatter_noise_std``: the std of the noise on each entry of the merged scatter -- eigenvalues of the
        within-class covariance below the noise's expected spectral norm ``2 sigma sqrt(k) / (n - rows)`` are
        indistinguishable from noise and set to 0 (their variance goes to the isotropic residual)."""
        sums, scatter, square = merged["sums"], merged["scatter"], merged["square"]
        k = sums.shape[1]
        basis = torch.kron(torch.eye(self.seq_len, dtype=torch.float64), v.T)  # [l k_f, l D]: u = basis @ z
        out = []
        shared_within = None
        n_all, rows_all = 0.0, 0
        if self.shared_scatter:
            n_all = sum(float(counts[list(r)].sum()) for r in key_rows)
            rows_all = sum(int((counts[list(r)] > 0).sum()) if conditioned else 1 for r in key_rows)
            between = torch.zeros(k, k, dtype=torch.float64)
            for r in key_rows:
                for m, n in self._row_means(sums, counts, r, conditioned):
                    between += n * torch.outer(m, m)
            shared_within = (scatter[0] - between) / max(n_all - rows_all, 1.0)
        for g, r in enumerate(key_rows):
            n = float(counts[list(r)].sum())
            if n <= 0:  # every class of this key was dropped by the noisy counts: nothing to fit
                out.append(None)
                continue
            row_means = self._row_means(sums, counts, r, conditioned)
            between = sum((nn * torch.outer(m, m) for m, nn in row_means), torch.zeros(k, k, dtype=torch.float64))
            groups = len(row_means)
            within = shared_within if shared_within is not None else (scatter[g] - between) / max(n - groups, 1.0)
            within = (within + within.T) / 2
            evals, evecs = eigh(within)
            evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
            dof = (n_all - rows_all) if shared_within is not None else (n - groups)
            floor = 2.0 * scatter_noise_std * math.sqrt(k) / max(dof, 1.0)
            evals = torch.where(evals > floor, evals, torch.zeros_like(evals))
            directions = (evecs.T @ basis)  # [k, F], orthonormal rows (B has orthonormal rows)
            between_energy = sum(nn * float(m @ m) for m, nn in row_means)
            total = max((float(square[g]) - between_energy) / max(n - groups, 1.0), float(evals.sum()))
            residual = max(total - float(evals.sum()), 0.0) / max(self.features - k, 1)
            means = torch.zeros(counts.numel() if conditioned else 1, self.features, dtype=torch.float64)
            row_counts = torch.zeros(means.shape[0], dtype=torch.float64)
            if conditioned:
                for c in r:
                    if counts[c] > 0:
                        means[c] = (sums[c] / counts[c]) @ basis
                        row_counts[c] = counts[c]
            else:
                means[0] = row_means[0][0] @ basis
                row_counts[0] = n
            out.append(GaussianDPFit(means, row_counts, directions, evals, residual, total))
        return out

    @staticmethod
    def _row_means(sums: Tensor, counts: Tensor, rows: Sequence[int], conditioned: bool) -> list[tuple[Tensor, float]]:
        if conditioned:
            return [(sums[c] / counts[c], float(counts[c])) for c in rows if counts[c] > 0]
        n = float(counts[list(rows)].sum())
        live = [c for c in rows if counts[c] > 0]
        return [(sums[live].sum(0) / max(n, 1.0), n)]

    def run(self, z: Tensor, labels: Tensor, counts: NoisyCounts, key_rows: Sequence[Sequence[int]],
            plan: BudgetPlan, rng: torch.Generator, ledger: PrivacyLedger, *, conditioned: bool,
            class_names: Sequence[str] | None = None) -> tuple[list[GaussianDPFit | None], dict[str, Any]]:
        """Every pass on one site. ``z`` ``[n, l, D]`` normalised training sequences, ``labels`` their classes.
        Records of dropped classes (kept count 0) are left out of every release."""
        keep = counts.kept[labels.long()] > 0
        z, labels = z[keep], labels[keep]
        if self.normalized:
            clip_norm = self.public_clip_norm()
        else:
            clip_norm = self.clip * self.norms.finish(privatize(self.norms.local(row_norms(z)), plan, self.stage,
                                                                rng, ledger),
                                                      noise_std=plan.noise_std("gaussian.norm_histogram"))
        basis = privatize(self.local_basis(z, clip_norm), plan, self.stage, rng, ledger,
                          sensitivities={"basis": clip_norm ** 2})
        v, evals = self.finish_basis(basis, plan.noise_std("gaussian.basis", clip_norm ** 2), counts.total)
        v, evals = self.fit_basis_to_classes(v, evals, counts, plan)
        k = self.seq_len * v.shape[1]
        if class_names is not None:
            self.check_classes(counts, plan, class_names, k)
        clip_u = self.basis_clip_norm(evals)
        row_of_key = {c: g for g, rows in enumerate(key_rows) for c in rows}
        keys = torch.tensor([row_of_key[int(c)] for c in labels.tolist()], dtype=torch.long)
        part = self.local_stats(z, labels, keys, v, clip_u, clip_norm, counts.kept.numel(), len(key_rows))
        noisy = privatize(part, plan, self.stage, rng, ledger,
                          sensitivities={"sums": clip_u, "scatter": clip_u ** 2, "square": clip_norm ** 2})
        fits = self.finish(noisy, v, counts.kept, key_rows, conditioned=conditioned,
                           scatter_noise_std=plan.noise_std("gaussian.scatter", clip_u ** 2))
        info = {"basis_features": int(v.shape[1]), "basis_dim": k, "clip_norm": clip_norm, "clip_norm_basis": clip_u}
        return fits, info


# -- fitted reducer and upsampler ------------------------------------------------------------------

class DPLeastSquares:
    """The ``lstsq`` upsampler's normal-equation sums with full sequences clipped to ``C_x`` and reduced ones
    to ``C_r`` (each set to ``clip`` times a DP median of the norms, ``lstsq.full_histogram`` /
    ``lstsq.reduced_histogram``); the count is the noisy class counts' total. Post-processing: the existing
    :meth:`~feda2v_toolkit.upsamplers.lstsq.LeastSquaresUpsampler.fit_from_statistics`."""

    stage = "lstsq"
    KEYS = ("sxr", "srr", "sum_x", "sum_r", "sxx")

    def __init__(self, *, clip: float = 1.2, weights: Mapping[str, float] | None = None) -> None:
        if not clip > 0:
            raise PrivacyError(f"lstsq clip multiplier must be > 0 (got {clip})")
        self.clip = float(clip)
        self.weights = {"sxr": 0.5, "srr": 0.2, "sum_x": 1.0, "sum_r": 0.2, "sxx": 0.05, "full_histogram": 0.1,
                        "reduced_histogram": 0.1, **(weights or {})}
        self.full = DPNormQuantile("lstsq", weight=self.weights["full_histogram"])
        self.reduced = DPNormQuantile("lstsq", weight=self.weights["reduced_histogram"])

    def releases(self) -> list[ReleaseSpec]:
        w = self.weights
        return [ReleaseSpec("lstsq.full_histogram", 1.0, weight=w["full_histogram"]),
                ReleaseSpec("lstsq.reduced_histogram", 1.0, weight=w["reduced_histogram"])] + \
               [ReleaseSpec(f"lstsq.{k}", None, weight=w[k], symmetric=(k == "srr")) for k in self.KEYS]

    def sensitivities(self, clip_full: float, clip_reduced: float) -> dict[str, float]:
        return {"sxr": clip_full * clip_reduced, "srr": clip_reduced ** 2, "sum_x": clip_full,
                "sum_r": clip_reduced, "sxx": clip_full ** 2}

    def local_norms(self, full_norms: Tensor, reduced_norms: Tensor) -> Part:
        return {"full_histogram": self.full.local(full_norms)["norm_histogram"],
                "reduced_histogram": self.reduced.local(reduced_norms)["norm_histogram"]}

    def clip_norms(self, merged: Mapping[str, Tensor], noise_std: float = 0.0) -> tuple[float, float]:
        """``noise_std``: of each merged bin (the two histograms have the same weight by default; pass the
        larger if not)."""
        return (self.clip * self.full.finish({"norm_histogram": merged["full_histogram"]}, noise_std=noise_std),
                self.clip * self.reduced.finish({"norm_histogram": merged["reduced_histogram"]}, noise_std=noise_std))

    @staticmethod
    def local_stats(pairs: Any, clip_full: float, clip_reduced: float, reduced_length: int, full_length: int,
                    dim: int) -> Part:
        """Clipped normal-equation sums over ``pairs()`` (reduced ``[B, l, D]``, full ``[B, L, D]``)."""
        short, L, D = reduced_length, full_length, dim
        out = {"sxr": torch.zeros(L, short, dtype=torch.float64), "srr": torch.zeros(short, short, dtype=torch.float64),
               "sum_x": torch.zeros(L, D, dtype=torch.float64), "sum_r": torch.zeros(short, D, dtype=torch.float64),
               "sxx": torch.zeros((), dtype=torch.float64)}
        # float32 products accumulated in float64, as the non-private fit does; clipped a hair below the bound
        # so that float32 rounding cannot push a record over it
        cx, cr = clip_full * (1 - FLOAT32_MARGIN), clip_reduced * (1 - FLOAT32_MARGIN)
        for reduced, full in pairs():
            x = full.float() * clip_factors(row_norms(full), cx).float().view(-1, 1, 1)
            r = reduced.float() * clip_factors(row_norms(reduced), cr).float().view(-1, 1, 1)
            xc = x.permute(1, 0, 2).reshape(L, -1)
            rc = r.permute(1, 0, 2).reshape(short, -1)
            out["sxr"] += (xc @ rc.T).double()
            out["srr"] += (rc @ rc.T).double()
            out["sum_x"] += x.sum(0).double()
            out["sum_r"] += r.sum(0).double()
            out["sxx"] += float(torch.linalg.vector_norm(x)) ** 2
        return out

    @staticmethod
    def statistics(merged: Mapping[str, Tensor], count: float) -> dict[str, Tensor]:
        """The dict :meth:`LeastSquaresUpsampler.fit_from_statistics` takes (``srr`` symmetrised, count noisy)."""
        stats = {k: merged[k].to(torch.float64) for k in DPLeastSquares.KEYS}
        stats["srr"] = (stats["srr"] + stats["srr"].T) / 2
        stats["count"] = torch.tensor(max(round(count), 1), dtype=torch.float64)
        return stats


class DPPositionPCA:
    """The ``pca`` reducer's position moments with full sequences clipped to ``C_x`` (``clip`` times a DP median
    of the norms, ``pca.norm_histogram``): ``pca.sum`` (``X``, sensitivity ``C_x``) and ``pca.outer``
    (``X X^T`` over positions, ``|X X^T|_F <= |X|^2``: ``C_x^2``, Analyze Gauss); the count is the noisy class
    counts' total. Post-processing: :meth:`~feda2v_toolkit.reducers.pca.PCAReducer.fit_from_statistics`."""

    stage = "pca"

    def __init__(self, *, clip: float = 1.2, weights: Mapping[str, float] | None = None) -> None:
        if not clip > 0:
            raise PrivacyError(f"pca clip multiplier must be > 0 (got {clip})")
        self.clip = float(clip)
        self.weights = {"sum": 1.0, "outer": 1.0, "norm_histogram": 0.1, **(weights or {})}
        self.norms = DPNormQuantile("pca", weight=self.weights["norm_histogram"])

    def releases(self) -> list[ReleaseSpec]:
        w = self.weights
        return [ReleaseSpec("pca.norm_histogram", 1.0, weight=w["norm_histogram"]),
                ReleaseSpec("pca.sum", None, weight=w["sum"]),
                ReleaseSpec("pca.outer", None, weight=w["outer"], symmetric=True)]

    @staticmethod
    def local_stats(batches: Any, clip_norm: float) -> Part:
        out: Part = {}
        for x in batches():
            xc = x.double() * clip_factors(row_norms(x), clip_norm * (1 - FLOAT32_MARGIN)).view(-1, 1, 1)
            cols = xc.permute(1, 0, 2).reshape(xc.shape[1], -1)
            if not out:
                out = {"sum": torch.zeros(xc.shape[1:], dtype=torch.float64),
                       "outer": torch.zeros(xc.shape[1], xc.shape[1], dtype=torch.float64)}
            out["sum"] += xc.sum(0)
            out["outer"] += cols @ cols.T
        return out

    @staticmethod
    def statistics(merged: Mapping[str, Tensor], count: float) -> dict[str, Tensor]:
        outer = merged["outer"].to(torch.float64)
        return {"sum": merged["sum"].to(torch.float64), "outer": (outer + outer.T) / 2,
                "count": torch.tensor(max(round(count), 1), dtype=torch.float64)}


# -- one site, end to end ------------------------------------------------------------------------------

def fit_private_gaussians(x: Tensor, labels: Tensor, counts: NoisyCounts, key_rows: Sequence[Sequence[int]],
                          plan: BudgetPlan, rng: torch.Generator, ledger: PrivacyLedger, *,
                          normalization: DPNormalization, gaussian: DPGaussian, rank: int,
                          conditioned: bool = True, class_names: Sequence[str] | None = None
                          ) -> tuple[dict[str, Tensor], list[Any], dict[str, Any]]:
    """The closed-form path on one site: the normalisation's and the gaussian's releases on the reduced
    training sequences ``x`` ``[n, l, D]`` (after the class counts), then one
    :class:`~feda2v_toolkit.generators.gaussian.GaussianGenerator` per key of ``key_rows`` (label-conditioned
    over all ``counts`` rows when ``conditioned``) set from the noisy statistics. Returns the normalisation
    (``mean``, ``std``), the generators and what was chosen (basis size, clip norms)."""
    from feda2v_toolkit.generators.gaussian import GaussianGenerator

    norm = normalization.run(x, counts, plan, rng, ledger)
    z = (x - norm["mean"]) / norm["std"]
    fits, info = gaussian.run(z, labels, counts, key_rows, plan, rng, ledger, conditioned=conditioned,
                              class_names=class_names)
    gens = []
    for fit in fits:
        gen = GaussianGenerator(seq_len=x.shape[1], dim=x.shape[2], rank=rank,
                                num_classes=counts.kept.numel() if conditioned else 0,
                                conditioning="label" if conditioned else None)
        if fit is not None:  # else every class of the key was dropped: the generator stays unfitted
            gen.set_parameters(fit.means, fit.counts, fit.directions, fit.variances, fit.total)
        gens.append(gen)
    return norm, gens, info
