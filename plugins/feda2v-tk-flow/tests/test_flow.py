"""feda2v-tk-flow: the conformance kit over everything the plugin registers, plus what is specific to it."""

from __future__ import annotations

import json
import math
import warnings

import feda2v_tk_flow.plugin as plugin
import pytest
import torch
from feda2v_tk_flow.flow import RealNVPGenerator
from feda2v_tk_flow.spectral import DCTReducer, DCTUpsampler, dct_matrix, resample_matrix

from feda2v_toolkit.plugins import using_registry
from feda2v_toolkit.testing import (
    check_component,
    check_generator,
    check_migration,
    conformance_cases,
    plugin_registry,
)


@pytest.mark.parametrize(("kind", "name"), conformance_cases(plugin=plugin))
def test_every_component_passes_the_conformance_kit(kind, name, tmp_path):
    check_component(kind, name, plugin=plugin, tmp_path=tmp_path)


@pytest.mark.parametrize("overrides", [{"flow_conditioned": False}, {"flow_temperature": 0.7}])
def test_realnvp_conforms_unconditioned_and_at_lower_temperature(overrides, tmp_path):
    check_generator("realnvp", plugin=plugin, config=overrides, end_to_end=False, tmp_path=tmp_path)


def test_realnvp_conforms_with_condition_embeddings(tmp_path):
    check_generator("realnvp", plugin=plugin, condition_dim=3, end_to_end=False, tmp_path=tmp_path)


def test_the_registry_sees_the_plugin_under_its_name():
    reg = plugin_registry(plugin)
    assert reg.get("generator", "realnvp").qualified_name == "flow:realnvp"
    assert reg.get("reducer", "flow:dct").provenance.plugin == "flow"
    assert "flow_coupling_layers" in reg.settings(reg.get("generator", "realnvp"))


def _flow(seq_len=2, dim=3, **kw):
    torch.manual_seed(0)
    gen = RealNVPGenerator(seq_len=seq_len, dim=dim, coupling_layers=4, hidden_dim=8, **kw)
    for p in gen.parameters():  # leave the identity start: random weights everywhere
        torch.nn.init.normal_(p, std=0.3)
    return gen


def test_inverse_undoes_forward_exactly():
    gen = _flow()
    x = torch.randn(5, 2, 3)
    z, _ = gen(x)
    assert torch.allclose(gen.inverse(z), x, atol=1e-5)


def test_log_prob_is_the_change_of_variables_density():
    gen = _flow().double()
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: gen(v.view(1, 2, 3))[0].squeeze(0), x.flatten())
    z, _ = gen(x)
    expected = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum() + torch.linalg.slogdet(jac)[1]
    assert torch.allclose(gen.log_prob(x), expected.unsqueeze(0), atol=1e-8)


def test_training_fits_a_gaussian():
    torch.manual_seed(0)
    scale = torch.tensor([2.0, 0.5, 1.0, 1.5])
    data = (torch.randn(512, 2, 2) * scale.view(2, 2) + 1.0)
    gen = RealNVPGenerator(seq_len=2, dim=2, coupling_layers=4, hidden_dim=16)
    cfg = {"generator_learning_rate": 1e-2, "generator_weight_decay": 0.0, "generator_grad_clip": 5.0}
    from feda2v_toolkit.components import TrainContext

    opts = gen.configure_optimizers(cfg)
    ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=0.0, config=cfg)
    first = gen.loss_terms(data, labels=None, conditions=None, ctx=ctx)["loss"]
    for _ in range(150):
        gen.training_step(data[torch.randint(0, 512, (64,))], labels=None, conditions=None, optimizers=opts, ctx=ctx)
    last = gen.loss_terms(data, labels=None, conditions=None, ctx=ctx)["loss"]
    true_nll = 0.5 * math.log(2 * math.pi * math.e) + float(scale.log().mean())
    assert last < first and abs(last - true_nll) < 0.1
    samples = gen.sample(4000, generator=torch.Generator().manual_seed(1)).flatten(1)
    assert torch.allclose(samples.mean(0), torch.ones(4), atol=0.25)
    assert torch.allclose(samples.std(0), scale, rtol=0.2)


def test_dct_matrix_is_orthonormal():
    m = dct_matrix(7)
    assert torch.allclose(m @ m.T, torch.eye(7, dtype=m.dtype), atol=1e-12)


def test_dct_reducer_and_upsampler_are_a_matched_pair():
    x = torch.randn(3, 40, 5)
    red, up = DCTReducer(length=6), DCTUpsampler()
    y = red(x)
    assert y.shape == (3, 6, 5)
    assert torch.allclose(red(up(y, 40)), y, atol=1e-5)  # reduce after upsample: identity
    proj = up(y, 40)
    assert torch.allclose(up(red(proj), 40), proj, atol=1e-5)  # upsample after reduce: a projection
    assert torch.allclose(red(torch.full((1, 40, 2), 3.0)), torch.full((1, 6, 2), 3.0), atol=1e-6)


def test_dct_upsampling_keeps_band_limited_signals_exactly():
    t = (torch.arange(40, dtype=torch.float64) + 0.5) / 40
    smooth = torch.cos(math.pi * 2 * t)  # DCT frequency 2: inside a 6-coefficient band
    reduced = resample_matrix(40, 6) @ smooth
    assert torch.allclose(resample_matrix(6, 40) @ reduced, smooth, atol=1e-10)


def test_migration_renames_the_deprecated_key_in_place():
    before = {"generator_type": "realnvp", "flow_num_layers": 4, "flow_hidden_dim": 64}
    check_migration("flow-0001-rename-num-layers", before, plugin=plugin,
                    expected={"generator_type": "realnvp", "flow_coupling_layers": 4, "flow_hidden_dim": 64})


def test_load_config_validates_migrates_and_fills_the_flow_keys():
    from feda2v_toolkit.config import load_config
    from feda2v_toolkit.errors import InputError

    with using_registry(plugin_registry(plugin)):
        cfg = load_config({"generator_type": "realnvp", "flow_hidden_dim": 32})
        assert cfg["flow_hidden_dim"] == 32 and cfg["flow_coupling_layers"] == 6
        with pytest.raises(InputError, match="flow_temperature"):
            load_config({"generator_type": "realnvp", "flow_temperature": "warm"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_config({"generator_type": "realnvp", "flow_num_layers": 3})
        assert cfg["flow_coupling_layers"] == 3 and "flow_num_layers" not in cfg
        assert any("flow_num_layers" in str(w.message) for w in caught)


def test_flow_nll_scores_held_out_data_with_a_trained_model(tmp_path):
    from click.testing import CliRunner
    from feda2v_tk_flow.commands import flow_nll_cmd

    from feda2v_toolkit.data.demo import write_demo_dataset
    from feda2v_toolkit.training.pipeline import train

    data = write_demo_dataset(tmp_path / "data.safetensors", 6, seq_len=20, dim=4, num_classes=2)
    config = {"generator_type": "realnvp", "generator_reducer": "dct", "generator_upsampler": "dct",
              "generator_training_sequence_length": 4, "generator_training_epochs": 2, "generator_batch_size": 4,
              "flow_coupling_layers": 2, "flow_hidden_dim": 16, "generator_seed": 0,
              "generator_checkpoint_dir": str(tmp_path / "ckpt")}
    with using_registry(plugin_registry(plugin)):
        model = train(config, data, out=tmp_path / "flow.safetensors", progress=False)
        assert model.reducer_name == "dct" and type(model.upsampler).__name__ == "DCTUpsampler"
        result = CliRunner().invoke(flow_nll_cmd, [str(tmp_path / "flow.safetensors"), str(data), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["sequences"] == 12 and out["skipped"] == 0 and math.isfinite(out["nll_per_element"])
    assert set(out["per_class"]) == set(model.class_names)
