"""Training: reduce once, granularities, determinism, exact resume, bounded reads, clear failures."""

from __future__ import annotations

import json

import pytest
import torch

import feda2v_toolkit.training.pipeline as training
import feda2v_toolkit.training.streams as streams
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.errors import InputError, ToolkitError
from feda2v_toolkit.model.file import load_model
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer
from feda2v_toolkit.runtime.tensorfile import _write_sorted as real_write
from feda2v_toolkit.training.checkpoint import load_checkpoint
from feda2v_toolkit.training.pipeline import train
from feda2v_toolkit.training.spec import generator_groups


def _train_interrupted_after_epoch(epoch, config, data, checkpoint_dir, monkeypatch):
    """Run ``train`` and stop it with Ctrl-C right after the checkpoint of ``epoch`` is written."""
    save = training.save_checkpoint

    def interrupt(path, model, optimizers, state):
        save(path, model, optimizers, state)
        if state.epoch == epoch:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_checkpoint", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(config, data, checkpoint_dir=checkpoint_dir)


def _weights(model):
    return {f"{k}.{n}": t for k, g in model.generators.items() for n, t in g.state_dict().items()}


def test_trains_writes_a_model_and_logs_metrics_per_epoch(tiny_data, tiny_config, tmp_path):
    out = tmp_path / "m.safetensors"
    metrics = tmp_path / "m.jsonl"
    model = train(tiny_config, tiny_data, out=out, metrics_path=metrics)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"loss", "recon", "kl"} <= set(lines[-1]["train"])
    assert "val" in lines[-1]  # the last epoch is always validated
    assert model.metrics["epochs"] == 4 and model.metrics["val"]["loss"] > 0
    assert load_model(out).class_names == ["engine", "drum", "whistle", "bird"]


def test_training_reduces_the_loss(tiny_data, tiny_config, tmp_path):
    tiny_config.update(generator_training_epochs=30, generator_validation_frequency=30)
    metrics = tmp_path / "m.jsonl"
    train(tiny_config, tiny_data, metrics_path=metrics)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[-1]["train"]["recon"] < 0.8 * lines[0]["train"]["recon"]


def test_every_sequence_is_reduced_exactly_once_however_many_epochs(tiny_data, tiny_config, monkeypatch):
    rows = []
    original = AdaptiveAvgReducer.forward

    def counting(self, x):
        rows.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(AdaptiveAvgReducer, "forward", counting)
    tiny_config["generator_training_epochs"] = 6
    train(tiny_config, tiny_data)
    assert sum(rows) == 40


def test_full_sequences_are_read_in_bounded_chunks(tiny_data, tiny_config, monkeypatch):
    monkeypatch.setattr(streams, "READ_CHUNK_BYTES", 50 * 16 * 4 * 3)  # three sequences at a time
    sizes = []
    read, stream = Dataset.read, Dataset.stream

    def reading(self, indices, **kwargs):
        sizes.append(len(indices))
        return read(self, indices, **kwargs)

    def streaming(self, chunks, **kwargs):
        chunks = list(chunks)
        sizes.extend(len(c) for c in chunks)
        return stream(self, chunks, **kwargs)

    monkeypatch.setattr(Dataset, "read", reading)
    monkeypatch.setattr(Dataset, "stream", streaming)
    train(tiny_config, tiny_data)
    assert sizes and max(sizes) <= 3


def test_same_seed_same_weights_other_seed_other_weights(tiny_data, tiny_config):
    a = _weights(train(tiny_config, tiny_data, seed=5))
    b = _weights(train(tiny_config, tiny_data, seed=5))
    c = _weights(train(tiny_config, tiny_data, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tiny_data, tiny_config, tmp_path, monkeypatch):
    tiny_config.update(generator_training_epochs=6, generator_augmentation=True, generator_granularity="per_class")
    reference = _weights(train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "a"))

    _train_interrupted_after_epoch(4, tiny_config, tiny_data, tmp_path / "b", monkeypatch)
    checkpoint = tmp_path / "b" / "generator.checkpoint.safetensors"
    assert load_checkpoint(checkpoint).state.epoch == 4
    resumed = _weights(train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "b", resume=True))
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_valid(tiny_data, tiny_config, tmp_path,
                                                                          monkeypatch):
    tiny_config["generator_training_epochs"] = 4
    calls = []

    def dies_on_second_checkpoint(filename, tensors, metadata):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as fh:  # half a file, then the process is "killed"
                fh.write(b"\x00" * 10)
            raise KeyboardInterrupt
        return real_write(filename, tensors, metadata)

    monkeypatch.setattr("feda2v_toolkit.runtime.tensorfile._write_sorted", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["generator.checkpoint.safetensors"]
    assert load_checkpoint(tmp_path / "ck" / files[0]).state.epoch == 2


def test_resume_refuses_a_checkpoint_from_another_config(tiny_data, tiny_config, tmp_path):
    train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "ck")
    tiny_config["generator_hidden_dim"] = 64
    with pytest.raises(ToolkitError, match="another config"):
        train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "ck", resume=True)


@pytest.mark.parametrize(("granularity", "groups", "expected"), [
    ("unified", None, {"all": ["engine", "drum", "whistle", "bird"]}),
    ("per_class", None, {"engine": ["engine"], "drum": ["drum"], "whistle": ["whistle"], "bird": ["bird"]}),
    ("per_group", {"low": ["engine", "drum"]}, {"low": ["engine", "drum"], "other": ["whistle", "bird"]}),
])
def test_granularity_decides_which_generator_serves_which_class(tiny_data, tiny_config, granularity, groups, expected):
    tiny_config.update(generator_granularity=granularity, generator_class_groups=groups, generator_training_epochs=1)
    model = train(tiny_config, tiny_data)
    assert {k: sorted(v) for k, v in _served(model).items()} == {k: sorted(v) for k, v in expected.items()}


def _served(model):
    out = {}
    for c, key in model.class_to_generator.items():
        out.setdefault(key, []).append(c)
    return out


def test_groups_naming_unknown_or_duplicate_classes_are_refused():
    names = ["a", "b", "c"]
    with pytest.raises(InputError, match="not in the data"):
        generator_groups({"generator_granularity": "per_group", "generator_class_groups": {"g": ["zz"]}}, names, names)
    with pytest.raises(InputError, match="groups"):
        generator_groups({"generator_granularity": "per_group",
                          "generator_class_groups": {"g": ["a"], "h": ["a"]}}, names, names)


def test_held_out_split_is_stratified_and_deterministic():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2])
    train_idx, val_idx = stratified_split(labels, 0.2, seed=1)
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [2, 2, 0]
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(21))
    assert torch.equal(val_idx, stratified_split(labels, 0.2, seed=1)[1])


def test_sequences_shorter_than_the_training_length_are_refused(tiny_data, tiny_config):
    tiny_config["generator_training_sequence_length"] = 64
    with pytest.raises(InputError, match="fewer than generator_training_sequence_length"):
        train(tiny_config, tiny_data)


def test_a_class_without_samples_is_refused(tmp_path, tiny_config):
    path = write_dataset(tmp_path / "d.safetensors", torch.randn(4, 10, 4), torch.tensor([0, 0, 2, 2]),
                         class_names=["a", "b", "c"])
    with pytest.raises(InputError, match="'b'"):
        train(tiny_config, path)


def test_nan_in_the_data_is_refused_before_training(tmp_path, tiny_config):
    emb = torch.randn(8, 10, 4)
    emb[5, 0, 0] = float("inf")
    path = write_dataset(tmp_path / "d.safetensors", emb, torch.arange(8) % 2)
    with pytest.raises(InputError, match="sample 5"):
        train(tiny_config, path)


def test_learned_upsampling_is_trained_and_measured_against_linear(tiny_data, tiny_config, tmp_path):
    tiny_config.update(use_learned_upsampling=True, generator_output_sequence_length=50,
                       generator_training_epochs=1, generator_upsampler_epochs=30)
    del tiny_config["generator_upsampler"]  # the flag selects `learned`; naming another upsampler too is a conflict
    model = train(tiny_config, tiny_data, out=tmp_path / "m.safetensors")
    ups = load_model(tmp_path / "m.safetensors").metrics["upsampler"]
    assert model.upsampler_name == "learned"
    assert ups["heldout_mse"] < ups["heldout_mse_linear"]
    assert {"heldout_r2", "heldout_r2_linear"} <= set(ups)


def test_conditions_in_the_data_condition_the_vae(tmp_path, tiny_config):
    emb = torch.randn(12, 10, 4)
    cond = torch.randn(12, 6)
    path = write_dataset(tmp_path / "d.safetensors", emb, torch.arange(12) % 2, conditions=cond)
    tiny_config["generator_training_epochs"] = 1
    model = train(tiny_config, path)
    assert model.condition_dim == 6
    assert model.needs_condition("class_0")
    assert open_dataset(path).condition_dim == 6


def test_a_run_that_drew_its_seed_resumes_with_it(tiny_data, tiny_config, tmp_path, monkeypatch):
    tiny_config.pop("generator_seed")
    _train_interrupted_after_epoch(2, tiny_config, tiny_data, tmp_path / "ck", monkeypatch)
    seed = load_checkpoint(tmp_path / "ck" / "generator.checkpoint.safetensors").state.fingerprint["seed"]
    resumed = train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.seed == seed and resumed.metrics["epochs"] == 4


def test_resume_refuses_other_data_with_the_same_labels_and_another_epoch_count(tiny_config, tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset

    a = write_demo_dataset(tmp_path / "a.safetensors", 4, seq_len=30, dim=8, seed=0)
    b = write_demo_dataset(tmp_path / "b.safetensors", 4, seq_len=30, dim=8, seed=0, first_clip=100)
    train(tiny_config, a, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ToolkitError, match="another dataset"):
        train(tiny_config, b, checkpoint_dir=tmp_path / "ck", resume=True)
    tiny_config["generator_training_epochs"] = 8
    with pytest.raises(ToolkitError, match="another epoch count"):
        train(tiny_config, a, checkpoint_dir=tmp_path / "ck", resume=True)


def test_outputs_may_not_overwrite_the_training_data(tiny_config, tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "d.safetensors", 2, seq_len=30, dim=8)
    before = data.read_bytes()
    with pytest.raises(ToolkitError, match="also an input dataset"):
        train(tiny_config, data, out=data)
    with pytest.raises(ToolkitError, match="also an input dataset"):
        train(tiny_config, data, out=tmp_path / "m.safetensors", metrics_path=data)
    shards = write_demo_dataset(tmp_path / "shards", 2, seq_len=30, dim=8)
    with pytest.raises(ToolkitError, match="inside the input dataset directory"):
        train(tiny_config, shards, out=shards / "m.safetensors")
    assert data.read_bytes() == before


def test_outputs_in_new_directories_are_created(tiny_data, tiny_config, tmp_path):
    train(tiny_config, tiny_data, out=tmp_path / "new" / "m.safetensors",
          metrics_path=tmp_path / "other" / "m.jsonl")
    assert (tmp_path / "new" / "m.safetensors").exists() and (tmp_path / "other" / "m.jsonl").exists()


def test_the_default_generator_is_fitted_once_in_closed_form_and_upsampled_by_lstsq(tiny_data, tmp_path):
    """With only the lengths set: the gaussian generator (one mean per class) is fitted once -- no epochs,
    no optimiser steps -- and the fitted lstsq upsampler decodes its samples to full length."""
    cfg = {"generator_training_sequence_length": 4, "generator_output_sequence_length": 50,
           "generator_checkpoint_dir": str(tmp_path / "ck")}
    model = train(cfg, tiny_data, out=tmp_path / "m.safetensors", seed=0)
    assert (model.generator_type, model.upsampler_name, model.granularity) == ("gaussian", "lstsq", "unified")
    gen = model.generators["all"]
    assert gen.conditioning == "label" and int(gen.counts.sum()) == 36  # 40 clips, 1 per class held out
    m = model.metrics
    assert (m["epochs"], m["steps"]) == (1, 0) and m["generator_fit"]["all"]["sequences"] == 36.0
    assert m["val"]["loss"] == pytest.approx(m["val"]["loss"]) and "mse" in m["val"]
    loaded = load_model(tmp_path / "m.safetensors")
    a = model.sample(3, class_name="drum", generator=torch.Generator().manual_seed(1))
    b = loaded.sample(3, class_name="drum", generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 50, 16) and torch.equal(a, b)
    again = train(cfg, tiny_data, seed=0)
    assert all(torch.equal(t, again.generators["all"].state_dict()[k]) for k, t in gen.state_dict().items())


def test_a_closed_form_upsamplers_held_out_error_comes_from_the_reduce_pass_not_a_second_read(tiny_data, tmp_path,
                                                                                               monkeypatch):
    """``lstsq`` takes its held-out sums while the data are reduced: no second pass over the held-out clips, and
    the same figures as that pass (MSE to 1e-7 relative, R^2 to 1e-7)."""
    from feda2v_toolkit.training import site as site_module
    from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler

    config = {"generator_type": "gaussian", "generator_training_sequence_length": 4,
              "generator_checkpoint_dir": str(tmp_path / "ck")}
    passes = []
    second_read = site_module.heldout_reconstruction
    monkeypatch.setattr(site_module, "heldout_reconstruction", lambda *a, **k: passes.append(1) or second_read(*a, **k))
    train(config, tiny_data, out=tmp_path / "sums.safetensors", seed=0)
    assert passes == []
    monkeypatch.delattr(LeastSquaresUpsampler, "heldout_sums")  # an upsampler without them: the second read
    train(config, tiny_data, out=tmp_path / "pass.safetensors", seed=0)
    assert passes
    sums, read = (load_model(tmp_path / f"{n}.safetensors").metrics["upsampler"] for n in ("sums", "pass"))
    for key in ("heldout_mse", "heldout_mse_linear", "heldout_r2", "heldout_r2_linear"):
        assert sums[key] == pytest.approx(read[key], rel=1e-7, abs=1e-7 if "r2" in key else 0), key
    assert sums["heldout_mse"] < sums["heldout_mse_linear"]
