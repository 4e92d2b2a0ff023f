"""The run's declarations from its config and components; refusals of anything that cannot be protected."""

from __future__ import annotations

import math

import pytest
import torch

from feda2v_toolkit.config import load_config, schema_defaults
from feda2v_toolkit.generators.gan import GANGenerator
from feda2v_toolkit.generators.gaussian import GaussianGenerator
from feda2v_toolkit.generators.vae import VAEGenerator
from feda2v_toolkit.privacy import PrivacyError, epsilon_of, plan_budget
from feda2v_toolkit.privacy.run import DPSettings, declare_releases, replan_sgd
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer
from feda2v_toolkit.reducers.pca import PCAReducer
from feda2v_toolkit.upsamplers.interpolate import LinearUpsampler
from feda2v_toolkit.upsamplers.learned import LearnedUpsampler
from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler

L, D, FULL = 4, 8, 20


def settings(**kw):
    return DPSettings(1.0, **kw)


def declare(generator_cls=GaussianGenerator, reducer=None, upsampler=None, normalize=True, generator=None, **kw):
    s = kw.pop("s", settings())
    stages = s.stages(num_classes=3, seq_len=L, dim=D)
    return declare_releases(s, stages, reducer=reducer or AdaptiveAvgReducer(length=L),
                            upsampler=upsampler or LeastSquaresUpsampler(reduced_length=L, full_length=FULL, dim=D),
                            generator_cls=generator_cls, normalize=normalize, keys=["unified"], records=300,
                            epochs=2, batch_size=32, generator=generator, **kw)


def test_config_keys_off_by_default_and_read_when_set():
    assert DPSettings.from_config(schema_defaults()) is None
    cfg = load_config({"generator_dp_epsilon": 2, "generator_dp_budget_weights": {"gaussian.sums": 8}})
    s = DPSettings.from_config(cfg)
    assert s.epsilon == 2.0 and s.delta == 1e-5 and s.weights == {"gaussian.sums": 8.0}


def test_default_pipeline_declares_every_release_and_data_independent_choices_spend_nothing():
    specs = declare()
    names = [s.name for s in specs]
    assert names[0] == "classes.counts"
    assert "reducer.AdaptiveAvgReducer" in names and "gaussian.sums" in names and "lstsq.sum_x" in names
    assert {s.name for s in specs if not s.data_dependent} == {"reducer.AdaptiveAvgReducer"}
    plan = plan_budget(specs, 1.0, 1e-5, 300)
    assert plan.noise_multiplier("reducer.AdaptiveAvgReducer") == 0
    fixed = declare(s=settings(normalization="fixed"), upsampler=LinearUpsampler())
    assert {"normalization.fixed", "upsampler.LinearUpsampler"} <= {s.name for s in fixed if not s.data_dependent}
    assert any(s.name.startswith("pca.") for s in declare(reducer=PCAReducer(length=L, full_length=FULL, dim=D)))


def test_budget_weight_overrides_are_applied_and_unknown_names_refused():
    specs = declare(s=settings(weights={"gaussian.sums": 9.0}))
    assert next(s for s in specs if s.name == "gaussian.sums").weight == 9.0
    with pytest.raises(PrivacyError, match="does not make: gaussian.nope"):
        declare(s=settings(weights={"gaussian.nope": 1.0}))


@pytest.mark.parametrize("kwargs,match", [
    ({"upsampler": LearnedUpsampler(reduced_length=L, full_length=FULL, dim=D)}, "no differentially private version"),
    ({"conditioning": "embedding"}, "condition embeddings"),
])
def test_components_without_a_private_version_are_refused(kwargs, match):
    with pytest.raises(PrivacyError, match=match):
        declare(**kwargs)


def test_trained_generators_declare_dp_sgd_and_plugins_without_support_are_refused():
    cfg = schema_defaults() | {"generator_hidden_dim": 8, "generator_latent_dim": 2, "gan_r1_weight": 0.0}
    gen = VAEGenerator.from_config(cfg, seq_len=L, dim=D)
    specs = declare(generator_cls=VAEGenerator, generator=gen, config=cfg)
    sgd = next(s for s in specs if s.name == "generator.unified.sgd")
    assert sgd.compositions == 2 * math.ceil(300 / 32) and sgd.sampling_rate == pytest.approx(32 / 300)

    class Plugin(VAEGenerator):
        def private_modules(self, config):
            return None

    torch.manual_seed(0)
    with pytest.raises(PrivacyError, match="declares no private modules"):
        declare(generator_cls=Plugin, generator=Plugin.from_config(cfg, seq_len=L, dim=D), config=cfg)
    g = GANGenerator.from_config(cfg | {"gan_r1_weight": 10.0}, seq_len=L, dim=D)
    with pytest.raises(PrivacyError, match="gan_r1_weight"):
        declare(generator_cls=GANGenerator, generator=g, config=cfg | {"gan_r1_weight": 10.0})


def test_replanning_from_the_noisy_counts_keeps_the_total_at_the_target():
    cfg = schema_defaults() | {"generator_hidden_dim": 8, "generator_latent_dim": 2}
    gen = VAEGenerator.from_config(cfg, seq_len=L, dim=D)
    specs = declare(generator_cls=VAEGenerator, generator=gen, config=cfg, upsampler=LinearUpsampler())
    plan = plan_budget(specs, 3.0, 1e-5, 300)
    made = {"classes.counts": plan.noise_multiplier("classes.counts")}
    plan2, specs2 = replan_sgd(plan, specs, made, {"unified": 280.0}, epochs=2, batch_size=32, steps_per_batch=1,
                               max_grad_norm=1.0)
    sgd = next(s for s in specs2 if s.name == "generator.unified.sgd")
    assert sgd.sampling_rate == pytest.approx(32 / 280)
    events = [(plan2.noise_multiplier(s.name), s.compositions, s.sampling_rate) for s in specs2 if s.data_dependent]
    assert epsilon_of(events, 1e-5) == pytest.approx(3.0, rel=3e-3)
    assert plan2.noise_multiplier("classes.counts") == made["classes.counts"]


@pytest.mark.parametrize("kw,match", [({"clip": 0.0}, "generator_dp_clip"), ({"max_grad_norm": -1.0}, "max_grad_norm"),
                                      ({"delta": 1.5}, "generator_dp_delta")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(PrivacyError, match=match):
        settings(**kw).check()


def test_training_without_dp_needs_neither_the_privacy_extra_nor_its_import_time(tiny_data, tmp_path):
    """dp_accounting (and SciPy under it) is loaded only by a private run; without the extra installed a
    private run is refused with the install line, and every other run trains."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "blocked = sys.argv[1] == 'blocked'\n"
        "if blocked:\n"
        "    sys.modules['dp_accounting'] = None  # as if the privacy extra were not installed\n"
        "from feda2v_toolkit.cli import main\n"
        "try:\n"
        "    main(sys.argv[2:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "sys.stderr.write(f'\\nCODE={code} LOADED={\"dp_accounting\" in sys.modules and sys.modules[\"dp_accounting\"] is not None}')\n"
    )
    train = ["train", "-d", str(tiny_data), "--training-length", "4", "-q", "--seed", "0"]
    runs = {}
    for name, mode, extra in (("plain", "installed", []), ("no-extra", "blocked", []),
                              ("dp-no-extra", "blocked", ["--dp-epsilon", "8"])):
        argv = [*train, "-o", str(tmp_path / f"{name}.safetensors"), *extra]
        runs[name] = subprocess.run([sys.executable, "-c", probe, mode, *argv], capture_output=True, text=True)
    assert runs["plain"].stderr.endswith("CODE=0 LOADED=False"), runs["plain"].stderr
    assert runs["no-extra"].stderr.endswith("CODE=0 LOADED=False"), runs["no-extra"].stderr
    dp = runs["dp-no-extra"].stderr
    assert "CODE=2" in dp and "pip install 'feda2v-tk[privacy]'" in dp and "Traceback" not in dp, dp
