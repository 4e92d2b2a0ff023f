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


def _tampered(folder, edit):
    """A model file whose metadata document ``edit`` changed (the weights kept)."""
    from tests.hardening.conftest import tamper

    folder.mkdir(exist_ok=True)
    return tamper(save_model(_model(), folder / "m.safetensors"), folder / "tampered.safetensors", edit)


def _overflowing_hidden_dim(doc):
    # hidden_dim * hidden_dim elements overflow the storage size even on the meta device
    doc["generators"][0]["init_args"].update(hidden_dim=1_600_000_000, seq_len=1, dim=1, latent_dim=1,
                                             cond_embed_dim=1)


def test_a_component_that_cannot_be_built_on_the_meta_device_is_refused_and_never_built_for_real(tmp_path,
                                                                                                 monkeypatch):
    path = _tampered(tmp_path, _overflowing_hidden_dim)
    devices = []
    init = VAEGenerator.__init__

    def meta_only(self, **kwargs):
        devices.append(torch.empty(()).device.type)
        if devices[-1] != "meta":  # the real build would allocate 2 x 6.4 GB
            raise AssertionError("built for real from unchecked metadata")
        init(self, **kwargs)

    monkeypatch.setattr(VAEGenerator, "__init__", meta_only)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: inconsistent model file: generator 'a' cannot be built from its "
                                      "metadata (RuntimeError: Storage size calculation overflowed")
    assert "\n" not in str(info.value) and devices == ["meta"]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("training_length", 5, "generator 'a' has seq_len 4, but the metadata says training_length 5"),
    ("dim", 9, "generator 'a' has dim 8, but the metadata says dim 9"),
])
def test_the_documents_lengths_must_be_those_of_the_stored_generators(tmp_path, key, value, needle):
    path = _tampered(tmp_path, lambda doc: doc.update({key: value}))
    with pytest.raises(InputError, match=f"inconsistent model file: {needle}"):
        load_model(path)


def test_tensors_a_component_would_build_beyond_the_stored_ones_must_fit_in_memory(tmp_path, monkeypatch):
    from torch import nn

    from feda2v_toolkit.model.file import _probe
    from feda2v_toolkit.runtime.resources import ENV_MEMORY_LIMIT

    class Scratch(nn.Module):  # a plugin component with a non-persistent buffer sized by its arguments
        def __init__(self, size: int) -> None:
            super().__init__()
            self.register_buffer("scratch", torch.zeros(size), persistent=False)

    path = save_model(_model(), tmp_path / "m.safetensors")
    monkeypatch.setenv(ENV_MEMORY_LIMIT, "64")
    load_model(path)  # the stored tensors themselves are not counted
    monkeypatch.setenv(ENV_MEMORY_LIMIT, str(2**20))
    assert _probe(Scratch, {"size": 1000}, {}, "upsampler", tmp_path / "m.safetensors") is not None
    with pytest.raises(InputError, match=r"upsampler would build 4\.0 TiB of tensors the file does not hold, "
                                         r"more than the 1\.0 MiB of memory available"):
        _probe(Scratch, {"size": 2**40}, {}, "upsampler", tmp_path / "m.safetensors")


def test_inspect_checks_the_metadata_against_the_stored_shapes_without_reading_weights(tmp_path, monkeypatch,
                                                                                      capsys):
    from tests.hardening.conftest import run_main

    good = save_model(_model(), tmp_path / "good.safetensors")
    overflowing = _tampered(tmp_path / "a", _overflowing_hidden_dim)
    wide = _tampered(tmp_path / "b", lambda doc: doc["generators"][1]["init_args"].update(hidden_dim=20000))
    monkeypatch.setattr("safetensors.safe_open.get_tensor", None, raising=False)  # no weight is read
    assert run_main(["inspect", str(good), "-q"], capsys)[0] == 0
    code, _, err = run_main(["inspect", str(overflowing)], capsys)
    assert code == 1 and err.startswith(f"feda2v-tk: error: {overflowing}: inconsistent model file: generator 'a'")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(["inspect", str(wide), "--json"], capsys)
    assert code == 1 and "generator 'b': metadata and weights disagree" in err


def _set_config(key, value):
    return lambda doc: doc["config"].update({key: value})


TAMPERED_FIELDS = {
    "no-class-mapped": (lambda doc: doc.update(class_to_generator={}),
                        "'class_to_generator' is empty: the model has no generator for any class"),
    "unknown-class-mapped": (lambda doc: doc["class_to_generator"].update(w="a"),
                             "'class_to_generator' maps class(es) w, which 'class_names' does not list"),
    "count-a-string": (lambda doc: doc["class_counts"].update(y="x"),
                       "'class_counts' must hold a non-negative integer per class, found 'x' for 'y'"),
    "count-negative": (lambda doc: doc["class_counts"].update(x=-5),
                       "'class_counts' must hold a non-negative integer per class, found -5 for 'x'"),
    "count-a-float": (lambda doc: doc["class_counts"].update(z=2.7),
                      "'class_counts' must hold a non-negative integer per class, found 2.7 for 'z'"),
    "count-a-boolean": (lambda doc: doc["class_counts"].update(z=True),
                        "'class_counts' must hold a non-negative integer per class, found True for 'z'"),
    "samples-per-class-a-list": (_set_config("synthetic_samples_per_class", [1]),
                                 "config 'synthetic_samples_per_class': expected integer in [1, 1000000] or \"auto\", "
                                 "found [1] (array)"),
    "validation-split-2": (_set_config("generator_validation_split", 2),
                           "config 'generator_validation_split': expected number in [0, 1), found 2 (integer)"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_FIELDS))
def test_fields_that_using_a_model_reads_are_checked_when_the_file_is_read(tmp_path, case):
    edit, needle = TAMPERED_FIELDS[case]
    path = _tampered(tmp_path, edit)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: malformed model metadata: {needle}")


def test_every_command_refuses_such_a_file_in_one_line_naming_it(tmp_path, capsys):
    from feda2v_toolkit.data.writer import write_dataset
    from tests.hardening.conftest import run_main

    data = write_dataset(tmp_path / "d.safetensors", torch.randn(6, 30, 8), [0, 1, 2] * 2, class_names=["x", "y", "z"])
    for case, (edit, needle) in TAMPERED_FIELDS.items():
        path = _tampered(tmp_path / case, edit)
        for argv in (["generate", str(path), "-o", str(tmp_path / "out"), "-k", "auto"],
                     ["generate", str(path), "-o", str(tmp_path / "out")],
                     ["evaluate", str(path), "-d", str(data), "-q"], ["inspect", str(path)]):
            code, _, err = run_main(argv, capsys)
            assert code == 1 and err == f"feda2v-tk: error: {path}: malformed model metadata: {needle}\n", (argv, err)
    assert not (tmp_path / "out").exists()


def test_schema_defaults_still_apply_to_a_config_that_leaves_those_keys_out_or_null(tmp_path):
    path = _tampered(tmp_path, lambda doc: doc["config"].update(synthetic_samples_per_class=None,
                                                                  generator_validation_split=None))
    assert load_model(path).setting("synthetic_samples_per_class") == 10


def test_a_missing_path_and_a_symbolic_link_loop_are_told_apart(tmp_path):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    with pytest.raises(UsageError, match="symbolic link loop"):
        read_model_metadata(tmp_path / "a.safetensors")
    with pytest.raises(UsageError, match="no such file"):
        read_model_metadata(tmp_path / "nothere.safetensors")
