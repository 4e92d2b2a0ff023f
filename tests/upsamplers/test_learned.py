"""The built-in ``learned`` upsampler: linear interpolation plus a trained, zero-initialised correction."""

from __future__ import annotations

import json

import pytest
import torch

from feda2v_toolkit.components import Upsampler
from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.plugins import get_registry
from feda2v_toolkit.upsamplers.interpolate import LinearUpsampler
from feda2v_toolkit.upsamplers.learned import LearnedUpsampler, heldout_rows

FULL, RED, DIM = 60, 4, 8


def config(**overrides):
    return schema_defaults() | {"generator_upsampler_epochs": 5, "generator_upsampler_learning_rate": 1e-2,
                                "generator_validation_split": 0.25} | overrides


def make(full=FULL, red=RED, dim=DIM) -> LearnedUpsampler:
    return LearnedUpsampler.from_config(config(), reduced_length=red, full_length=full, dim=dim)


def positional_data(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Full sequences with AST-like per-position structure that pooling loses: a strong per-position
    pattern, content whose gain varies along the sequence, and a little noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = 2.0 * torch.randn(FULL, DIM, generator=g)
    gain = 1.0 + torch.sin(torch.linspace(0, 6.0, FULL)).unsqueeze(1)
    content = torch.randn(n, 1, DIM, generator=g)
    return pattern + gain * content + 0.1 * torch.randn(n, FULL, DIM, generator=g)


def reduce(full: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool1d(full.transpose(1, 2), RED).transpose(1, 2)


def pairs_of(full: torch.Tensor, batch: int = 8):
    calls = []

    def pairs():
        calls.append(1)
        for i in range(0, len(full), batch):
            yield reduce(full[i:i + batch]), full[i:i + batch]

    pairs.calls = calls
    return pairs


def mse_on(up, full, rows):
    return torch.nn.functional.mse_loss(up(reduce(full[rows]), FULL), full[rows]).item()


def test_registered_as_learned_next_to_the_interpolating_upsamplers():
    registry = get_registry()
    spec = registry.get("upsampler", "learned")
    assert spec.factory == "feda2v_toolkit.upsamplers.learned:LearnedUpsampler" and spec.plugin == "builtin"
    assert registry.load("upsampler", "learned") is LearnedUpsampler
    assert issubclass(LearnedUpsampler, Upsampler) and LearnedUpsampler.trainable
    assert {"linear", "nearest", "cubic", "learned"} <= set(registry.names("upsampler"))
    defaults = schema_defaults()
    assert all(key in defaults for key in spec.settings)


def test_untrained_it_is_exactly_linear_interpolation():
    x = torch.randn(3, RED, DIM)
    assert torch.equal(make()(x, FULL), LinearUpsampler()(x, FULL))
    real = LearnedUpsampler(reduced_length=4, full_length=1214, dim=768)
    xr = torch.randn(2, 4, 768)
    assert torch.equal(real(xr, 1214), LinearUpsampler()(xr, 1214))


def test_parameters_are_a_position_mixing_matrix_and_a_per_position_bias():
    with torch.device("meta"):
        up = LearnedUpsampler(reduced_length=32, full_length=1214, dim=768)
    assert {k: tuple(v.shape) for k, v in up.state_dict().items()} == {"mix": (1214, 32), "bias": (1214, 768)}


def test_other_lengths_resample_the_corrected_full_sequence():
    up = make()
    with torch.no_grad():
        up.bias.normal_()
    x = torch.randn(2, RED, DIM)
    assert up(x, RED) is x  # no upsampling at the reduced length
    out = up(x, 30)
    assert out.shape == (2, 30, DIM)
    assert torch.allclose(out, LinearUpsampler()(up(x, FULL), 30))
    with pytest.raises(ValueError, match=r"\[B, 4, 8\]"):
        up(torch.randn(2, 5, DIM), FULL)


def test_heldout_samples_are_chosen_by_content_not_by_order_or_batching():
    x = torch.randn(4000, RED, DIM)
    held = heldout_rows(x, 0.25)
    assert 0.22 < held.float().mean() < 0.28
    assert torch.equal(heldout_rows(x[1000:1100], 0.25), held[1000:1100])
    assert torch.equal(heldout_rows(x.flip(0), 0.25), held.flip(0))
    assert not heldout_rows(x, 0.0).any()
    full = positional_data(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    m3 = make().fit(pairs_of(full, 3), config=config())
    m7 = make().fit(pairs_of(full[order], 7), config=config())  # reshuffled, other batches
    assert m3["heldout_samples"] == m7["heldout_samples"] == int(heldout_rows(reduce(full), 0.25).sum()) > 0
    assert m3["heldout_mse_linear"] == pytest.approx(m7["heldout_mse_linear"], rel=1e-5)


def test_reshuffled_passes_keep_the_same_heldout_samples():
    full = positional_data(40)
    calls = []

    def pairs():  # a new order on every call, as the trainer does
        calls.append(1)
        order = torch.randperm(40, generator=torch.Generator().manual_seed(len(calls)))
        for i in range(0, 40, 8):
            rows = order[i:i + 8]
            yield reduce(full[rows]), full[rows]

    up = make()
    metrics = up.fit(pairs, config=config())
    held = heldout_rows(reduce(full), 0.25)
    assert mse_on(up, full, held) == pytest.approx(metrics["heldout_mse_learned"], rel=1e-4)


def test_fit_improves_heldout_mse_over_linear_on_data_with_per_position_structure():
    full = positional_data()
    up = make()
    pairs = pairs_of(full)
    metrics = up.fit(pairs, config=config())
    json.dumps(metrics)
    assert metrics["heldout_mse_learned"] < 0.1 * metrics["heldout_mse_linear"]
    assert metrics["heldout_r2_learned"] > 0.9 > metrics["heldout_r2_linear"]
    assert metrics["train_samples"] + metrics["heldout_samples"] == len(full)
    held = heldout_rows(reduce(full), 0.25)
    assert mse_on(up, full, held) == pytest.approx(metrics["heldout_mse_learned"], rel=1e-4)
    assert len(pairs.calls) == config()["generator_upsampler_epochs"] + 2  # stats pass, epochs, final score


def test_fit_never_ends_worse_than_linear_on_heldout_data():
    # training samples are shifted by +1, held-out ones by -1: anything learned hurts on held-out data
    red = reduce(positional_data(32))
    held = heldout_rows(red, 0.5)
    assert 0 < held.sum() < 32
    adversarial = LinearUpsampler()(red, FULL) + torch.where(held, -1.0, 1.0).view(-1, 1, 1)
    up = make()
    metrics = up.fit(lambda: [(red, adversarial)], config=config(generator_validation_split=0.5))
    assert metrics["best_epoch"] == -1
    assert metrics["heldout_mse_learned"] == metrics["heldout_mse_linear"]
    x = torch.randn(2, RED, DIM)
    assert torch.equal(up(x, FULL), LinearUpsampler()(x, FULL))


def test_without_a_heldout_split_it_selects_on_training_data():
    full = positional_data(16)
    metrics = make().fit(pairs_of(full), config=config(generator_validation_split=0.0))
    assert metrics["heldout_samples"] == 0 and metrics["train_samples"] == 16
    assert metrics["train_mse_learned"] < metrics["train_mse_linear"]


def test_a_set_too_small_to_hold_out_from_trains_on_everything():
    full = positional_data(1)
    assert heldout_rows(reduce(full), 0.9999).all()
    metrics = make().fit(pairs_of(full), config=config(generator_validation_split=0.9999))
    assert metrics["heldout_samples"] == 0 and metrics["train_samples"] == 1


def test_init_args_and_state_dict_rebuild_it_exactly():
    full = positional_data(16)
    up = make()
    up.fit(pairs_of(full), config=config(generator_upsampler_epochs=2))
    clone = LearnedUpsampler(**json.loads(json.dumps(up.init_args())))
    clone.load_state_dict(up.state_dict())
    x = reduce(full[:3])
    assert torch.equal(up(x, FULL), clone(x, FULL))


def test_mismatched_pairs_are_rejected():
    with pytest.raises(ValueError, match="pairs must be"):
        make().fit(lambda: [(torch.randn(2, RED, DIM), torch.randn(2, FULL + 1, DIM))], config=config())


def test_moves_between_dtypes_like_any_module():
    up = make()
    with torch.no_grad():
        up.bias.normal_()
    x = torch.randn(2, RED, DIM)
    expected = up(x, FULL)
    up.to(torch.float64)
    assert up.bias.dtype == up.mix.dtype == torch.float64
    assert torch.allclose(up(x.double(), FULL).float(), expected, atol=1e-5)
