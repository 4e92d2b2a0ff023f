"""Issue 17 part 5: an audit that can fail. On small data where the model without noise memorises its
training clips (the white-box attacks separate members from non-members), the DP model's best attack must
respect TPR <= e^eps * FPR + delta within Clopper-Pearson intervals -- and the same audit of the very same
machinery with the noise switched off must find the bound broken."""

from __future__ import annotations

import math

import pytest
import torch

from feda2v_toolkit.privacy import PrivacyLedger, plan_budget, secret_generator
from feda2v_toolkit.privacy.audit import dp_bound_violations, gaussian_scores
from feda2v_toolkit.privacy.statistics import (
    DPClassCounts,
    DPGaussian,
    DPNormalization,
    fit_private_gaussians,
    privatize,
)

L, D, PER_CLASS, MODELS, EPSILON, DELTA = 8, 32, 50, 10, 1.0, 1e-5


def population(n_per_class: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in R^(L*D): opposite means, a shared 5-direction structure, isotropic noise."""
    f = L * D
    base = torch.Generator().manual_seed(1234)  # the population itself is fixed
    pattern = torch.randn(f, generator=base)
    dirs = torch.linalg.qr(torch.randn(f, 5, generator=base))[0].T
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = (torch.where(y == 0, 1.0, -1.0).unsqueeze(1) * pattern
         + 2.0 * torch.randn(y.numel(), 5, generator=g) @ dirs + torch.randn(y.numel(), f, generator=g))
    return x.view(-1, L, D), y


def audit_trials(epsilon: float) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    counts_st = DPClassCounts(2, min_clips=1, noise_floor=0.0)
    # 100 clips: the norm histograms need more of the budget than the defaults give them to stand above noise
    normal = DPNormalization("dp", weights={"norm_histogram": 4.0, "deviation_histogram": 4.0})
    gauss = DPGaussian(L, D, max_features=D)
    specs = counts_st.releases() + normal.releases() + gauss.releases()
    trials: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"loglik": [], "span": []}
    for m in range(MODELS):
        g = torch.Generator().manual_seed(m)
        x_in, y_in = population(PER_CLASS, g)
        x_out, y_out = population(PER_CLASS, g)
        plan = plan_budget(specs, epsilon, DELTA, x_in.shape[0])
        rng, ledger = secret_generator(), PrivacyLedger(DELTA)
        counts = counts_st.finish(privatize(counts_st.local(y_in), plan, "classes", rng, ledger), plan)
        norm, gens, _ = fit_private_gaussians(x_in, y_in, counts, [[0, 1]], plan, rng, ledger, normalization=normal,
                                              gaussian=gauss, rank=L * D)
        if math.isfinite(epsilon):
            assert ledger.epsilon() == pytest.approx(epsilon, rel=1e-6)
        s_in = gaussian_scores(gens[0], (x_in - norm["mean"]) / norm["std"], y_in)
        s_out = gaussian_scores(gens[0], (x_out - norm["mean"]) / norm["std"], y_out)
        for name in trials:
            trials[name].append((s_in[name], s_out[name]))
    return trials


def test_the_dp_model_respects_the_bound():
    points = dp_bound_violations(audit_trials(EPSILON), EPSILON, DELTA)
    assert not [p for p in points if p.violated], [p for p in points if p.violated]


def test_the_same_audit_with_the_noise_switched_off_fails():
    points = dp_bound_violations(audit_trials(math.inf), EPSILON, DELTA)
    broken = [p for p in points if p.violated]
    assert broken, "the audit cannot fail: without noise the model should break the epsilon-1 bound"
    low = min(broken, key=lambda p: p.target_fpr)
    assert low.tp / low.members > 0.5 and low.fp / low.non_members <= 0.05  # TPR >> FPR at low FPR
