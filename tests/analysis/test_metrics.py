"""Metrics read like their definitions: R^2, cosine, Frechet distance (with the cross term), gaps,
diversity and the k-NN manifold metrics."""

from __future__ import annotations

import math

import pytest
import torch

from feda2v_toolkit.analysis.metrics import (
    ReconstructionStats,
    covariance_gap,
    frechet_distance,
    frechet_distance_gaussians,
    manifold_metrics,
    mean_gap,
    mean_pairwise_distance,
    r2_score,
    trace_sqrt_product,
)

from .helpers import structured


def gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov.double())
    return (mean.double() + torch.randn(n, mean.numel(), generator=g, dtype=torch.float64) @ chol.T)


def sample_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


# -- reconstruction -----------------------------------------------------------------------------------

def test_r2_of_the_identity_is_one_and_of_the_mean_sequence_is_zero():
    x = structured(6)
    assert r2_score(x, x) == pytest.approx(1.0)
    mean_sequence = x.mean(dim=0, keepdim=True).expand_as(x)
    assert r2_score(x, mean_sequence) == pytest.approx(0.0, abs=1e-5)
    assert r2_score(x, mean_sequence - 1.0) < 0  # worse than the mean sequence


def test_the_shared_positional_pattern_is_not_counted_as_kept_information():
    """A decoder that outputs only the mean sequence keeps nothing specific to any clip: R^2 0, although
    R^2 about each sequence's own mean (the older figure) credits it with the shared positional pattern."""
    g = torch.Generator().manual_seed(0)
    pattern = 3.0 * torch.randn(1, 20, 8, generator=g)  # strong, shared by every clip
    x = pattern + 0.3 * torch.randn(40, 20, 8, generator=g)
    stats = ReconstructionStats()
    stats.add(x, x.mean(0, keepdim=True).expand_as(x))
    assert stats.r2 == pytest.approx(0.0, abs=1e-5)
    assert stats.r2_about_sequence_mean > 0.9


def test_r2_pools_batches_as_sums():
    x, y = structured(8, seed=1), structured(8, seed=2)
    stats = ReconstructionStats()
    stats.add(x[:3], y[:3])
    stats.add(x[3:], y[3:])
    assert stats.r2 == pytest.approx(r2_score(x, y), rel=1e-5)  # float32 sums


def test_cosine_is_the_mean_over_tokens():
    x = torch.randn(2, 5, 4)
    stats = ReconstructionStats()
    stats.add(x, x)
    assert stats.cosine == pytest.approx(1.0, abs=1e-6)
    stats = ReconstructionStats()
    stats.add(x, -x)
    assert stats.cosine == pytest.approx(-1.0, abs=1e-6)
    y = x.clone()
    y[:, ::2] *= -1  # tokens 0, 2, 4 flipped: mean cosine (3 * -1 + 2 * 1) / 5
    stats = ReconstructionStats()
    stats.add(x, y)
    assert stats.cosine == pytest.approx(-0.2, abs=1e-6)


# -- Frechet distance ---------------------------------------------------------------------------------

def test_frechet_of_identical_sets_is_zero():
    x = torch.randn(40, 12)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_for_diagonal_gaussians():
    # ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected)


def test_frechet_cross_term_for_non_commuting_covariances():
    # S1 = I, S2 = S: the cross term is tr sqrt(S), i.e. the sum of sqrt(eigenvalues of S)
    s = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # eigenvalues 1 and 3
    expected = 2 + 4 - 2 * (1 + math.sqrt(3))
    assert frechet_distance_gaussians(torch.zeros(2), torch.eye(2), torch.zeros(2), s) == pytest.approx(expected)
    # a rotated anisotropic pair: the cross term is not tr(S1^1/2 S2^1/2)
    r = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]])
    s1, s2 = torch.diag(torch.tensor([4.0, 0.25])), r @ torch.diag(torch.tensor([1.0, 9.0])) @ r.T
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0)
    expected = float(s1.trace() + s2.trace() - 2 * eig.sqrt().sum())
    assert frechet_distance_gaussians(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_from_samples_equals_the_formula_on_their_sample_statistics():
    cov1 = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    cov2 = torch.tensor([[1.0, -0.4, 0.2], [-0.4, 3.0, 0.0], [0.2, 0.0, 1.5]])
    x = gaussian(200, torch.tensor([0.0, 1.0, -1.0]), cov1, 0)
    y = gaussian(150, torch.tensor([0.5, 0.0, -1.0]), cov2, 1)
    mx, cx = sample_stats(x)
    my, cy = sample_stats(y)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance_gaussians(mx, cx, my, cy), rel=1e-8)


def test_frechet_works_with_more_features_than_samples():
    # F = 5000 > n: computed from Gram matrices; equals the feature-space formula on a projection that
    # keeps all the variation (both sets live in one 40-dimensional subspace)
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(5000, 40, generator=g, dtype=torch.float64))[0]  # [F, 40]
    low_x = torch.randn(30, 40, generator=g, dtype=torch.float64)
    low_y = torch.randn(25, 40, generator=g, dtype=torch.float64) * 1.5 + 0.3
    x, y = low_x @ basis.T, low_y @ basis.T
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(low_x, low_y), rel=1e-8)
    mx, cx = sample_stats(low_x)
    my, cy = sample_stats(low_y)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance_gaussians(mx, cx, my, cy), rel=1e-6)


def test_trace_sqrt_product_is_the_nuclear_norm_of_the_cross_gram():
    a, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    s1, s2 = a.T @ a, b.T @ b
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    expected = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    assert trace_sqrt_product(a, b) == pytest.approx(float(expected), rel=1e-8)


# -- gaps, diversity, manifold --------------------------------------------------------------------------

def test_gaps_are_zero_for_identical_sets_and_grow_with_differences():
    x = torch.randn(50, 8)
    assert mean_gap(x, x) == pytest.approx(0.0, abs=1e-12)
    assert covariance_gap(x, x) == pytest.approx(0.0, abs=1e-6)
    assert mean_gap(x + 1.0, x) > 0.5
    assert covariance_gap(2 * x, x) == pytest.approx(3.0, rel=1e-6)  # ||4S - S|| / ||S||


def test_diversity_is_the_mean_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(x) == pytest.approx((5 + 5 + 0) * 2 / 6)


def test_manifold_metrics_of_a_set_against_itself_and_a_far_away_set():
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    same = manifold_metrics(x, x, k=3)
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    assert same.density >= 1.0
    far = manifold_metrics(x + 100.0, x, k=3)
    assert (far.precision, far.recall, far.density, far.coverage) == (0.0, 0.0, 0.0, 0.0)
    collapsed = manifold_metrics(x.mean(0, keepdim=True).repeat(60, 1) + 1e-3 * x, x, k=3)
    assert collapsed.precision == 1.0 and collapsed.recall < 0.3  # faithful but not diverse


# -- bounded memory -----------------------------------------------------------------------------------


def test_distribution_figures_come_from_float64_blocks_and_leave_the_samples_untouched(monkeypatch):
    from feda2v_toolkit.analysis import metrics
    from feda2v_toolkit.analysis.evaluate import distribution_metrics

    g = torch.Generator().manual_seed(3)
    s = torch.randn(70, 40, generator=g, dtype=torch.float64) * 1.5 + 0.2
    r = torch.randn(90, 40, generator=g, dtype=torch.float64)
    s_before, r_before = s.clone(), r.clone()
    whole = distribution_metrics(s, r, k=3, seed=1)
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 8 * 40 * 7)  # 7 rows a block
    monkeypatch.setattr(metrics, "DISTANCE_ROWS", 11)
    blocked = distribution_metrics(s, r, k=3, seed=1)
    assert torch.equal(s, s_before) and torch.equal(r, r_before)
    for name, value in vars(whole).items():
        assert getattr(blocked, name) == (value if value is None else pytest.approx(value, rel=1e-10, abs=1e-12)), name
    # and the figures are those of the definitions on whole float64 copies
    diffs = torch.cdist(s, r)
    assert metrics.nearest_distances(s, r, rows=9) == pytest.approx(diffs.min(1).values, rel=1e-12)
    assert blocked.diversity_real == pytest.approx(float(torch.cdist(r, r).sum()) / (90 * 89), rel=1e-10)
    assert blocked.frechet == pytest.approx(frechet_distance_gaussians(*sample_stats(s), *sample_stats(r)), rel=1e-8)


def test_principal_directions_span_the_top_of_the_spectrum():
    from feda2v_toolkit.analysis.metrics import principal_directions, project

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 30, generator=g) * torch.linspace(5, 0.1, 30)  # variance falls along the axes
    mu, basis = principal_directions(x, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-10)
    _, _, v = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)
    assert torch.allclose((basis.T @ v[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(project(x, mu, basis), (x.double() - mu) @ basis)


def test_principal_directions_beyond_the_rank_are_zero_not_amplified_round_off():
    from feda2v_toolkit.analysis.metrics import principal_directions

    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    _, basis = principal_directions(x, 4)  # rank 2
    assert torch.allclose(basis[:, :2].T @ basis[:, :2], torch.eye(2, dtype=torch.float64), atol=1e-10)
    assert bool((basis[:, 2:] == 0).all())


def test_pair_figures_are_the_one_figure_functions_and_the_halves_reference():
    from feda2v_toolkit.analysis.metrics import pair_figures

    g = torch.Generator().manual_seed(5)
    s, r = torch.randn(30, 12, generator=g) + 0.3, torch.randn(40, 12, generator=g)
    both = pair_figures(s, r, k=3, halves_seed=0)
    assert both.frechet == pytest.approx(frechet_distance(s, r), rel=1e-12)
    assert both.mean_gap == pytest.approx(mean_gap(s, r), rel=1e-12)
    assert both.covariance_gap == pytest.approx(covariance_gap(s, r), rel=1e-12)
    assert both.manifold == manifold_metrics(s, r, k=3)
    assert both.s.diversity == pytest.approx(mean_pairwise_distance(s), rel=1e-12)
    assert both.r.diversity == pytest.approx(mean_pairwise_distance(r), rel=1e-12)
    # two seeded halves of the real set: the Frechet distance of those halves' own rows
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert both.r.halves == pytest.approx(frechet_distance(r[perm[:20]], r[perm[20:]]), rel=1e-9)
    assert both.s.halves is None and pair_figures(s, r).manifold is None


def test_pair_figures_hold_one_gram_matrix_at_a_time(monkeypatch):
    """Memory: the synthetic set's Gram, the real set's and the cross Gram are never held together (at 4,096
    rows a side each is 134 MB), so evaluate's peak does not grow by three of them with the data."""
    import weakref

    from feda2v_toolkit.analysis import metrics

    live: list[weakref.ref] = []
    most = [0]
    real_gram = metrics._gram

    def counted(*args, **kwargs):
        alive = sum(ref() is not None for ref in live)
        most[0] = max(most[0], alive + 1)
        out = real_gram(*args, **kwargs)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(metrics, "_gram", counted)
    g = torch.Generator().manual_seed(6)
    figures = metrics.pair_figures(torch.randn(50, 3, 4, generator=g), torch.randn(60, 3, 4, generator=g), k=5,
                                   halves_seed=1)
    assert len(live) == 3 and most[0] == 1
    assert figures.manifold is not None and figures.r.halves is not None


def test_nearest_both_ways_are_the_two_nearest_distance_queries_from_one_pass(monkeypatch):
    from feda2v_toolkit.analysis import metrics

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 3, 5, generator=g), torch.randn(23, 3, 5, generator=g)
    calls = []
    real = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda x, y: calls.append(1) or real(x, y))
    a_to_b, b_to_a = metrics.nearest_both_ways(a, b, rows=10)
    assert len(calls) == 4 * 3  # each pair of blocks once
    exact = torch.cdist(a.flatten(1).double(), b.flatten(1).double())
    torch.testing.assert_close(a_to_b, exact.min(dim=1).values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b_to_a, exact.min(dim=0).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(a_to_b, metrics.nearest_distances(a, b, rows=10))
