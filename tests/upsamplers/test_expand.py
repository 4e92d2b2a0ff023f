"""``expand``: the data-independent pseudo-inverse of ``adaptive_avg`` (free under differential privacy)."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer
from feda2v_toolkit.upsamplers.expand import ExpandUpsampler


@pytest.mark.parametrize("full, short, keep", [(1214, 16, 2), (1214, 16, 0), (50, 4, 1), (7, 7, 0)])
def test_pooling_the_expansion_gives_the_reduced_sequence_back(full, short, keep):
    x = torch.randn(3, full, 5, dtype=torch.float64)
    reduce = AdaptiveAvgReducer(length=short, keep=keep)
    r = reduce(x)
    y = ExpandUpsampler(keep=keep)(r, full)
    assert y.shape == x.shape
    assert torch.equal(y[:, :keep], x[:, :keep])  # kept tokens go back where they came from
    # bins that share a boundary token differ by at most that token's share
    assert (reduce(y) - r).abs().max() <= 2 * x.abs().max() * short / full + 1e-12


def test_it_fits_nothing_and_follows_the_reducer_setting():
    up = ExpandUpsampler.from_config({"generator_reducer_keep_tokens": 2}, reduced_length=16, full_length=1214, dim=8)
    assert up.keep == 2 and not type(up).trainable and list(up.state_dict()) == []
    assert up.init_args() == {"keep": 2}
