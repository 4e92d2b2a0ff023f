"""The downstream classifier: ridge on pooled features, penalty chosen by exact leave-one-out."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.analysis.classifier import RidgeClassifier, pooled_features


def blobs(n_per_class: int, classes: int, dim: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * sep
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(labels.numel(), dim, generator=g), labels


def test_pooled_features_average_contiguous_stretches():
    x = torch.arange(8.0).reshape(1, 8, 1).repeat(1, 1, 2)  # positions 0..7, two identical features
    f = pooled_features(x, 4)
    assert f.shape == (1, 8)
    assert f.reshape(4, 2)[:, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert pooled_features(x, 100).shape == (1, 16)  # never more positions than the sequence has


def test_separable_classes_are_learned_and_noise_is_not():
    x, y = blobs(20, 3, 50, sep=3.0, seed=0)
    xt, yt = blobs(10, 3, 50, sep=3.0, seed=1)
    assert RidgeClassifier(3).fit(x, y).accuracy(xt, yt) == 1.0
    noise = RidgeClassifier(3).fit(torch.randn(60, 50), y).accuracy(xt, yt)
    assert noise < 0.7


def test_leave_one_out_matches_refitting_without_each_sample():
    x, y = blobs(6, 2, 30, sep=1.0, seed=2)
    clf = RidgeClassifier(2, alphas=(0.3,)).fit(x, y)
    correct = 0
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        sub = RidgeClassifier(2, alphas=(clf.alpha / _scale(x[keep]),)).fit(x[keep], y[keep])
        correct += int(sub.predict(x[i:i + 1])[0] == y[i])
    assert clf.loo_accuracy == pytest.approx(correct / len(y))


def _scale(x: torch.Tensor) -> float:
    xc = x.double() - x.double().mean(0)
    return float(torch.linalg.eigvalsh(xc @ xc.T).clamp(min=0).mean())


def test_deterministic_and_independent_of_feature_scale_choice():
    x, y = blobs(15, 4, 200, sep=0.7, seed=3)
    a = RidgeClassifier(4).fit(x, y)
    b = RidgeClassifier(4).fit(x.clone(), y.clone())
    assert a.alpha == b.alpha and torch.equal(a.predict(x), b.predict(x))
    scaled = RidgeClassifier(4).fit(10 * x, y)  # the penalty grid is relative to the kernel's scale
    assert torch.equal(scaled.predict(10 * x), a.predict(x))


def test_features_handed_over_are_centred_in_place_with_the_same_fit():
    x, y = blobs(15, 4, 200, sep=0.7, seed=4)
    kept = RidgeClassifier(4).fit(x, y)
    handed = x.clone()
    given = RidgeClassifier(4).fit(handed, y, copy=False)
    assert torch.equal(handed, x - kept._mean)  # the classifier keeps it as its (centred) training set
    assert given.alpha == kept.alpha and torch.equal(given.decision_function(x), kept.decision_function(x))


def test_rows_read_a_block_at_a_time_give_the_fit_of_all_rows_at_once():
    """fit_rows never holds the training rows (analyze reads them from a file past the memory budget): the same
    penalty, leave-one-out accuracy and predictions as fit, from primal weights."""
    x, y = blobs(30, 4, 300, sep=0.5, seed=5)
    xt, yt = blobs(20, 4, 300, sep=0.5, seed=6)
    whole = RidgeClassifier(4).fit(x, y)
    reads = []

    def read(lo, hi):
        reads.append(hi - lo)
        return x[lo:hi].clone()

    rows = RidgeClassifier(4).fit_rows(read, x.shape[0], y, block=17)
    assert max(reads) == 17 and rows._train is None
    assert rows.alpha == pytest.approx(whole.alpha, rel=1e-6) and rows.loo_accuracy == whole.loo_accuracy
    assert torch.allclose(rows.decision_function(xt), whole.decision_function(xt), rtol=1e-5, atol=1e-6)
    assert torch.equal(rows.predict(xt), whole.predict(xt))
    with pytest.raises(ValueError, match="not finite"):
        RidgeClassifier(4).fit_rows(lambda lo, hi: torch.full((hi - lo, 3), float("nan")), 4, y[:4], block=2)
