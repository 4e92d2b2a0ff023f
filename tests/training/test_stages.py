"""Training stages: for the exact stages, merging the parts of two sites equals one site holding all the data."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.reducers.pca import PCAReducer
from feda2v_toolkit.training.stages import (
    ClassesStage,
    DataSummary,
    FittedStatisticsStage,
    NormalizationStage,
    WeightsPart,
    WeightsStage,
    average_state,
)
from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler

L, D, SHORT = 12, 5, 3


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D, generator=g) + torch.linspace(0, 2, L)[:, None]


def _stream(x: torch.Tensor, rows: int = 4):
    return lambda: (x[i:i + rows] for i in range(0, x.shape[0], rows))


def test_pca_reducer_from_two_sites_equals_the_centralised_fit():
    a, b = _data(9, 0), _data(14, 1)
    stage = FittedStatisticsStage()
    central = PCAReducer(length=SHORT, full_length=L, dim=D)
    central.fit(_stream(torch.cat([a, b])))
    fed = PCAReducer(length=SHORT, full_length=L, dim=D)
    stage.finish(fed, stage.merge([stage.local(fed, _stream(a)), stage.local(fed, _stream(b))]))
    for k, v in central.state_dict().items():
        torch.testing.assert_close(fed.state_dict()[k], v, rtol=1e-5, atol=1e-5)


def test_lstsq_upsampler_from_two_sites_equals_the_centralised_fit():
    a, b = _data(9, 2), _data(11, 3)
    ra, rb = a[:, ::4], b[:, ::4]
    stage = FittedStatisticsStage()
    central = LeastSquaresUpsampler(reduced_length=SHORT, full_length=L, dim=D)
    m_central = central.fit(lambda: iter([(torch.cat([ra, rb]), torch.cat([a, b]))]))
    fed = LeastSquaresUpsampler(reduced_length=SHORT, full_length=L, dim=D)
    parts = [stage.local(fed, lambda: iter([(ra, a)])), stage.local(fed, lambda: iter([(rb, b)]))]
    m_fed = stage.finish(fed, stage.merge(parts))
    torch.testing.assert_close(fed.weight, central.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fed.bias, central.bias, rtol=1e-5, atol=1e-5)  # float32 partial products
    assert m_fed["train_r2"] == pytest.approx(m_central["train_r2"], rel=1e-5)


def test_normalisation_from_two_sites_equals_the_centralised_statistics():
    from feda2v_toolkit.training.stages import standardization

    x = _data(20, 4)
    idx_a, idx_b = torch.arange(0, 7), torch.arange(7, 20)
    stage = NormalizationStage()
    fed = stage.finish(stage.merge([stage.local(x, idx_a), stage.local(x, idx_b)]))
    central = standardization(x, torch.arange(20))
    torch.testing.assert_close(fed["mean"], central["mean"])
    torch.testing.assert_close(fed["std"], central["std"])


def test_classes_are_the_union_in_order_of_appearance_with_summed_counts():
    stage = ClassesStage()
    merged = stage.merge([DataSummary({"dog": 3, "cat": 0}, 10, 4), DataSummary({"cat": 2, "owl": 5}, 10, 4)])
    assert merged.class_counts == {"dog": 3, "cat": 2, "owl": 5}


def test_sites_with_different_sequence_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"node b has sequences \[10, 5\].*node a has \[10, 4\]"):
        ClassesStage().merge([DataSummary({"x": 1}, 10, 4), DataSummary({"x": 1}, 10, 5)], ["node a", "node b"])


def test_weights_are_averaged_per_key_only_among_the_sites_holding_it():
    w = lambda v: {"w": torch.tensor([float(v)]), "n": torch.tensor(7)}  # noqa: E731
    parts = [WeightsPart({"dog": w(1), "cat": w(10)}, {"dog": 1, "cat": 3}),
             WeightsPart({"cat": w(20)}, {"cat": 1}),
             WeightsPart({"owl": w(5)}, {"owl": 2})]
    merged = WeightsStage().merge(parts)
    assert float(merged.weights["dog"]["w"]) == 1.0  # one owner: its weights, untouched by other classes
    assert float(merged.weights["cat"]["w"]) == pytest.approx((3 * 10 + 20) / 4)
    assert float(merged.weights["owl"]["w"]) == 5.0
    assert merged.examples == {"dog": 1, "cat": 4, "owl": 2}
    assert int(merged.weights["cat"]["n"]) == 7  # integer buffers are not averaged


def test_average_state_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        average_state([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1])
