"""DP-SGD: per-sample gradients through Generator.training_step, refusals, secret noise, step counting."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.generators.gan import GANGenerator
from feda2v_toolkit.generators.gaussian import GaussianGenerator
from feda2v_toolkit.generators.vae import VAEGenerator
from feda2v_toolkit.privacy import PrivacyError, PrivacyLedger, epsilon_of, plan_budget
from feda2v_toolkit.privacy.sgd import PoissonSampler, dp_sgd_release, make_private
from tests.generators.helpers import ctx, tiny_config, two_class_data

L, D = 4, 8


def vae(seed=0):
    torch.manual_seed(seed)
    return VAEGenerator(seq_len=L, dim=D, hidden_dim=16, latent_dim=4, dropout=0.0, num_classes=2,
                        conditioning="label")


def gan(seed=0):
    torch.manual_seed(seed)
    return GANGenerator(seq_len=L, dim=D, hidden_dim=16, latent_dim=4, num_classes=2, conditioning="label")


def weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("make,cfg", [(vae, {}), (gan, {"gan_r1_weight": 0.0})])
def test_without_noise_and_clipping_a_private_step_is_the_plain_step(make, cfg):
    """Opacus' per-sample gradients, hooked through the unchanged training_step, sum to the plain gradient --
    also for the GAN's discriminator, which sees the real and the fake batch in two forward passes."""
    config = tiny_config(**cfg)
    x, y, _ = two_class_data(8)
    plain, private = make(), make()
    opts = plain.configure_optimizers(config)
    torch.manual_seed(1)
    plain.training_step(x, labels=y, conditions=None, optimizers=opts, ctx=ctx(config))
    popts = private.configure_optimizers(config)
    run = make_private(private, popts, 0.0, 1e9, expected_batch_size=x.shape[0], config=config)
    private.private_batch_size = None  # same fake batch as the plain step, for the comparison only
    torch.manual_seed(1)
    run.step(x, labels=y, conditions=None, ctx=ctx(config))
    run.close()
    assert torch.allclose(weights(plain), weights(private), atol=1e-6)


@pytest.mark.parametrize("make,cfg", [(vae, {}), (gan, {"gan_r1_weight": 0.0, "gan_critic_steps": 2})])
def test_ghost_engine_equals_opacus_per_sample_gradients(make, cfg):
    """Book-keeping clipping (no per-sample gradients formed) gives Opacus' clipped sums, clipping active."""
    config = tiny_config(**cfg)
    x, y, _ = two_class_data(8)
    out = []
    for engine in ("opacus", "ghost"):
        gen = make()
        opts = {k: torch.optim.SGD([p for g in o.param_groups for p in g["params"]], lr=0.5)
                for k, o in gen.configure_optimizers(config).items()}
        run = make_private(gen, opts, 0.0, 0.05, expected_batch_size=16, config=config, engine=engine)
        assert run.engine == engine
        for step in range(2):
            torch.manual_seed(step)
            run.step(x, labels=y, conditions=None, ctx=ctx(config))
        run.close()
        out.append(weights(gen))
    assert torch.allclose(out[0], out[1], atol=1e-5)


def test_clipping_bounds_one_clips_influence():
    """Batches differing in one clip (replaced by a wild one; same shapes, so the same random draws) move
    the weights by at most 2 C / B with clipping, and far more without."""
    config = tiny_config()
    x, y, _ = two_class_data(8)
    wild = x.clone()
    wild[-1] = -5.0 * x[0]
    base = vae()

    def gap(max_grad_norm):
        out = []
        for batch in (x, wild):
            gen = copy.deepcopy(base)
            opts = {"vae": torch.optim.SGD(gen.parameters(), lr=1.0)}
            run = make_private(gen, opts, 0.0, max_grad_norm, expected_batch_size=16, config=config)
            torch.manual_seed(3)
            run.step(batch, labels=y, conditions=None, ctx=ctx(config))
            run.close()
            out.append(weights(gen))
        return float((out[0] - out[1]).norm())

    assert gap(0.5) <= 2 * 0.5 / 16 + 1e-5
    assert gap(1e9) > 3 * 2 * 0.5 / 16  # the test can fail: unclipped, the wild clip moves them more


def test_noise_is_secret_not_from_the_seed():
    config = tiny_config()
    x, y, _ = two_class_data(8)
    out = []
    for _ in range(2):
        gen = vae()
        run = make_private(gen, gen.configure_optimizers(config), 1.0, 1.0, expected_batch_size=16, config=config)
        torch.manual_seed(0)  # the run's seed: everything else is identical
        run.step(x, labels=y, conditions=None, ctx=ctx(config))
        run.close()
        out.append(weights(gen))
    assert not torch.allclose(out[0], out[1])


def test_poisson_sampler_is_secret_and_may_be_empty():
    idx = torch.arange(100)
    a = [b.tolist() for b in PoissonSampler(idx, 0.1, 5)]
    torch.manual_seed(0)
    b = [b.tolist() for b in PoissonSampler(idx, 0.1, 5)]
    assert a != b and len(a) == 5
    sizes = [len(x) for x in PoissonSampler(idx, 0.1, 200)]
    assert 5 < sum(sizes) / len(sizes) < 15
    assert min(len(x) for x in PoissonSampler(torch.arange(3), 0.01, 50)) == 0


def test_every_step_is_counted_and_the_plan_holds_exactly_for_the_steps_run():
    config = tiny_config()
    x, y, _ = two_class_data(16)
    spec = dp_sgd_release("all", epochs=3, records=32, batch_size=8, max_grad_norm=1.0)
    assert spec.compositions == 3 * 4 and spec.sampling_rate == pytest.approx(0.25)
    plan = plan_budget([spec], 2.0, 1e-5, 32)
    gen = vae()
    run = make_private(gen, gen.configure_optimizers(config), plan.noise_multiplier(spec.name), 1.0,
                       expected_batch_size=8, config=config)
    ledger = PrivacyLedger(1e-5)
    for idx in PoissonSampler(torch.arange(32), spec.sampling_rate, spec.compositions):
        run.step(x[idx], labels=y[idx], conditions=None, ctx=ctx(config), ledger=ledger, release=spec.name,
                 sampling_rate=spec.sampling_rate)
    run.close()
    assert ledger.entries[spec.name].compositions == 12 == run.steps
    assert ledger.epsilon() == pytest.approx(2.0, rel=2e-3)
    ledger.record(spec.name, plan.noise_multiplier(spec.name), sensitivity=1.0, sampling_rate=0.25)
    assert ledger.epsilon() > 2.0  # a 13th step would be over budget


def test_an_empty_batch_is_a_noise_only_step():
    config = tiny_config()
    gen = vae()
    before = weights(gen)
    run = make_private(gen, gen.configure_optimizers(config), 1.0, 1.0, expected_batch_size=8, config=config)
    run.step(torch.empty(0, L, D), labels=torch.empty(0, dtype=torch.long), conditions=None, ctx=ctx(config))
    run.close()
    assert not torch.equal(before, weights(gen))  # noise moved the weights
    assert run.steps == 1


def test_gan_critic_steps_share_one_sample_in_the_accounting():
    config = tiny_config(gan_r1_weight=0.0, gan_critic_steps=4)
    gen = gan()
    run = make_private(gen, gen.configure_optimizers(config), 2.0, 1.0, expected_batch_size=8, config=config)
    assert run.noise_multiplier == pytest.approx(4.0)  # each of 4 steps: 2 * sqrt(4)
    ledger = PrivacyLedger(1e-5)
    x, y, _ = two_class_data(4)
    run.step(x, labels=y, conditions=None, ctx=ctx(config), ledger=ledger, release="g", sampling_rate=0.5)
    run.close()
    assert ledger.epsilon() == pytest.approx(epsilon_of([(2.0, 1, 0.5)], 1e-5))


def test_types_that_cannot_are_refused_up_front():
    config = tiny_config()
    g = gan()
    with pytest.raises(PrivacyError, match="gan_r1_weight"):
        make_private(g, g.configure_optimizers(config), 1.0, 1.0, 8, config=config)
    gauss = GaussianGenerator(seq_len=L, dim=D, rank=2)
    with pytest.raises(PrivacyError, match="closed form"):
        make_private(gauss, {}, 1.0, 1.0, 8, config=config)

    class NoDP(VAEGenerator):
        def private_modules(self, config):
            return None

    torch.manual_seed(0)
    plugin = NoDP(seq_len=L, dim=D, hidden_dim=8, latent_dim=2, dropout=0.0)
    with pytest.raises(PrivacyError, match="does not support differentially private training"):
        make_private(plugin, plugin.configure_optimizers(config), 1.0, 1.0, 8, config=config)
    v = vae()
    with pytest.raises(PrivacyError, match="max_grad_norm must be > 0"):
        make_private(v, v.configure_optimizers(config), 1.0, 0.0, 8, config=config)
    with pytest.raises(PrivacyError, match="max_grad_norm must be > 0"):
        dp_sgd_release("k", epochs=1, records=10, batch_size=2, max_grad_norm=-1.0)
    assert math.isfinite(schema_defaults()["generator_batch_size"])


@pytest.mark.parametrize("engine", ["ghost", "opacus"])
def test_ranks_that_sum_their_clipped_gradients_take_the_step_of_one_process(engine, monkeypatch):
    """Data-parallel DP-SGD: each rank clips the per-clip gradients of its share of the Poisson batch; summed
    over the ranks before the one draw of noise (the secret generator the ranks share), they make the step one
    process takes on the whole batch, noise included."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # the VAE's latent noise: alike for any split
    config = tiny_config()
    x, y, _ = two_class_data(8)

    def private(sum_over_ranks=None):
        gen = vae()
        run = make_private(gen, gen.configure_optimizers(config), 1.0, 0.05, expected_batch_size=8, config=config,
                           engine=engine, rng=torch.Generator().manual_seed(5), sum_over_ranks=sum_over_ranks)
        return gen, run

    whole, run = private()
    run.step(x, labels=y, conditions=None, ctx=ctx(config))
    other: list[list[torch.Tensor]] = []
    rank1, run1 = private(lambda sums: other.append([s.clone() for s in sums]))  # rank 1 hands its sums over
    run1.step(x[1::2], labels=y[1::2], conditions=None, ctx=ctx(config))
    rank0, run0 = private(lambda sums: [s.add_(o) for s, o in zip(sums, other.pop(), strict=True)])
    run0.step(x[0::2], labels=y[0::2], conditions=None, ctx=ctx(config))
    assert torch.allclose(weights(rank0), weights(whole), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights(rank1), weights(whole), rtol=1e-5, atol=1e-6)  # its own half alone


def test_the_ghost_engine_draws_the_same_noise_on_any_number_of_threads():
    """Ranks on machines of different sizes share one secret generator: they must draw alike."""
    config = tiny_config()
    x, y, _ = two_class_data(8)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            gen = vae()
            run = make_private(gen, gen.configure_optimizers(config), 1.0, 0.05, expected_batch_size=8,
                               config=config, engine="ghost", rng=torch.Generator().manual_seed(5))
            torch.manual_seed(0)
            run.step(x, labels=y, conditions=None, ctx=ctx(config))
            out.append(weights(gen))
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_dp_sgd_on_ranks_refuses_types_with_an_optimiser_that_is_not_private():
    config = tiny_config(gan_r1_weight=0.0)
    g = gan()
    with pytest.raises(PrivacyError, match="one optimiser, and a private one"):
        make_private(g, g.configure_optimizers(config), 1.0, 1.0, 8, config=config, sum_over_ranks=lambda s: None)
