"""The built-in ``lstsq`` upsampler: the closed-form least-squares affine decoder ``U r + b``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from analysis.helpers import D, L, structured

from feda2v_toolkit.analysis.metrics import r2_score
from feda2v_toolkit.plugins import get_registry
from feda2v_toolkit.reducers.pca import PCAReducer
from feda2v_toolkit.testing import check_upsampler
from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler


def pool(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2)


def fit(reduced: torch.Tensor, full: torch.Tensor, ridge: float = 0.0) -> LeastSquaresUpsampler:
    up = LeastSquaresUpsampler(reduced_length=reduced.shape[1], full_length=full.shape[1], dim=full.shape[2],
                               ridge=ridge)
    up.fit(lambda: zip(reduced.split(6), full.split(6), strict=True), config={})
    return up.eval()


def test_registered_trainable_and_passes_the_conformance_kit():
    assert get_registry().load("upsampler", "lstsq") is LeastSquaresUpsampler
    assert LeastSquaresUpsampler.trainable
    check_upsampler("lstsq")


def test_fit_equals_an_explicit_least_squares_solve():
    full = structured(24, noise=0.3)
    reduced = pool(full, 5)
    up = fit(reduced, full)
    # per feature d: x[:, :, d] ~ b[:, d] + U r[:, :, d]; solve jointly with one-hot intercepts per (d)
    n = full.shape[0]
    rows, targets = [], []
    for d in range(D):
        design = torch.zeros(n, L, 5 + D, dtype=torch.float64)
        design[..., :5] = reduced[:, :, d].double().unsqueeze(1).expand(n, L, 5)
        design[..., 5 + d] = 1.0
        rows.append(design)
        targets.append(full[:, :, d].double())
    # solve for each full position p separately: [U_p, b_p] minimises over (n, d)
    for p in (0, 17, L - 1):
        a = torch.cat([r[:, p] for r in rows])
        t = torch.cat([tt[:, p] for tt in targets])
        sol = torch.linalg.lstsq(a, t.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(up.weight[p].double(), sol[:5], atol=1e-4)
        assert torch.allclose(up.bias[p].double(), sol[5:], atol=1e-4)


def test_after_adaptive_avg_it_beats_linear_interpolation_on_held_out_data():
    train, test = structured(40, seed=0, noise=0.2), structured(20, seed=1, noise=0.2)
    up = fit(pool(train, 4), train)
    lin = F.interpolate(pool(test, 4).transpose(1, 2), size=L, mode="linear").transpose(1, 2)
    assert r2_score(test, up(pool(test, 4), L)) > r2_score(test, lin) + 0.2


def test_with_pca_it_reaches_the_linear_optimum_on_held_out_data():
    train, test = structured(40, seed=0, rank=4, noise=0.3), structured(30, seed=1, rank=4, noise=0.3)
    for length in (2, 4, 8):
        red = PCAReducer(length=length, full_length=L, dim=D)
        red.fit(lambda: iter([train]))
        up = fit(red(train), train, ridge=1e-6)
        optimum = r2_score(test, red.inverse(red(test)))
        assert r2_score(test, up(red(test), L)) >= 0.98 * optimum
        assert torch.allclose(up.weight, red.basis, atol=1e-3)  # U = V


def test_other_output_lengths_interpolate_the_full_reconstruction():
    full = structured(12)
    up = fit(pool(full, 4), full)
    r = pool(full[:2], 4)
    expected = F.interpolate(up(r, L).transpose(1, 2), size=20, mode="linear").transpose(1, 2)
    assert torch.allclose(up(r, 20), expected)


def test_state_round_trips_and_fit_reports_training_r2():
    full = structured(12, noise=0.2)
    up = LeastSquaresUpsampler(reduced_length=4, full_length=L, dim=D)
    metrics = up.fit(lambda: iter([(pool(full, 4), full)]), config={})
    assert abs(metrics["train_r2"] - r2_score(full, up(pool(full, 4), L))) < 1e-4
    twin = LeastSquaresUpsampler(**up.init_args())
    twin.load_state_dict(up.state_dict(), strict=True)
    assert torch.equal(twin(pool(full, 4), L), up(pool(full, 4), L))


def test_the_training_r2_is_right_when_a_shared_pattern_dwarfs_the_clips(tmp_path):
    """AST tokens carry a large pattern every clip shares: the reported R^2 must come from centred sums (it once
    read 6.59 on the realistic corpus)."""
    g = torch.Generator().manual_seed(0)
    pattern = 1000.0 * torch.randn(1, 40, 8, generator=g)
    full = pattern + torch.randn(64, 40, 8, generator=g)
    reduced = torch.nn.functional.adaptive_avg_pool1d(full.transpose(1, 2), 4).transpose(1, 2)
    up = LeastSquaresUpsampler(reduced_length=4, full_length=40, dim=8)
    metrics = up.fit(lambda: iter([(reduced[:32], full[:32]), (reduced[32:], full[32:])]))
    with torch.no_grad():
        pred = up(reduced, 40)
    direct = 1 - float((full - pred).double().square().sum()) / float((full - full.mean(0)).double().square().sum())
    assert 0 <= metrics["train_r2"] <= 1 and abs(metrics["train_r2"] - direct) < 1e-3


def test_held_out_errors_from_sums_match_the_decoders_reconstructions_in_float64():
    """``heldout_errors`` turns held-out sums taken before the fit into the decoder's held-out squared error
    (and linear interpolation's): against all-float64 reconstructions, with a positional pattern 300x the noise
    and the held-out rows summed in chunks of any size, the errors agree to 1e-9 (relative) or to 1e-9 of the total
    sum of squares about the held-out mean (R^2 to 1e-9: every sum is taken in float64)."""
    from feda2v_toolkit.training.streams import reconstruction_metrics
    from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

    g = torch.Generator().manual_seed(3)
    pattern = 300 * torch.randn(1, 40, 16, generator=g)
    emb = pattern + torch.randn(60, 40, 16, generator=g).cumsum(1) / 4  # smooth along the sequence
    red = pool(emb, 8)
    up = fit(red[:40], emb[:40], ridge=1e-6)
    x, r = emb[40:].double(), red[40:].double()
    pred = up.weight.double() @ r + up.bias.double()
    lin = interpolate_sequence(r, 40, "linear")
    sse, sse_lin = float((x - pred).square().sum()), float((x - lin).square().sum())
    sst = float((x - x.mean(0)).square().sum())
    assert sse < 0.5 * sse_lin  # the two errors differ: one cannot pass for the other
    assert sst < 1e-4 * float(x.square().sum())  # the pattern dominates the squared norms
    for chunk in (1, 3, 20):
        held = up.heldout_sums()
        for a in range(40, 60, chunk):
            held.add(red[a:a + chunk], emb[a:a + chunk])
        sums = up.heldout_errors(held.state())
        assert float(sums["count"]) == 20
        assert float(sums["sse"]) == pytest.approx(sse, rel=1e-9, abs=1e-9 * sst)
        assert float(sums["sse_linear"]) == pytest.approx(sse_lin, rel=1e-9, abs=1e-9 * sst)
        metrics = reconstruction_metrics(sums, 40, 16)
        assert metrics["heldout_r2"] == pytest.approx(1 - sse / sst, rel=1e-9, abs=1e-9)
        assert metrics["heldout_r2_linear"] == pytest.approx(1 - sse_lin / sst, rel=1e-9, abs=1e-9)
    held, strided = up.heldout_sums(), up.heldout_sums()  # any memory layout: the same sums (to round-off)
    held.add(red[40:60], emb[40:60])
    strided.add(red[40:60].transpose(1, 2).contiguous().transpose(1, 2),
                emb[40:60].transpose(1, 2).contiguous().transpose(1, 2))
    for a, b in zip(held.state().values(), strided.state().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
    empty = up.heldout_errors(up.heldout_sums().state())
    assert float(empty["count"]) == 0 and reconstruction_metrics(empty, 40, 16) == {}
    with pytest.raises(ValueError, match="expected pairs"):
        up.heldout_sums().add(red[:2], emb[:3])


def test_reduced_sequences_that_do_not_vary_give_the_mean_sequence_not_a_singular_solve():
    full = torch.full((12, 40, 16), 2.0)
    full[:, 3] = 5.0  # a positional pattern, the same in every sequence
    up = fit(pool(full, 8), full, ridge=1e-6)  # tr C_rr = 0: the ridge is 0 too
    assert torch.equal(up.weight, torch.zeros(40, 8))
    torch.testing.assert_close(up(pool(full, 8)[:2], 40), full[:2])
