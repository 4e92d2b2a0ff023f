"""Model files: one safetensors file, rebuilt without pickle, bit-exact, refusing what it cannot read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.errors import InputError, NewerVersionError, UsageError
from feda2v_toolkit.generators.vae import VAEGenerator
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.file import load_model, read_model_metadata, save_model
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer
from feda2v_toolkit.upsamplers.interpolate import LinearUpsampler


def _model(conditioned: bool = False) -> GenerativeModel:
    torch.manual_seed(0)
    cfg = {**schema_defaults(), "generator_hidden_dim": 16, "generator_latent_dim": 4,
           "use_conditioned_vae": conditioned}
    gens = {k: VAEGenerator.from_config(cfg, seq_len=4, dim=8, num_classes=3) for k in ("a", "b")}
    return GenerativeModel(
        generator_type="vae", generators=gens, granularity="per_group", class_names=["x", "y", "z"],
        class_to_generator={"x": "a", "y": "a", "z": "b"}, reducer=AdaptiveAvgReducer(length=4),
        reducer_name="adaptive_avg", upsampler=LinearUpsampler(), upsampler_name="linear", full_length=30,
        training_length=4, output_length=30, dim=8,
        normalization={"mean": torch.randn(4, 8), "std": torch.rand(4, 8) + 0.5},
        class_counts={"x": 3, "y": 2, "z": 5}, config=cfg, seed=7, metrics={"train": {"loss": 1.5}})


def _samples(model: GenerativeModel, name: str) -> torch.Tensor:
    return model.sample(5, class_name=name, generator=torch.Generator().manual_seed(11))


def test_round_trip_is_bit_exact_and_keeps_every_fact(tmp_path):
    model = _model(conditioned=True)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    for name in ("x", "y", "z"):
        assert torch.equal(_samples(model, name), _samples(loaded, name))
    assert loaded.class_to_generator == model.class_to_generator
    assert loaded.granularity == "per_group"
    assert (loaded.full_length, loaded.training_length, loaded.output_length, loaded.dim) == (30, 4, 30, 8)
    assert loaded.class_counts == {"x": 3, "y": 2, "z": 5}
    assert loaded.seed == 7 and loaded.metrics == {"train": {"loss": 1.5}}
    assert loaded.config == json.loads(json.dumps(model.config))


def test_the_file_carries_versions_and_config_as_string_metadata(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        names = set(fh.keys())
    assert meta["feda2v_format"] == "model" and meta["format_version"] == "1"
    assert all(isinstance(v, str) for v in meta.values())
    doc = json.loads(meta["model"])
    assert doc["generator_type"]["qualified_name"] == "builtin:vae"
    assert doc["generators"][0]["init_args"]["hidden_dim"] == 16
    assert {"normalization.mean", "normalization.std"} <= names
    assert any(n.startswith("generators.1.") for n in names)


def test_sample_shapes_lengths_and_dtype():
    model = _model()
    assert model.sample(3, class_name="x").shape == (3, 30, 8)
    assert model.sample(3, class_name="x", length=100).shape == (3, 100, 8)
    assert model.sample(2, class_name="z", dtype=torch.float16).dtype == torch.float16
    with pytest.raises(UsageError, match="unknown class"):
        model.sample(1, class_name="nope")


def test_metadata_reads_without_loading_weights(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    meta = read_model_metadata(path)
    assert meta["model"]["class_names"] == ["x", "y", "z"]
    assert meta["tensor_shapes"]["normalization.mean"] == [4, 8]


def test_newer_format_version_is_refused(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = dict(fh.metadata())
    meta["format_version"] = "2"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(NewerVersionError, match="upgrade feda2v-tk"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files_get_one_line_errors(tmp_path, damage):
    path = save_model(_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_dataset_file_is_not_a_model(tmp_path):
    from feda2v_toolkit.data.writer import write_dataset

    path = write_dataset(tmp_path / "d.safetensors", torch.zeros(1, 2, 2), torch.zeros(1))
    with pytest.raises(InputError, match="dataset file, not a model"):
        load_model(path)


def test_a_model_whose_generator_type_is_not_installed_names_the_plugin(tmp_path):
    path = save_model(_model(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        meta = dict(fh.metadata())
    doc = json.loads(meta["model"])
    doc["generator_type"] = {"name": "flowy", "qualified_name": "flow:flowy", "distribution": "feda2v-tk-flow",
                             "version": "9.9"}
    meta["model"] = json.dumps(doc)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match="feda2v-tk-flow"):
        load_model(path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = save_model(_model(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("feda2v_toolkit.runtime.tensorfile._write_sorted", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
