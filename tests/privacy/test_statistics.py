"""Sensitivity declarations replayed on neighbouring datasets, the mechanism's noise, post-processing."""

from __future__ import annotations

import math

import pytest
import torch

from feda2v_toolkit.privacy import (
    PrivacyError,
    PrivacyLedger,
    ReleaseSpec,
    add_noise,
    add_symmetric_noise,
    plan_budget,
    secret_generator,
)
from feda2v_toolkit.privacy.statistics import (
    DPClassCounts,
    DPGaussian,
    DPLeastSquares,
    DPNormalization,
    DPNormQuantile,
    DPPositionPCA,
    fit_private_gaussians,
    privatize,
)

L, D, FULL = 4, 6, 12


def datasets(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, labels, extra)`` and neighbours: ``extra`` is one more record -- typical, huge, zero, negative."""
    g = torch.Generator().manual_seed(seed)
    x = 3 + torch.randn(20, L, D, generator=g)
    y = torch.arange(20) % 3
    extras = [3 + torch.randn(1, L, D, generator=g), 1e4 * torch.randn(1, L, D, generator=g),
              torch.zeros(1, L, D), -50 * torch.ones(1, L, D)]
    return [(x, y, e) for e in extras]


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], key: str) -> float:
    return float((a[key].double() - b[key].double()).norm())


def neighbours(seed: int = 0):
    for x, y, extra in datasets(seed):
        for label in range(3):
            yield x, y, torch.cat([x, extra]), torch.cat([y, torch.tensor([label])])


def test_counts_and_norm_histograms_have_sensitivity_one():
    counts, hist = DPClassCounts(3), DPNormQuantile("n")
    for x, y, x2, y2 in neighbours():
        assert gap(counts.local(y), counts.local(y2), "counts") <= 1 + 1e-9
        n1, n2 = x.flatten(1).norm(dim=1), x2.flatten(1).norm(dim=1)
        assert gap(hist.local(n1), hist.local(n2), "norm_histogram") <= 1 + 1e-9


@pytest.mark.parametrize("scale", DPNormalization.SCALES)
def test_normalisation_sums_respect_their_declared_sensitivity(scale):
    st = DPNormalization(scale=scale)
    c1, c2 = 7.0, 2.5
    mean = torch.full((L, D), 3.0)
    for x, _, x2, _ in neighbours():
        assert gap(st.local_sum(x, c1), st.local_sum(x2, c1), "sum") <= c1 + 1e-9
        assert gap(st.local_sum_sq(x, mean, c2), st.local_sum_sq(x2, mean, c2), "sum_sq") <= c2 ** 2 + 1e-9


def test_gaussian_statistics_respect_their_declared_sensitivity():
    st = DPGaussian(L, D, max_features=3)
    v = torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(1)))[0].double()
    clip, clip_u = 4.0, 2.0
    for x, y, x2, y2 in neighbours():
        keys, keys2 = (y >= 1).long(), (y2 >= 1).long()  # two generator keys: {0}, {1, 2}
        b1, b2 = st.local_basis(x, clip), st.local_basis(x2, clip)
        assert gap(b1, b2, "basis") <= clip ** 2 + 1e-6
        for shared in (True, False):
            st.shared_scatter = shared
            s1 = st.local_stats(x, y, keys, v, clip_u, clip, 3, 2)
            s2 = st.local_stats(x2, y2, keys2, v, clip_u, clip, 3, 2)
            assert gap(s1, s2, "sums") <= clip_u + 1e-9
            assert gap(s1, s2, "scatter") <= clip_u ** 2 + 1e-9
            assert gap(s1, s2, "square") <= clip ** 2 + 1e-9


def test_lstsq_and_pca_sums_respect_their_declared_sensitivity():
    lsq, pca = DPLeastSquares(), DPPositionPCA()
    cx, cr = 9.0, 3.0
    sens = lsq.sensitivities(cx, cr)
    g = torch.Generator().manual_seed(2)
    full = 2 + torch.randn(10, FULL, D, generator=g)

    def reduce(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool1d(f.transpose(1, 2), L).transpose(1, 2)

    def stream(*parts: torch.Tensor):
        return lambda: [(reduce(p), p) for p in parts]

    for extra in (2 + torch.randn(1, FULL, D, generator=g), 1e3 * torch.randn(1, FULL, D, generator=g)):
        full2 = torch.cat([full, extra])
        a = lsq.local_stats(stream(full), cx, cr, L, FULL, D)
        b = lsq.local_stats(stream(full2[:6], full2[6:]), cx, cr, L, FULL, D)
        for key in DPLeastSquares.KEYS:
            assert gap(a, b, key) <= sens[key] * (1 + 1e-9) + 1e-9, key
        pa = pca.local_stats(lambda: [full], cx)
        pb = pca.local_stats(lambda f=full2: [f], cx)
        assert gap(pa, pb, "sum") <= cx + 1e-9
        assert gap(pa, pb, "outer") <= cx ** 2 * (1 + 1e-9)


def test_noise_is_secret_and_analyze_gauss_is_symmetric():
    torch.manual_seed(0)
    a = add_noise(torch.zeros(1000), 1.0, secret_generator())
    torch.manual_seed(0)
    b = add_noise(torch.zeros(1000), 1.0, secret_generator())
    assert not torch.equal(a, b)  # the run's seed does not reproduce the noise
    assert 0.9 < float(a.std()) < 1.1
    m = add_symmetric_noise(torch.zeros(3, 40, 40), 2.0, secret_generator())
    assert torch.equal(m, m.transpose(-1, -2))
    iu = torch.triu_indices(40, 40)
    assert 1.8 < float(m[:, iu[0], iu[1]].std()) < 2.2  # each upper-triangle entry (and diagonal): std 2
    with pytest.raises(ValueError, match="secret generator"):
        add_noise(torch.zeros(3), 1.0, None)  # type: ignore[arg-type]


def test_undeclared_keys_are_refused_and_every_release_is_recorded():
    plan = plan_budget([ReleaseSpec("classes.counts", 1.0)], 1.0, 1e-5, 100)
    ledger = PrivacyLedger(1e-5)
    privatize({"counts": torch.ones(3)}, plan, "classes", secret_generator(), ledger)
    assert ledger.entries["classes.counts"].compositions == 1
    with pytest.raises(PrivacyError, match="not declared"):
        privatize({"sums": torch.ones(3)}, plan, "classes", secret_generator(), ledger)


def test_tiny_classes_are_dropped_by_their_noisy_count():
    counts = DPClassCounts(3, noise_floor=2.0)
    plan = plan_budget(counts.releases(), 0.5, 1e-5, 1000)
    std = plan.noise_std("classes.counts")
    out = counts.finish({"counts": torch.tensor([500.0, 1.5 * std, -3.0])}, plan)
    assert out.kept.tolist() == [500.0, 0.0, 0.0] and out.threshold == pytest.approx(2 * std)
    assert out.total == 500.0


def test_quantile_is_read_from_the_noisy_histogram():
    hist = DPNormQuantile("n")
    norms = torch.full((1000,), 100.0)
    value = hist.finish(hist.local(norms))
    assert 100.0 <= value <= 100.0 * 2 ** (1 / hist.PER_OCTAVE) + 1e-9
    with pytest.raises(PrivacyError, match="too few clips"):
        hist.finish({"norm_histogram": -torch.ones(hist.edges.numel() - 1)})
    # noise on every bin: hundreds of noisy empty bins must not drag the median away
    g = torch.Generator().manual_seed(0)
    norms = 250.0 * (1 + 0.05 * torch.randn(1200, generator=g))
    noisy = {"norm_histogram": hist.local(norms)["norm_histogram"] + 40.0 * torch.randn(hist.edges.numel() - 1,
                                                                                        generator=g)}
    assert 200.0 <= hist.finish(noisy, noise_std=40.0) <= 320.0


def test_closed_form_fit_end_to_end_spends_exactly_its_budget_and_refuses_tiny_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(200)
    x = (y.view(-1, 1, 1).float() * 0.5 + torch.randn(600, L, D, generator=g))
    counts_st, normal, gauss = DPClassCounts(3), DPNormalization(), DPGaussian(L, D, max_features=D)
    plan = plan_budget(counts_st.releases() + normal.releases() + gauss.releases(), 2.0, 1e-5, 600)
    rng, ledger = secret_generator(), PrivacyLedger(1e-5)
    counts = counts_st.finish(privatize(counts_st.local(y), plan, "classes", rng, ledger), plan)
    norm, gens, info = fit_private_gaussians(x, y, counts, [[0, 1, 2]], plan, rng, ledger, normalization=normal,
                                             gaussian=gauss, rank=8, class_names=["a", "b", "c"])
    assert ledger.epsilon() == pytest.approx(2.0, rel=1e-6)
    assert set(ledger.summary()["releases"]) == set(plan.releases)
    sample = gens[0].sample(5, labels=torch.tensor([0, 1, 2, 0, 1]), generator=torch.Generator().manual_seed(0))
    assert sample.shape == (5, L, D) and bool(torch.isfinite(sample).all())
    assert gauss.min_clips_per_class(plan, info["basis_dim"]) > 1
    counts.kept[2] = 3.0  # a class of 3 clips (as its noisy count would say) is refused with the reason
    with pytest.raises(PrivacyError, match="too few clips per class"):
        gauss.check_classes(counts, plan, ["a", "b", "c"], info["basis_dim"])
    assert math.isfinite(float(norm["std"].min()))
