"""Auditing a differential-privacy guarantee with membership inference (issue 17, part 5).

An ``(epsilon, delta)``-DP training bounds every membership attack: at any threshold, the true-positive rate
on members and the false-positive rate on non-members satisfy ``TPR <= e^epsilon * FPR + delta`` and
``TPR <= 1 - e^-epsilon * (1 - delta - FPR)`` (Kairouz et al. 2015). :func:`dp_bound_violations` checks
measured rates against it with Clopper-Pearson intervals (a violation must hold for the *lower* bound of the
TPR against the *upper* bound of the FPR, Bonferroni-corrected over every threshold and attack tried): a
violation is evidence of a bug -- too little noise, a step not counted, a release not protected.

Scores are "higher = more likely a member". :func:`gaussian_scores` gives two white-box attacks on the
closed-form ``gaussian`` generator: its log-likelihood of the clip, and minus the share of the clip's
deviation from its mean that lies outside the span of the model's components (with ``rank >= clips`` the
components span exactly the training clips' deviations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def gaussian_scores(gen: object, z: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
    """Per clip of ``z`` ``[n, seq_len, dim]`` (the generator's normalised space): ``loglik`` (up to a constant
    shared by the clips of one generator) and ``span`` (minus the share outside the components' span)."""
    n = z.shape[0]
    means = gen.means  # type: ignore[attr-defined]
    mu = means[labels.long()] if getattr(gen, "conditioning", None) == "label" else means[0].expand(n, -1)
    d = z.reshape(n, means.shape[1]).double() - mu.double()
    a = float(gen.shrinkage)  # type: ignore[attr-defined]
    s2 = a * float(gen.scale) + (1 - a) * float(gen.residual)  # type: ignore[attr-defined]
    s2 = max(s2, 1e-9 * max(float(gen.scale), 1e-12))  # type: ignore[attr-defined]
    low = math.sqrt(1 - a) * gen.components.double()  # type: ignore[attr-defined]
    low = low[low.norm(dim=1) > 0]
    inner = torch.eye(low.shape[0], dtype=torch.float64) + low @ low.T / s2
    chol = torch.linalg.cholesky(inner)
    proj = torch.cholesky_solve((d @ low.T).T, chol).T
    quad = (d.square().sum(1) - (d @ low.T * proj).sum(1) / s2) / s2
    if low.shape[0]:
        q, _ = torch.linalg.qr(low.T)
        inside = (d @ q).square().sum(1)
    else:
        inside = torch.zeros(n, dtype=torch.float64)
    share_out = 1 - inside / d.square().sum(1).clamp(min=1e-300)
    return {"loglik": -0.5 * quad, "span": -share_out}


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` Clopper-Pearson interval of a binomial proportion ``k / n``."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """The largest TPR an ``(epsilon, delta)``-DP mechanism allows at false-positive rate ``fpr``."""
    if math.isinf(epsilon):
        return 1.0
    return min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr))


@dataclass
class AuditPoint:
    attack: str
    target_fpr: float
    tp: int
    members: int
    fp: int
    non_members: int
    tpr_low: float
    fpr_high: float
    bound: float

    @property
    def violated(self) -> bool:
        return self.tpr_low > self.bound


def rates_at(trials: Sequence[tuple[Tensor, Tensor]], target_fpr: float) -> tuple[int, int, int, int]:
    """Pool ``(members, non_members)`` score sets (one per trained model) at a per-model threshold: the
    smallest score above which at most ``target_fpr`` of that model's non-members lie. Returns ``(tp, n_in,
    fp, n_out)``."""
    tp = n_in = fp = n_out = 0
    for members, non_members in trials:
        srt = torch.sort(non_members.double(), descending=True).values
        k = int(math.floor(target_fpr * srt.numel()))
        thr = srt[k] if k < srt.numel() else srt[-1] - 1
        tp += int((members.double() > thr).sum())
        fp += int((non_members.double() > thr).sum())
        n_in += members.numel()
        n_out += non_members.numel()
    return tp, n_in, fp, n_out


def dp_bound_violations(attacks: Mapping[str, Sequence[tuple[Tensor, Tensor]]], epsilon: float, delta: float,
                        fprs: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5),
                        alpha: float = 0.05) -> list[AuditPoint]:
    """Every (attack, FPR) point with its Clopper-Pearson bounds (Bonferroni over all points); a point is
    ``violated`` when even the lower TPR bound exceeds the DP bound at the upper FPR bound."""
    tests = max(1, len(attacks) * len(fprs))
    out = []
    for name, trials in attacks.items():
        for f in fprs:
            tp, n_in, fp, n_out = rates_at(trials, f)
            tpr_low, _ = clopper_pearson(tp, n_in, alpha / tests)
            _, fpr_high = clopper_pearson(fp, n_out, alpha / tests)
            out.append(AuditPoint(name, f, tp, n_in, fp, n_out, tpr_low, fpr_high,
                                  dp_tpr_bound(fpr_high, epsilon, delta)))
    return out
