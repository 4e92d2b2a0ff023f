"""The built-in ``pca`` reducer: position PCA fitted on training sequences, the optimal linear reduction."""

from __future__ import annotations

import pytest
import torch
from analysis.helpers import D, L, structured

from feda2v_toolkit.components import Reducer
from feda2v_toolkit.plugins import get_registry
from feda2v_toolkit.reducers.pca import PCAReducer
from feda2v_toolkit.reducers.position_moments import PositionMoments, PositionPCA
from feda2v_toolkit.testing import check_reducer


def fitted(length: int, x: torch.Tensor) -> PCAReducer:
    red = PCAReducer(length=length, full_length=x.shape[1], dim=x.shape[2])
    red.fit(lambda: iter(x.split(7)))
    return red.eval()


def test_registered_as_a_fitted_non_positional_reducer_and_passes_the_conformance_kit():
    cls = get_registry().load("reducer", "pca")
    assert cls is PCAReducer and issubclass(cls, Reducer) and cls.fitted and not cls.positional
    check_reducer("pca")


def test_keeps_structured_sequences_almost_exactly():
    x = structured(40, rank=3, noise=0.01)
    red = fitted(3, x)
    recon = red.inverse(red(x))
    err = (recon - x).square().sum() / (x - x.mean(0)).square().sum()
    assert err < 1e-3


def test_is_the_best_rank_l_linear_reduction_on_its_training_data():
    x = structured(30, rank=6, noise=0.5)
    red = fitted(3, x)
    best = float((red.inverse(red(x)) - x).square().sum())
    g = torch.Generator().manual_seed(0)
    mean = x.mean(0)
    for _ in range(5):  # any other orthonormal basis with the same optimal decoder does worse
        basis = torch.linalg.qr(torch.randn(L, 3, generator=g))[0]
        recon = mean + basis @ (basis.T @ (x - mean))
        assert float((recon - x).square().sum()) > best


def test_bases_of_different_lengths_are_nested_and_explained_variance_sorted():
    x = structured(30, rank=5, noise=0.2)
    r2, r4 = fitted(2, x), fitted(4, x)
    assert torch.allclose(r4.basis[:, :2], r2.basis, atol=1e-5)
    assert torch.all(r4.explained[:-1] >= r4.explained[1:])
    assert torch.allclose(r4.basis.T @ r4.basis, torch.eye(4), atol=1e-5)


def test_streaming_moments_do_not_depend_on_batching():
    x = structured(20, noise=0.3)
    a = PositionMoments(L, D).update(x.split(3))
    b = PositionMoments(L, D).update([x])
    assert torch.allclose(a.covariance(), b.covariance(), rtol=1e-5, atol=1e-3)
    assert torch.allclose(PositionPCA(a).basis(4).abs(), PositionPCA(b).basis(4).abs(), atol=1e-4)


def test_state_round_trips_through_init_args_and_state_dict():
    x = structured(20)
    red = fitted(4, x)
    twin = PCAReducer(**red.init_args())
    twin.load_state_dict(red.state_dict(), strict=True)
    assert torch.equal(twin.eval()(x), red(x))
    assert set(red.state_dict()) == {"basis", "mean", "explained", "fitted_sequences"}


def test_refuses_to_reduce_before_fitting_or_the_wrong_shape():
    red = PCAReducer(length=4, full_length=L, dim=D)
    with pytest.raises(RuntimeError, match="not fitted"):
        red(torch.zeros(1, L, D))
    red = fitted(4, structured(10))
    with pytest.raises(ValueError, match=r"\[B, 50, 16\]"):
        red(torch.zeros(1, L + 1, D))
    with pytest.raises(ValueError, match="exceeds the full length"):
        PCAReducer(length=L + 1, full_length=L, dim=D)
