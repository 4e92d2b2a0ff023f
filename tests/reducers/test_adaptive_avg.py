"""adaptive_avg: the original pooling, and the leading (summary) tokens it can keep as they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer


def test_without_kept_tokens_it_is_the_original_pooling():
    x = torch.randn(3, 50, 4)
    out = AdaptiveAvgReducer(length=5)(x)
    torch.testing.assert_close(out, F.adaptive_avg_pool1d(x.transpose(1, 2), 5).transpose(1, 2))
    assert AdaptiveAvgReducer(length=5).init_args() == {"length": 5}  # older model files rebuild unchanged


def test_kept_tokens_pass_through_and_only_the_rest_is_pooled():
    x = torch.randn(3, 52, 4)
    out = AdaptiveAvgReducer(length=6, keep=2)(x)
    assert out.shape == (3, 6, 4)
    torch.testing.assert_close(out[:, :2], x[:, :2])
    torch.testing.assert_close(out[:, 2:], F.adaptive_avg_pool1d(x[:, 2:].transpose(1, 2), 4).transpose(1, 2))


def test_the_config_key_sets_it_and_it_survives_a_model_file(tiny_data, tmp_path):
    from feda2v_toolkit.model.file import load_model
    from feda2v_toolkit.training.pipeline import train

    train({"generator_reducer_keep_tokens": 2, "generator_training_sequence_length": 6}, tiny_data,
          out=tmp_path / "m.safetensors", seed=0)
    reducer = load_model(tmp_path / "m.safetensors").reducer
    assert reducer.keep == 2 and reducer.length == 6


def test_keeping_every_position_is_refused():
    with pytest.raises(ValueError, match="keep must be"):
        AdaptiveAvgReducer(length=2, keep=2)
