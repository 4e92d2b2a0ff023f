"""The built-in ``gan`` generator: it trains (both players update and samples approach the data),
has its own schema fragment, conditions on labels, and rebuilds exactly."""

from __future__ import annotations

import json

import pytest
import torch

from feda2v_toolkit.components import Generator
from feda2v_toolkit.generators.gan import GANGenerator, moment_gap
from feda2v_toolkit.plugins import get_registry

from .helpers import D, H, L, Z, ctx, tiny_config, two_class_data


def make(config=None, **kwargs) -> GANGenerator:
    return GANGenerator.from_config(config or tiny_config(), seq_len=L, dim=D, **kwargs)


def standardised_two_classes():
    """Two well-separated classes, standardised per element like the trainer does."""
    x, labels, means = two_class_data(64)
    mu, sd = x.mean(0), x.std(0)
    return (x - mu) / sd, labels, (means - mu) / sd


def train(gan, x, config, steps, labels=None, batch=32):
    opts = gan.configure_optimizers(config)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        gan.training_step(x[idx], labels=None if labels is None else labels[idx], conditions=None,
                          optimizers=opts, ctx=ctx(config, progress=step / steps, step=step))
    return opts


def test_registered_as_gan_with_its_own_schema_fragment():
    registry = get_registry()
    spec = registry.get("generator", "gan")
    assert spec.plugin == "builtin" and registry.load("generator", "gan") is GANGenerator
    assert issubclass(GANGenerator, Generator)
    (frag,) = [f for f in registry.schema_fragments if f.name == "gan"]
    assert frag.generator_type == "gan" and frag.provenance.plugin == "builtin"
    assert frag.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for key, prop in frag.properties.items():
        assert key.startswith("gan_") and prop["description"] and "default" in prop
    defaults = tiny_config()
    assert all(key in defaults for key in spec.settings)
    assert defaults["gan_loss"] == "non_saturating" and defaults["gan_r1_weight"] > 0


def test_architecture_and_shapes():
    gan = make()
    flat = L * D
    g_params = (Z * H + H) + (H * H + H) + (H * flat + flat)
    d_params = (flat * H + H) + (H * H + H) + (H + 1)
    assert sum(p.numel() for p in gan.generator_parameters()) == g_params
    assert sum(p.numel() for p in gan.discriminator_parameters()) == d_params
    assert gan.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, L, D)
    assert gan.score(torch.randn(5, L, D), None, tiny_config(), noisy=False).shape == (5,)


def test_two_named_optimisers_over_disjoint_parameters():
    config = tiny_config(generator_learning_rate=1e-3, gan_discriminator_learning_rate=4e-3,
                         gan_adam_betas=[0.0, 0.9])
    gan = make(config, num_classes=2)
    opts = gan.configure_optimizers(config)
    assert set(opts) == {"generator", "discriminator"}
    g_ids = {id(p) for group in opts["generator"].param_groups for p in group["params"]}
    d_ids = {id(p) for group in opts["discriminator"].param_groups for p in group["params"]}
    assert not g_ids & d_ids and g_ids | d_ids == {id(p) for p in gan.parameters()}
    assert opts["generator"].param_groups[0]["lr"] == 1e-3
    assert opts["discriminator"].param_groups[0]["lr"] == 4e-3
    assert opts["discriminator"].param_groups[0]["betas"] == (0.0, 0.9)
    fallback = tiny_config(generator_learning_rate=2e-3)  # gan_discriminator_learning_rate: null
    assert make(fallback).configure_optimizers(fallback)["discriminator"].param_groups[0]["lr"] == 2e-3


def test_one_step_updates_both_discriminator_and_generator():
    config = tiny_config()
    gan = make(config)
    g0 = [p.detach().clone() for p in gan.generator_parameters()]
    d0 = [p.detach().clone() for p in gan.discriminator_parameters()]
    train(gan, torch.randn(32, L, D), config, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(g0, gan.generator_parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(d0, gan.discriminator_parameters(), strict=True))


def test_training_and_validation_report_the_same_terms_loss_first():
    config = tiny_config()
    gan = make(config)
    x = torch.randn(16, L, D)
    opts = gan.configure_optimizers(config)
    train_terms = gan.training_step(x, labels=None, conditions=None, optimizers=opts, ctx=ctx(config))
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    val_terms = gan.loss_terms(x, labels=None, conditions=None, ctx=ctx(config))
    assert list(train_terms) == list(val_terms) == ["loss", "g_loss", "d_loss", "r1", "d_accuracy", "moment_gap"]
    assert all(isinstance(v, float) for v in val_terms.values())
    assert all(torch.equal(before[k], v) for k, v in gan.state_dict().items())
    assert gan.training


def test_r1_penalty_is_off_at_zero_weight():
    config = tiny_config(gan_r1_weight=0.0)
    gan = make(config)
    terms = gan.training_step(torch.randn(8, L, D), labels=None, conditions=None,
                              optimizers=gan.configure_optimizers(config), ctx=ctx(config))
    assert terms["r1"] == 0.0


def test_moment_gap_is_zero_for_matching_moments():
    x = torch.randn(64, L, D)
    assert moment_gap(x, x).item() == 0.0
    assert moment_gap(x + 1.0, x).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("loss", ["non_saturating", "hinge"])
def test_samples_move_toward_the_data_and_cover_both_modes(loss):
    torch.manual_seed(0)
    x, _, means = standardised_two_classes()
    config = tiny_config(gan_loss=loss, generator_hidden_dim=64, generator_learning_rate=2e-3)
    gan = make(config)
    before = gan.loss_terms(x, labels=None, conditions=None, ctx=ctx(config))["moment_gap"]
    train(gan, x, config, steps=400)
    after = gan.loss_terms(x, labels=None, conditions=None, ctx=ctx(config))["moment_gap"]
    assert after < 0.2 * before
    s = gan.sample(256, generator=torch.Generator().manual_seed(0))
    nearest = ((s.unsqueeze(1) - means.unsqueeze(0)) ** 2).mean(dim=(2, 3)).argmin(dim=1)
    assert 0.2 < (nearest == 0).float().mean() < 0.8  # no mode collapse


def test_label_conditioned_gan_samples_the_requested_class():
    torch.manual_seed(0)
    x, labels, means = standardised_two_classes()
    config = tiny_config(gan_conditioned=True, generator_hidden_dim=64, generator_learning_rate=2e-3)
    gan = make(config, num_classes=2)
    assert gan.conditioning == "label"
    train(gan, x, config, steps=300, labels=labels)
    for label in (0, 1):
        s = gan.sample(64, labels=torch.full((64,), label), generator=torch.Generator().manual_seed(1))
        nearest = ((s.unsqueeze(1) - means.unsqueeze(0)) ** 2).mean(dim=(2, 3)).argmin(dim=1)
        assert (nearest == label).float().mean() > 0.9


def test_conditioning_follows_gan_conditioned_and_missing_condition_raises():
    assert make(tiny_config(use_conditioned_vae=True), num_classes=2).conditioning is None  # VAE key: ignored
    on = tiny_config(gan_conditioned=True)
    assert make(on, num_classes=2, condition_dim=3).conditioning == "embedding"
    with pytest.raises(ValueError, match="condition embeddings"):
        make(on, num_classes=2, condition_dim=3).sample(2)
    with pytest.raises(ValueError, match="class labels"):
        make(on, num_classes=2).sample(2)
    gan = make(on, num_classes=2, condition_dim=3)
    terms = gan.training_step(torch.randn(4, L, D), labels=None, conditions=torch.randn(4, 3),
                              optimizers=gan.configure_optimizers(on), ctx=ctx(on))
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())


def test_sample_draws_only_from_the_given_generator():
    gan = make()
    state = torch.random.get_rng_state()
    a = gan.sample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, gan.sample(4, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 3}, {"num_classes": 3, "condition_dim": 2}])
def test_init_args_and_state_dict_rebuild_bit_identical_samples(kwargs):
    config = tiny_config(gan_conditioned=True)
    gan = make(config, **kwargs)
    opts = gan.configure_optimizers(config)
    gan.training_step(torch.randn(8, L, D), labels=torch.randint(0, 3, (8,)), conditions=torch.randn(8, 2),
                      optimizers=opts, ctx=ctx(config))
    clone = GANGenerator(**json.loads(json.dumps(gan.init_args())))
    clone.load_state_dict(gan.state_dict())
    labels, conditions = torch.tensor([2, 0]), torch.randn(2, 2)
    a = gan.sample(2, labels=labels, conditions=conditions, generator=torch.Generator().manual_seed(9))
    b = clone.sample(2, labels=labels, conditions=conditions, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_bfloat16_autocast_trains_with_finite_terms():
    config = tiny_config(generator_autocast="bfloat16")
    gan = make(config)
    c = ctx(config)
    c.autocast_dtype = torch.bfloat16
    terms = gan.training_step(torch.randn(8, L, D), labels=None, conditions=None,
                              optimizers=gan.configure_optimizers(config), ctx=c)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
