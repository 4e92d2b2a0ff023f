"""``gaussian``: a class-conditional Gaussian with a shrunk covariance, fitted in closed form."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.analysis.metrics import nearest_distances
from feda2v_toolkit.generators.gaussian import GaussianGenerator, ledoit_wolf

from .helpers import D, L, ctx, tiny_config, two_class_data


def gen(**kw) -> GaussianGenerator:
    args = {"seq_len": L, "dim": D, "rank": 8, "num_classes": 2, "conditioning": "label"} | kw
    return GaussianGenerator(**args)


def draw(g: GaussianGenerator, n: int, label: int | None = None, seed: int = 0, **kw) -> torch.Tensor:
    labels = torch.full((n,), label) if label is not None else None
    return g.sample(n, labels=labels, generator=torch.Generator().manual_seed(seed), **kw)


def test_from_config_conditions_on_labels_by_default():
    g = GaussianGenerator.from_config(tiny_config(), seq_len=L, dim=D, num_classes=3)
    assert g.conditioning == "label" and g.rank == 4 and g.shrinkage_setting == "auto"
    assert GaussianGenerator.from_config(tiny_config(gaussian_conditioned=False), seq_len=L, dim=D,
                                         num_classes=3).conditioning is None
    assert GaussianGenerator.from_config(tiny_config(), seq_len=L, dim=D, num_classes=3,
                                         condition_dim=5).conditioning == "embedding"


def test_label_conditioned_samples_have_their_class_mean_and_spread():
    x, labels, means = two_class_data(n_per_class=400)
    g = gen(rank=32)
    g.fit(x, labels=labels)
    for c in (0, 1):
        s = draw(g, 4000, c, seed=c)
        assert torch.allclose(s.mean(0), means[c], atol=0.05)
        real = x[labels == c]
        assert s.var(0).mean() == pytest.approx(float(real.var(0).mean()), rel=0.1)


def test_samples_follow_the_fitted_covariance_including_its_correlations():
    g0 = torch.Generator().manual_seed(3)
    factor = torch.randn(L * D, 3, generator=g0)  # rank-3 correlated structure + a little noise
    x = (torch.randn(3000, 3, generator=g0) @ factor.T + 0.1 * torch.randn(3000, L * D, generator=g0)).view(-1, L, D)
    g = gen(conditioning=None, rank=3, num_classes=0, shrinkage=0.0)
    g.fit(x)
    s = draw(g, 6000).reshape(6000, -1)
    real_cov = torch.cov(x.reshape(3000, -1).T)
    assert torch.linalg.matrix_norm(torch.cov(s.T) - real_cov) / torch.linalg.matrix_norm(real_cov) < 0.08


def test_validation_loss_is_the_exact_gaussian_negative_log_likelihood_per_element():
    x, labels, _ = two_class_data(n_per_class=20)
    g = gen(rank=4, shrinkage=0.3)
    g.fit(x, labels=labels)
    terms = g.loss_terms(x, labels=labels, conditions=None, ctx=ctx(tiny_config()))
    a, m, rest = float(g.shrinkage), float(g.scale), float(g.residual)
    low = (1 - a) ** 0.5 * g.components.double()
    cov = low.T @ low + (a * m + (1 - a) * rest) * torch.eye(L * D, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(torch.zeros(L * D, dtype=torch.float64), covariance_matrix=cov)
    centred = x.reshape(40, -1).double() - g.means.double()[labels]
    assert terms["loss"] == pytest.approx(float(-dist.log_prob(centred).mean()) / (L * D), rel=1e-6)
    assert list(terms) == ["loss", "mse"]


def test_ledoit_wolf_shrinks_hard_when_samples_are_few_and_little_when_they_are_many():
    g0 = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.2, 3.0, 50)

    def intensity(n: int) -> float:
        x = torch.randn(n, 50, generator=g0, dtype=torch.float64) * scales
        x = x - x.mean(0)
        gram = x @ x.T
        return ledoit_wolf(gram, gram.diagonal(), 50)

    few, many = intensity(8), intensity(4000)
    assert 0 <= many < 0.05 < few <= 1


def test_samples_are_as_far_from_the_training_clips_as_new_real_clips_are():
    """The privacy property: with far fewer clips than dimensions, shrinkage gives samples variance outside
    the span of the training clips, so they do not sit closer to them than unseen real clips do."""
    g0 = torch.Generator().manual_seed(1)
    factor = torch.randn(L * D, 6, generator=g0)

    def clips(n: int) -> torch.Tensor:
        return (torch.randn(n, 6, generator=g0) @ factor.T + torch.randn(n, L * D, generator=g0)).view(n, L, D)

    train, heldout = clips(12), clips(200)
    g = gen(conditioning=None, num_classes=0)
    g.fit(train)
    synthetic = draw(g, 200)
    ratio = float(nearest_distances(synthetic, train).median() / nearest_distances(heldout, train).median())
    assert 0.9 < ratio < 1.2
    no_shrinkage = gen(conditioning=None, num_classes=0, shrinkage=0.0)
    no_shrinkage.fit(train)
    too_close = float(nearest_distances(draw(no_shrinkage, 200), train).median()
                      / nearest_distances(heldout, train).median())
    assert too_close < ratio - 0.1


def test_embedding_conditioning_follows_a_linear_map_of_the_condition():
    g0 = torch.Generator().manual_seed(2)
    e = torch.randn(500, 3, generator=g0)
    coef = torch.randn(3, L * D, generator=g0)
    x = (e @ coef + 0.1 * torch.randn(500, L * D, generator=g0)).view(500, L, D)
    g = GaussianGenerator(seq_len=L, dim=D, rank=4, condition_dim=3, conditioning="embedding")
    g.fit(x, conditions=e)
    probe = torch.eye(3)
    mean = torch.stack([draw(g, 2000, conditions=probe[i].expand(2000, 3), seed=i).mean(0) for i in range(3)])
    assert torch.allclose(mean.reshape(3, -1), coef, atol=0.1)


def test_fit_is_deterministic_and_refuses_what_it_cannot_sample():
    x, labels, _ = two_class_data(n_per_class=10)
    a, b = gen(), gen()
    a.fit(x, labels=labels)
    b.fit(x, labels=labels)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(RuntimeError, match="not fitted"):
        draw(gen(), 2, 0)
    only_zero = gen(num_classes=3)
    only_zero.fit(x[labels == 0], labels=labels[labels == 0])
    with pytest.raises(ValueError, match="no training sequences"):
        draw(only_zero, 2, 1)
    with pytest.raises(RuntimeError, match="closed form"):
        a.training_step(x, labels=labels, conditions=None, optimizers={}, ctx=ctx(tiny_config()))


def _covariance(g: GaussianGenerator) -> torch.Tensor:
    c = g.components.double()
    return c.T @ c  # the components' signs are arbitrary; their outer product is not


def _assert_same_fit(a: GaussianGenerator, b: GaussianGenerator) -> None:
    for k in ("means", "counts", "residual", "shrinkage", "scale"):
        torch.testing.assert_close(a.state_dict()[k], b.state_dict()[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_covariance(a), _covariance(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["label", None])
@pytest.mark.parametrize("n", [30, 200])  # fewer, and more, sequences than l * D
def test_fit_through_statistics_equals_the_fit_on_the_data_itself(conditioning, n):
    torch.manual_seed(0)
    x = torch.randn(n, L, D) * torch.linspace(0.2, 3, L * D).view(L, D) + 1
    y = torch.arange(n) % 3
    a = GaussianGenerator(seq_len=L, dim=D, rank=5, num_classes=3, conditioning=conditioning)
    b = GaussianGenerator(seq_len=L, dim=D, rank=5, num_classes=3, conditioning=conditioning)
    assert a.fit(x, labels=y) == pytest.approx(b._fit_direct(x, labels=y), rel=1e-9)
    _assert_same_fit(a, b)


@pytest.mark.parametrize("conditioning", ["label", None])
def test_statistics_of_parts_merge_into_exactly_the_fit_on_all_the_data(conditioning):
    """Nodes with unequal class mixes (one without class 2): the merged fit is the centralised fit."""
    torch.manual_seed(1)
    x = torch.randn(60, L, D) * 2 + torch.arange(60).remainder(3).view(-1, 1, 1)
    y = torch.arange(60) % 3
    whole = GaussianGenerator(seq_len=L, dim=D, rank=6, num_classes=3, conditioning=conditioning)
    fed = GaussianGenerator(seq_len=L, dim=D, rank=6, num_classes=3, conditioning=conditioning)
    parts = [(x[:25][y[:25] != 2], y[:25][y[:25] != 2]), (x[25:47], y[25:47]), (x[47:], y[47:])]
    stats = [fed.fit_statistics(xp, labels=yp) for xp, yp in parts]
    got = fed.fit_from_statistics(GaussianGenerator.merge_statistics(stats))
    union = whole.fit(torch.cat([xp for xp, _ in parts]), labels=torch.cat([yp for _, yp in parts]))
    assert got == pytest.approx(union, rel=1e-9)
    _assert_same_fit(fed, whole)


def test_statistics_hold_at_most_max_rank_directions_per_class_and_the_exact_variance():
    x = torch.randn(40, L, D)
    g = gen(rank=3)
    stats = g.fit_statistics(x, labels=torch.arange(40) % 2, max_rank=3)
    assert stats["factor_rows"].tolist() == [3, 3] and stats["factors"].shape == (6, L * D)
    full = g.fit_statistics(x, labels=torch.arange(40) % 2)
    assert full["factor_rows"].tolist() == [19, 19]  # every non-zero direction: n_c - 1
    torch.testing.assert_close(stats["square"], full["square"])


def _stream(gen, x, labels, rows, rank):
    """Block-by-block statistics, merged one block at a time as a site does (training.site)."""
    acc = None
    for s in range(0, x.shape[0], rows):
        part = gen.fit_statistics(x[s:s + rows], labels=labels[s:s + rows], max_rank=None)
        acc = part if acc is None else GaussianGenerator.merge_statistics([acc, part], max_rank=rank)
    return acc, GaussianGenerator.merge_statistics([acc], max_rank=rank, compact=True)


def test_statistics_merged_block_by_block_are_the_statistics_of_all_the_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, 6, generator=g, dtype=torch.float64)  # F = 24: never more than 24 directions
    labels = torch.arange(300) % 3
    gen = GaussianGenerator(seq_len=4, dim=6, rank=24, num_classes=3, conditioning="label")
    whole = gen.fit_statistics(x, labels=labels, max_rank=None)
    streamed, _ = _stream(gen, x, labels, 40, 24)  # rank >= F: nothing is ever left out
    for k in ("counts", "sums", "square", "quartic", "cubic"):
        torch.testing.assert_close(streamed[k], whole[k], rtol=1e-9, atol=1e-9)
    off_w = torch.cat([torch.zeros(1), whole["factor_rows"].cumsum(0)]).long()
    off_s = torch.cat([torch.zeros(1), streamed["factor_rows"].cumsum(0)]).long()
    for c in range(3):  # each class's scatter, exactly (kept stacked up to 2 x rank rows, then re-factored)
        fw, fs = whole["factors"][off_w[c]:off_w[c + 1]], streamed["factors"][off_s[c]:off_s[c + 1]]
        torch.testing.assert_close(fs.T @ fs, fw.T @ fw, rtol=1e-9, atol=1e-9)


def test_a_streamed_factor_keeps_the_top_directions_of_the_whole_scatter():
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(4, 64, generator=g, dtype=torch.float64) * torch.tensor([8.0, 6, 4, 3]).unsqueeze(1)
    x = (torch.randn(1000, 4, generator=g, dtype=torch.float64) @ signal
         + 0.3 * torch.randn(1000, 64, generator=g, dtype=torch.float64)).reshape(1000, 8, 8)
    labels = torch.zeros(1000, dtype=torch.long)
    gen = GaussianGenerator(seq_len=8, dim=8, rank=4, num_classes=1, conditioning="label")
    whole = gen.fit_statistics(x, labels=labels, max_rank=4)
    _, streamed = _stream(gen, x, labels, 100, 4)
    assert int(streamed["factor_rows"][0]) == 4
    top_w = torch.linalg.svd(whole["factors"], full_matrices=False)[2]
    top_s = torch.linalg.svd(streamed["factors"], full_matrices=False)[2]
    cosines = torch.linalg.svdvals(top_w @ top_s.T)  # of the principal angles between the two subspaces
    assert float(cosines.min()) > 0.999
    kept_w, kept_s = float(whole["factors"].square().sum()), float(streamed["factors"].square().sum())
    assert abs(kept_s - kept_w) / kept_w < 1e-3
    for k in ("counts", "sums", "square"):  # exact whatever was left out of the factors
        torch.testing.assert_close(streamed[k], whole[k], rtol=1e-9, atol=1e-9)
    # the third and fourth moments' mean-shift corrections use the kept directions only: close, not exact
    torch.testing.assert_close(streamed["cubic"], whole["cubic"], rtol=1e-3, atol=1e-3 * float(whole["cubic"].abs().max()))
    assert abs(float(streamed["quartic"][0] / whole["quartic"][0]) - 1) < 1e-3


# -- two exchanges: statistics about the merged means (what train and federate use) -------------------------

def _stream_about_means(gen, x, labels, rows, keep=2):
    """The two exchanges of a site streaming its blocks (training.site): the per class counts and sums first,
    then the statistics about their means, merged one block at a time; returns the release and the most
    factor rows held while streaming."""
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    stage = GeneratorStatisticsStage()
    blocks = [(x[s:s + rows], labels[s:s + rows]) for s in range(0, x.shape[0], rows)]
    means = stage.means([stage.means_local(gen, xb, lb) for xb, lb in blocks])
    acc, held = None, 0
    for xb, lb in blocks:
        part = stage.local(gen, xb, lb, None, means=means)
        acc = part if acc is None else GaussianGenerator.merge_statistics([acc, part], max_rank=keep * gen.rank)
        held = max(held, int(acc["factors"].shape[0]))
    return GaussianGenerator.merge_statistics([acc], max_rank=gen.rank, compact=True), held


@pytest.mark.parametrize("conditioning", ["label", None])
def test_statistics_about_the_merged_means_give_the_whole_data_fit(conditioning):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 4, 6, generator=g, dtype=torch.float64) * 2 + torch.arange(90).remainder(3).view(-1, 1, 1)
    labels = torch.arange(90) % 3
    streamed = GaussianGenerator(seq_len=4, dim=6, rank=24, num_classes=3, conditioning=conditioning)
    whole = GaussianGenerator(seq_len=4, dim=6, rank=24, num_classes=3, conditioning=conditioning)
    release, _ = _stream_about_means(streamed, x, labels, 20)  # rank >= F = 24: nothing is left out
    assert "cubic" not in release and "factor_rows" not in release  # no per-class scatter
    got = streamed.fit_from_statistics(release)
    want = whole.fit(x, labels=labels if conditioning else None)
    assert got == pytest.approx(want, rel=1e-9)
    _assert_same_fit(streamed, whole)


def test_statistics_about_the_merged_means_hold_one_factor_whatever_the_number_of_classes():
    """Per-class statistics hold a factor per class (here 40 x 7 rows); about the merged means one pooled factor
    of at most (1 + REFACTOR) x keep x rank + a block's rows is held, and the site releases the top rank
    directions."""
    from feda2v_toolkit.generators.gaussian import REFACTOR

    g = torch.Generator().manual_seed(4)
    x = torch.randn(320, 8, 8, generator=g, dtype=torch.float64) + torch.arange(320).remainder(40).view(-1, 1, 1)
    labels = torch.arange(320) % 40
    gen = GaussianGenerator(seq_len=8, dim=8, rank=3, num_classes=40, conditioning="label")
    release, held = _stream_about_means(gen, x, labels, 32)
    assert held <= (1 + REFACTOR) * 2 * 3 + 32 and release["factors"].shape == (3, 64)
    per_class = gen.fit_statistics(x, labels=labels)
    assert per_class["factors"].shape[0] == 40 * 7
    for k in ("counts", "square", "quartic"):  # exact whatever was left out of the factor
        torch.testing.assert_close(release[k], per_class[k], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(release["means"], per_class["sums"] / per_class["counts"].unsqueeze(1))


def test_data_with_no_more_directions_than_kept_stay_exact_through_the_streaming_cuts():
    """Three directions (and the class means) in 64 features, streamed past 2 x keep x rank rows: the float32
    re-factorings leave out only rounding, so they are taken again in float64 -- no probes, nothing reported
    left out, the release's ||S||_F^2 and the fit those of the whole data."""
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 64, generator=g, dtype=torch.float64)
         ).view(200, 8, 8) + torch.arange(200).remainder(3).view(-1, 1, 1)
    labels = torch.arange(200) % 3
    streamed = GaussianGenerator(seq_len=8, dim=8, rank=4, num_classes=3, conditioning="label")
    stage = GeneratorStatisticsStage()
    means = stage.means([stage.means_local(streamed, x, labels)])
    acc = None
    for s in range(0, 200, 20):
        acc = stage.accumulate(streamed, acc, stage.local(streamed, x[s:s + 20], labels[s:s + 20], None, means=means))
        assert "probe_sums" not in acc and acc["factors"].dtype == torch.float64
    release = stage.compact(streamed, acc)
    d = x.reshape(200, -1) - means[labels]
    assert float(release["scatter_norm2"]) == pytest.approx(float((d.T @ d).square().sum()), rel=1e-9)
    assert float(release["factors"].square().sum()) == pytest.approx(float(release["square"].sum()), rel=1e-9)
    whole = GaussianGenerator(seq_len=8, dim=8, rank=4, num_classes=3, conditioning="label")
    assert streamed.fit_from_statistics(release) == pytest.approx(whole.fit(x, labels=labels), rel=1e-9)


def test_a_float32_streaming_cut_fits_what_a_float64_one_fits(monkeypatch):
    """Full-rank data cut many times while streaming: the float32 products (STREAM_DTYPE) keep the same
    directions and variances as float64 ones, to float32's rounding."""
    import feda2v_toolkit.generators.gaussian as gaussian

    g = torch.Generator().manual_seed(12)
    x = (torch.randn(300, 64, generator=g, dtype=torch.float64) * torch.linspace(3, 0.3, 64, dtype=torch.float64)
         ).view(300, 8, 8).float() + torch.arange(300).remainder(3).view(-1, 1, 1)
    labels = torch.arange(300) % 3
    fits = {}
    for dtype in (torch.float32, torch.float64):
        monkeypatch.setattr(gaussian, "STREAM_DTYPE", dtype)
        gen = GaussianGenerator(seq_len=8, dim=8, rank=6, num_classes=3, conditioning="label")
        release, _ = _stream_about_means(gen, x, labels, 25)
        fits[dtype] = (gen.fit_from_statistics(release), gen.components.double())
    (a, ca), (b, cb) = fits[torch.float32], fits[torch.float64]
    assert a == pytest.approx(b, rel=1e-5)
    qa, qb = torch.linalg.qr(ca.T).Q, torch.linalg.qr(cb.T).Q
    assert float(torch.linalg.svdvals(qa.T @ qb).square().mean()) > 1 - 1e-6
    torch.testing.assert_close(ca.square().sum(1), cb.square().sum(1), rtol=1e-5, atol=0.0)


def test_statistics_about_different_means_or_of_both_forms_are_not_merged():
    x, labels = torch.randn(20, L, D), torch.arange(20) % 2
    g = gen()
    means = g.mean_statistics(x, labels=labels)["sums"] / 10
    a = g.fit_statistics(x[:10], labels=labels[:10], means=means)
    b = g.fit_statistics(x[10:], labels=labels[10:], means=means + 1)
    with pytest.raises(ValueError, match="about different means"):
        GaussianGenerator.merge_statistics([a, b])
    with pytest.raises(ValueError, match="cannot be merged with per-class ones"):
        GaussianGenerator.merge_statistics([a, g.fit_statistics(x[10:], labels=labels[10:])])
    with pytest.raises(ValueError, match="means of shape"):
        g.fit_statistics(x, labels=labels, means=means[:1])


def test_a_factor_of_stacked_pieces_is_the_factor_of_their_rows_and_trusts_only_true_row_norms():
    from feda2v_toolkit.generators.gaussian import low_rank_factor, stacked_factor

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 50, generator=g, dtype=torch.float64), torch.randn(12, 50, generator=g, dtype=torch.float64)
    orth, norms, norm2 = stacked_factor([a])  # orthogonal rows, and their squared norms
    assert norm2 == pytest.approx(float((a.T @ a).square().sum()), rel=1e-12)
    torch.testing.assert_close(orth @ orth.T, torch.diag(norms), rtol=0, atol=1e-9 * float(norms.max()))
    whole = low_rank_factor(torch.cat([a, b]))
    for given in (norms, norms * 1.5):  # true norms skip the block; wrong ones are noticed and recomputed
        f, kept, _ = stacked_factor([orth, b], None, [given, None])
        torch.testing.assert_close(f.T @ f, whole.T @ whole, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kept, f.square().sum(1), rtol=1e-9, atol=1e-9)
    top, _, _ = stacked_factor([orth, b], 5, [norms, None])
    torch.testing.assert_close(top.T @ top, low_rank_factor(torch.cat([a, b]), 5).T @ low_rank_factor(torch.cat([a, b]), 5),
                               rtol=1e-9, atol=1e-9)


def test_the_shrinkage_of_a_factor_cut_while_streaming_is_that_of_the_whole_data():
    """Ledoit-Wolf needs ||S||_F^2, which a factor cut to the top directions understates (here by a third; on 77
    classes of 36 clips the shrinkage went from 0.68 to 1.0): while streaming, the probes' sums S G (exact) carry
    what the cuts leave out, and the release keeps ||S||_F^2 as one number."""
    from feda2v_toolkit.generators.gaussian import scatter_norm2_from_probes, scatter_probes

    g = torch.Generator().manual_seed(6)
    spectrum = torch.linspace(3, 0.5, 24, dtype=torch.float64).unsqueeze(1)  # a decaying one, then noise
    signal = torch.randn(600, 24, generator=g, dtype=torch.float64) @ (spectrum * torch.randn(24, 64, generator=g,
                                                                                               dtype=torch.float64))
    x = (signal + 0.3 * torch.randn(600, 64, generator=g, dtype=torch.float64)).view(600, 8, 8) \
        + torch.arange(600).remainder(40).view(-1, 1, 1)
    labels = torch.arange(600) % 40
    streamed = GaussianGenerator(seq_len=8, dim=8, rank=3, num_classes=40, conditioning="label")
    whole = GaussianGenerator(seq_len=8, dim=8, rank=3, num_classes=40, conditioning="label")
    release, _ = _stream_about_means(streamed, x, labels, 50)
    assert set(release) == {"means", "counts", "square", "quartic", "factors", "scatter_norm2"}  # no probes
    streamed.fit_from_statistics(release)
    whole.fit(x, labels=labels)
    assert float(streamed.shrinkage) == pytest.approx(float(whole.shrinkage), rel=0.02)
    d = x.reshape(600, -1) - release["means"][labels]
    exact = float((d.T @ d).square().sum())
    low = release["factors"]
    assert float((low @ low.T).square().sum()) < 0.7 * exact
    assert float(release["scatter_norm2"]) == pytest.approx(exact, rel=0.02)
    # the estimator itself, on the whole data's probes and the cut factor
    assert scatter_norm2_from_probes(low, d.T @ (d @ scatter_probes(64)), float((low @ low.T).square().sum())) == \
        pytest.approx(exact, rel=0.02)


def test_statistics_carry_the_probes_only_once_a_factor_was_cut_and_never_release_them():
    from feda2v_toolkit.generators.gaussian import scatter_probes
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(120) % 4
    stage = GeneratorStatisticsStage()
    for rank, cut in ((64, False), (4, True)):  # at most F = 64 directions: never cut at rank 64
        gen = GaussianGenerator(seq_len=8, dim=8, rank=rank, num_classes=4, conditioning="label")
        means = stage.means([stage.means_local(gen, x, labels)])
        acc = None
        for s in range(0, 120, 30):
            part = stage.local(gen, x[s:s + 30], labels[s:s + 30], None, means=means)
            acc = part if acc is None else GaussianGenerator.merge_statistics([acc, part], max_rank=2 * rank)
        assert ("probe_sums" in acc) is cut
        if cut:
            d = x.reshape(120, -1) - means[labels]
            torch.testing.assert_close(acc["probe_sums"], d.T @ (d @ scatter_probes(64)), rtol=1e-9, atol=1e-9)
        release = GaussianGenerator.merge_statistics([acc], max_rank=rank, compact=True)
        assert "probe_sums" not in release and "factor_norms" not in release and release["scatter_norm2"].numel() == 1
        if not cut:  # nothing cut while streaming: the number is exact
            d = x.reshape(120, -1) - means[labels]
            assert float(release["scatter_norm2"]) == pytest.approx(float((d.T @ d).square().sum()), rel=1e-9)


@pytest.mark.parametrize("split", ["alternate rows", "by class"])
def test_releases_that_cut_their_factors_estimate_what_they_left_out(split):
    """Two sites that each keep 4 of 64 directions: the factors' cross terms alone understate the merged
    ||S||_F^2 by more than a third (and the shrinkage would be overstated); the left-out variance, spread over the
    directions a release does not hold, brings it within 2% of the whole data's on an isotropic spectrum."""
    from feda2v_toolkit.generators.gaussian import _left_out_cross_terms
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, 8, generator=g, dtype=torch.float64) + torch.arange(240).remainder(3).view(-1, 1, 1)
    labels = torch.arange(240) % 3
    gen = GaussianGenerator(seq_len=8, dim=8, rank=4, num_classes=3, conditioning="label")
    stage = GeneratorStatisticsStage()
    rows = [torch.arange(i, 240, 2) for i in range(2)] if split == "alternate rows" else \
        [torch.nonzero(labels != 0).flatten(), torch.nonzero(labels == 0).flatten()]
    means = stage.means([stage.means_local(gen, x[r], labels[r]) for r in rows])
    releases = [stage.compact(gen, stage.local(gen, x[r], labels[r], None, means=means)) for r in rows]
    assert all(r["factors"].shape == (4, 64) for r in releases)
    merged = GaussianGenerator.merge_statistics(releases)
    d = x.reshape(240, -1) - means[labels]
    exact = float((d.T @ d).square().sum())
    estimated = float(merged["scatter_norm2"])
    factors_only = estimated - _left_out_cross_terms(releases, [r["factors"] for r in releases])
    assert factors_only < 0.7 * exact
    assert estimated == pytest.approx(exact, rel=0.02)


def test_releases_merge_their_numbers_with_the_cross_terms_of_their_factors():
    """Two sites' releases that keep every direction give the whole data's ||S||_F^2 exactly (nothing left out
    to estimate)."""
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    g = torch.Generator().manual_seed(8)
    x = torch.randn(80, 8, 8, generator=g, dtype=torch.float64) + torch.arange(80).remainder(3).view(-1, 1, 1)
    labels = torch.arange(80) % 3
    gen = GaussianGenerator(seq_len=8, dim=8, rank=64, num_classes=3, conditioning="label")
    stage = GeneratorStatisticsStage()
    sites = [(x[:50], labels[:50]), (x[50:], labels[50:])]
    means = stage.means([stage.means_local(gen, xs, ls) for xs, ls in sites])
    releases = [stage.compact(gen, stage.local(gen, xs, ls, None, means=means)) for xs, ls in sites]
    merged = GaussianGenerator.merge_statistics(releases)
    d = x.reshape(80, -1) - means[labels]
    assert float(merged["scatter_norm2"]) == pytest.approx(float((d.T @ d).square().sum()), rel=1e-9)
    with pytest.raises(ValueError, match="release cannot be merged with a site's blocks"):
        GaussianGenerator.merge_statistics([releases[0], stage.local(gen, *sites[1], None, means=means)])


def test_sequences_that_do_not_vary_about_their_class_means_are_refused():
    """One sequence per class, or identical ones: the model would draw copies of them."""
    gen = GaussianGenerator(seq_len=4, dim=3, rank=2, num_classes=2, conditioning="label")
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    for data, labels in ((x, torch.tensor([0, 1])), (x[:1].repeat(6, 1, 1), torch.tensor([0, 0, 0, 1, 1, 1]))):
        with pytest.raises(ValueError, match="do not vary about their class means"):
            gen.fit(data, labels=labels)
