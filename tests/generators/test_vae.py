"""The built-in ``vae`` generator: the original FedA2V VAE, its loss, schedule and conditioning."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from feda2v_toolkit.components import Generator
from feda2v_toolkit.generators import vae as vae_module
from feda2v_toolkit.generators.vae import VAEGenerator, beta_at
from feda2v_toolkit.plugins import get_registry

from .helpers import D, H, L, Z, ctx, tiny_config, two_class_data


def make(config=None, **kwargs) -> VAEGenerator:
    return VAEGenerator.from_config(config or tiny_config(), seq_len=L, dim=D, **kwargs)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(vae, x, config, steps, labels=None, conditions=None, batch=16):
    opts = vae.configure_optimizers(config)
    history = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        terms = vae.training_step(x[idx], labels=None if labels is None else labels[idx],
                                  conditions=None if conditions is None else conditions[idx],
                                  optimizers=opts, ctx=ctx(config, progress=step / steps, step=step))
        history.append(terms)
    return history


# -- registration and construction ---------------------------------------------------------------

def test_registered_as_vae_through_the_public_hook():
    spec = get_registry().get("generator", "vae")
    assert spec.plugin == "builtin" and spec.factory == "feda2v_toolkit.generators.vae:VAEGenerator"
    assert get_registry().load("generator", "vae") is VAEGenerator
    assert issubclass(VAEGenerator, Generator) and VAEGenerator.supports_conditioning
    defaults = tiny_config()
    assert all(key in defaults for key in spec.settings)  # every key it reads is in a schema


def test_from_config_reads_dims_from_the_resolved_config():
    vae = make(tiny_config(generator_dropout=0.3))
    assert (vae.hidden_dim, vae.latent_dim, vae.dropout) == (H, Z, 0.3)
    with pytest.raises(KeyError, match="resolved generator config"):
        VAEGenerator.from_config({}, seq_len=L, dim=D)


def test_parameter_count_is_the_original_architecture_at_tiny_dims():
    flat = L * D
    encoder = (flat * H + H) + (H * H + H) + (H * 2 * Z + 2 * Z)
    decoder = (Z * H + H) + (H * H + H) + (H * flat + flat)
    assert n_params(make()) == encoder + decoder


@pytest.mark.parametrize(("seq_len", "expected"), [(4, 9_182_720), (32, 53_244_416), (1214, 1_913_277_440)])
def test_parameter_count_at_real_shape_on_the_meta_device(seq_len, expected):
    config = tiny_config(generator_hidden_dim=1024, generator_latent_dim=256, generator_dropout=0.2)
    with torch.device("meta"):
        vae = VAEGenerator.from_config(config, seq_len=seq_len, dim=768)
    assert n_params(vae) == expected  # 9.18 M, 53.2 M, 1.91 B
    assert all(p.is_meta for p in vae.parameters())


def test_shapes_of_encode_decode_and_sample():
    vae = make()
    x = torch.randn(5, L, D)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, Z)
    assert vae.decode(mu).shape == (5, L, D)
    assert vae.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, L, D)


# -- loss and schedule ---------------------------------------------------------------------------

def test_beta_warms_up_linearly_over_the_configured_fraction_of_training():
    assert beta_at(0.0, 2.0, 0.5) == 0.0
    assert beta_at(0.25, 2.0, 0.5) == pytest.approx(1.0)
    assert beta_at(0.5, 2.0, 0.5) == 2.0
    assert beta_at(0.9, 2.0, 0.5) == 2.0
    assert beta_at(0.0, 2.0, 0.0) == 2.0  # no warm-up


def test_training_step_derives_beta_from_progress_so_resume_continues_it():
    config = tiny_config(generator_beta=1.0, generator_beta_warmup_fraction=0.5)
    vae = make(config)
    opts = vae.configure_optimizers(config)
    x = torch.randn(8, L, D)
    for progress, beta in [(0.0, 0.0), (0.1, 0.2), (0.4, 0.8), (0.75, 1.0)]:
        terms = vae.training_step(x, labels=None, conditions=None, optimizers=opts, ctx=ctx(config, progress))
        assert terms["beta"] == pytest.approx(beta)
        assert list(terms)[0] == "loss"
        cos_w = config["generator_cosine_weight"]
        assert terms["loss"] == pytest.approx(terms["recon"] + beta * terms["kl"] + cos_w * (1 - terms["cosine"]),
                                              rel=1e-5)


def test_cosine_term_is_per_token():
    vae = make()
    x = torch.randn(6, L, D)
    torch.manual_seed(0)
    terms = vae.loss_terms(x, labels=None, conditions=None, ctx=ctx(tiny_config()))
    torch.manual_seed(0)
    recon, _, _ = vae.eval()(x)
    assert terms["cosine"] == pytest.approx(F.cosine_similarity(recon, x, dim=-1).mean().item(), rel=1e-5)


def test_loss_decreases_on_a_tiny_structured_dataset():
    torch.manual_seed(0)
    x, _, _ = two_class_data()
    config = tiny_config(generator_learning_rate=3e-3)
    history = train(make(config), x, config, steps=60)
    first = sum(h["recon"] for h in history[:5]) / 5
    last = sum(h["recon"] for h in history[-5:]) / 5
    assert last < 0.5 * first


def test_augmentation_feeds_noisy_input_but_reconstructs_the_clean_target(monkeypatch):
    config = tiny_config(generator_augmentation=True, generator_augmentation_noise=0.5)
    vae = make(config)
    seen = {}
    vae.encoder[0].register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0].detach().clone()))
    real_mse = F.mse_loss

    def spy(input, target, *a, **k):
        seen["target"] = target.detach().clone()
        return real_mse(input, target, *a, **k)

    monkeypatch.setattr(vae_module.F, "mse_loss", spy)
    x = torch.randn(64, L, D)
    vae.training_step(x, labels=None, conditions=None, optimizers=vae.configure_optimizers(config),
                      ctx=ctx(config))
    assert torch.equal(seen["target"], x)  # denoising: the target is the clean input
    noise = seen["input"].view_as(x) - x
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)


def test_loss_terms_updates_nothing_and_uses_no_augmentation():
    config = tiny_config(generator_augmentation=True, generator_augmentation_noise=10.0)
    vae = make(config)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    torch.manual_seed(0)
    terms = vae.loss_terms(torch.zeros(4, L, D), labels=None, conditions=None, ctx=ctx(config))
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert list(terms)[0] == "loss" and terms["recon"] < 10  # noise of std 10 would dominate it
    assert vae.training  # mode restored


def test_optimiser_is_adamw_with_configured_rate_and_decay():
    config = tiny_config(generator_learning_rate=0.02, generator_weight_decay=0.3)
    opts = make(config).configure_optimizers(config)
    (opt,) = opts.values()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["weight_decay"] == 0.3


def test_gradient_clipping_bounds_the_update_norm():
    config = tiny_config(generator_grad_clip=1e-3, generator_learning_rate=1.0, generator_weight_decay=0.0)
    vae = make(config)
    opt = torch.optim.SGD(vae.parameters(), lr=1.0)  # plain SGD: the step equals the clipped gradient
    before = torch.cat([p.detach().flatten().clone() for p in vae.parameters()])
    vae.training_step(torch.randn(8, L, D), labels=None, conditions=None, optimizers={"vae": opt},
                      ctx=ctx(config))
    after = torch.cat([p.detach().flatten() for p in vae.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


# -- conditioning --------------------------------------------------------------------------------

def test_conditioning_kind_follows_config_and_data():
    assert make(tiny_config(), num_classes=3).conditioning is None  # unconditioned by default
    on = tiny_config(use_conditioned_vae=True)
    assert make(on, num_classes=3).conditioning == "label"
    assert make(on, num_classes=3, condition_dim=5).conditioning == "embedding"
    assert make(on).conditioning is None  # nothing to condition on
    assert make(on, num_classes=3, condition_dim=5).needs_condition


def test_unconditioned_vae_ignores_labels():
    vae = make(num_classes=2)
    a = vae.sample(4, generator=torch.Generator().manual_seed(1))
    b = vae.sample(4, labels=torch.tensor([0, 1, 0, 1]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_missing_condition_raises_a_clear_error():
    on = tiny_config(use_conditioned_vae=True)
    with pytest.raises(ValueError, match=r"condition embeddings.*\[2, 5\]"):
        make(on, num_classes=3, condition_dim=5).sample(2)
    with pytest.raises(ValueError, match="class labels"):
        make(on, num_classes=3).sample(2)
    with pytest.raises(ValueError, match="labels"):
        vae = make(on, num_classes=3)
        vae.training_step(torch.randn(2, L, D), labels=None, conditions=None,
                          optimizers=vae.configure_optimizers(on), ctx=ctx(on))


def test_embedding_conditioned_vae_trains_and_samples():
    on = tiny_config(use_conditioned_vae=True)
    vae = make(on, num_classes=2, condition_dim=3)
    x = torch.randn(16, L, D)
    terms = train(vae, x, on, steps=2, conditions=torch.randn(16, 3))
    assert all(torch.isfinite(torch.tensor(t["loss"])) for t in terms)
    assert vae.sample(2, conditions=torch.randn(2, 3)).shape == (2, L, D)


def test_label_conditioned_vae_samples_nearer_the_requested_class():
    torch.manual_seed(0)
    x, labels, means = two_class_data()
    config = tiny_config(use_conditioned_vae=True, generator_learning_rate=3e-3,
                         generator_beta_warmup_fraction=0.3)
    vae = make(config, num_classes=2)
    train(vae, x, config, steps=150, labels=labels)
    g = torch.Generator().manual_seed(0)
    for label in (0, 1):
        s = vae.sample(64, labels=torch.full((64,), label), generator=g)
        dist = ((s.unsqueeze(1) - means.unsqueeze(0)) ** 2).mean(dim=(2, 3))  # [64, 2]
        assert (dist.argmin(dim=1) == label).float().mean() > 0.9


# -- sampling and rebuilding ---------------------------------------------------------------------

def test_sample_draws_only_from_the_given_generator_and_in_eval_mode():
    vae = make(tiny_config(generator_dropout=0.5))
    state = torch.random.get_rng_state()
    a = vae.sample(4, generator=torch.Generator().manual_seed(7))
    b = vae.sample(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # dropout off, no global randomness
    assert torch.equal(state, torch.random.get_rng_state())
    assert vae.training


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 3}, {"num_classes": 3, "condition_dim": 2}])
def test_init_args_and_state_dict_rebuild_bit_identical_samples(kwargs):
    config = tiny_config(use_conditioned_vae=True)
    vae = make(config, **kwargs)
    train(vae, torch.randn(16, L, D), config, steps=3, labels=torch.randint(0, 3, (16,)),
          conditions=torch.randn(16, kwargs.get("condition_dim", 1)))
    args = json.loads(json.dumps(vae.init_args()))  # JSON values only
    clone = VAEGenerator(**args)
    clone.load_state_dict(vae.state_dict())
    labels, conditions = torch.tensor([0, 2, 1]), torch.randn(3, 2)
    a = vae.sample(3, labels=labels, conditions=conditions, generator=torch.Generator().manual_seed(3))
    b = clone.sample(3, labels=labels, conditions=conditions, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bfloat16_autocast_trains_with_float32_weights_and_finite_terms():
    config = tiny_config(generator_autocast="bfloat16")
    vae = make(config)
    opts = vae.configure_optimizers(config)
    c = ctx(config)
    c.autocast_dtype = torch.bfloat16
    terms = vae.training_step(torch.randn(8, L, D), labels=None, conditions=None, optimizers=opts, ctx=c)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert all(p.dtype == torch.float32 for p in vae.parameters())


def test_training_stays_stable_on_the_very_wide_correlated_input_of_real_embeddings():
    """Reproduction of the divergence on real embeddings, at the real input width (l = 32, D = 768) with
    tiny hidden layers: flattened features of real embeddings are strongly correlated, so Adam's step
    on the first encoder layer moves its output by ~lr * fan_in. Unscaled, the loss spikes by orders of
    magnitude within a few steps; with the learning rate sized for the input width it stays near 1."""
    from feda2v_toolkit.generators._common import adamw

    length, dim = 32, 768
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g) @ torch.randn(3, length * dim, generator=g)  # rank 3
    x = x + 0.05 * torch.randn(64, length * dim, generator=g)
    x = ((x - x.mean(0)) / x.std(0)).view(64, length, dim)
    cfg = tiny_config(generator_hidden_dim=64, generator_latent_dim=8)

    def worst_loss(optimizers) -> float:
        worst = 0.0
        for step in range(30):
            terms = vae.training_step(x[(step % 2) * 32:(step % 2 + 1) * 32], labels=None, conditions=None,
                                      optimizers=optimizers, ctx=ctx(cfg, progress=step / 30, step=step))
            worst = max(worst, terms["loss"]) if math.isfinite(terms["loss"]) else math.inf
        return worst

    torch.manual_seed(0)
    vae = VAEGenerator.from_config(cfg, seq_len=length, dim=dim)
    assert worst_loss({"vae": adamw(vae.parameters(), lr=1e-3, weight_decay=1e-5)}) > 20  # the failure
    torch.manual_seed(0)
    vae = VAEGenerator.from_config(cfg, seq_len=length, dim=dim)
    groups = vae.configure_optimizers(cfg)["vae"].param_groups
    assert groups[-1]["lr"] == pytest.approx(1e-3 * 64 / (length * dim))  # the first encoder layer
    assert worst_loss(vae.configure_optimizers(cfg)) < 2
