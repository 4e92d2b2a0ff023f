"""Untrusted sizes are bounded before anything is allocated; error messages stay short."""

from __future__ import annotations

import time

import pytest
import torch

from feda2v_toolkit.data.dataset import MAX_UNNAMED_CLASSES
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.errors import InputError
from feda2v_toolkit.model.file import load_model
from feda2v_toolkit.runtime.resources import ENV_MEMORY_LIMIT
from feda2v_toolkit.training.pipeline import train
from tests.hardening.conftest import run_main


def _unnamed(path, labels):
    """A dataset file whose metadata has no class_names."""
    from safetensors.torch import save_file

    labels = torch.tensor(labels, dtype=torch.long)
    save_file({"embeddings": torch.zeros(len(labels), 6, 4), "labels": labels}, str(path),
              metadata={"feda2v_format": "dataset", "format_version": "1"})
    return path


@pytest.mark.parametrize("label", [2**40, 10**6, MAX_UNNAMED_CLASSES])
def test_a_huge_label_without_class_names_is_refused_before_a_class_list_is_built(tmp_path, label):
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"label {label} but no 'class_names'") as info:
        open_dataset(_unnamed(tmp_path / "d.safetensors", [0, label]))
    assert time.perf_counter() - t0 < 2 and len(str(info.value)) < 300


def test_labels_below_the_bound_still_make_up_class_names(tmp_path):
    ds = open_dataset(_unnamed(tmp_path / "d.safetensors", [0, 2]))
    assert ds.class_names == ["class_0", "class_1", "class_2"]


def test_an_error_about_many_classes_lists_a_few_and_says_how_many_more(tmp_path):
    names = [f"c{i}" for i in range(5000)]
    path = write_dataset(tmp_path / "d.safetensors", torch.zeros(2, 6, 4), [0, 1], class_names=names)
    with pytest.raises(InputError, match=r"have no samples") as info:
        train({"generator_training_sequence_length": 2}, path, seed=0)
    assert "(4993 more)" in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("case", ["hidden-dim-huge", "hidden-dim-20000"])
def test_metadata_constructor_arguments_are_checked_against_the_stored_shapes_before_allocating(tampered, case):
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="metadata and weights disagree"):
        load_model(tampered[case])
    assert time.perf_counter() - t0 < 5  # nothing of hidden_dim 10**9 was allocated


def test_generate_refuses_an_output_length_that_cannot_fit_in_memory(tampered, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_MEMORY_LIMIT, str(2**30))
    code, _, err = run_main(["generate", str(tampered["output-length-huge"]), "-o", str(tmp_path / "s")], capsys)
    assert code == 2 and "needs about" in err and "lower --output-length" in err  # the machine is short: 2
    code, _, err = run_main(["generate", str(tampered["output-length-huge"]), "-o", str(tmp_path / "s"),
                             "--output-length", "1000000000"], capsys)
    assert code == 2 and "--output-length" in err and "65536" in err and "internal error" not in err  # bounded
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


@pytest.mark.parametrize("argv", [["-k", "auto"], ["-k", "1000000000000"]], ids=["auto", "given"])
def test_generate_refuses_more_samples_than_the_disk_can_hold_before_writing(model_file, tmp_path, capsys, argv):
    from tests.hardening.conftest import tamper

    huge = tamper(model_file, tmp_path / "huge.safetensors",  # claims 10**15 training clips per class
                  lambda doc: doc.update(class_counts={"a": 10**15, "b": 10**15}))
    t0 = time.perf_counter()
    code, _, err = run_main(["generate", str(huge), "-o", str(tmp_path / "s"), *argv], capsys)
    assert code == 2 and err.startswith(f"feda2v-tk: error: {tmp_path / 's'}: not enough free disk space")
    assert "needs about" in err and "free; lower -k/--samples-per-class" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 5 and [p.name for p in tmp_path.iterdir()] == ["huge.safetensors"]


def test_train_refuses_a_hidden_size_that_cannot_fit_before_building_it(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_MEMORY_LIMIT, str(2**30))
    code, _, err = run_main(["train", "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"),
                             "--generator-type", "vae", "--hidden-dim", "65536", "--training-length", "4",
                             "--seed", "0", "-q"], capsys)
    assert code == 2 and "needs about" in err and "--hidden-dim" in err


def test_labels_that_cannot_fit_in_memory_are_refused_before_they_are_read(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "d.safetensors", torch.zeros(64, 2, 2), torch.zeros(64, dtype=torch.long))
    monkeypatch.setenv(ENV_MEMORY_LIMIT, "512")
    with pytest.raises(InputError, match="reading its 64 labels needs about"):
        open_dataset(path)


@pytest.mark.parametrize("shape", [(4, 8, 0), (4, 0, 3)])
def test_a_dataset_of_empty_sequences_is_one_line_in_every_command_that_reads_it(tmp_path, capsys, shape):
    from safetensors.torch import save_file

    data = tmp_path / "d0.safetensors"
    save_file({"embeddings": torch.zeros(shape, dtype=torch.float16), "labels": torch.tensor([0, 0, 1, 1])},
              str(data), metadata={"feda2v_format": "dataset", "format_version": "1"})
    for argv in (["train", "-d", str(data), "-o", str(tmp_path / "m.safetensors"), "--training-length", "2"],
                 ["plan", "--data", str(data)], ["split", str(data), "-o", str(tmp_path / "nodes"), "--nodes", "2"],
                 ["convert-data", str(data), "-o", str(tmp_path / "cd")], ["analyze", "-d", str(data)]):
        code, _, err = run_main([*argv, "-q"], capsys)
        assert code == 1, argv
        assert err.splitlines() == [f"feda2v-tk: error: {data}: 'embeddings' must be [N, S, D] with sequence length "
                                    f"S >= 1 and width D >= 1, found shape {list(shape)}"], argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.safetensors"]


@pytest.mark.parametrize("hidden", [2**40, int(1e308)], ids=["2**40", "1e308"])
def test_train_memory_check_refuses_sizes_that_overflow_instead_of_building_for_real(hidden):
    """Sizes past 64-bit integers fail even on the meta device: refused, never a fall-through to a real build."""
    from types import SimpleNamespace

    from feda2v_toolkit.config import schema_defaults
    from feda2v_toolkit.generators.vae import VAEGenerator
    from feda2v_toolkit.training.pipeline import _require_training_memory
    from feda2v_toolkit.training.stages import DataSummary

    config = {**schema_defaults(), "generator_hidden_dim": hidden, "generator_latent_dim": hidden}
    spec = SimpleNamespace(config=config, training_length=4, generator_type="vae")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="sizes overflow 64-bit integers") as info:
        _require_training_memory(VAEGenerator, spec, DataSummary({"a": 2}, seq_len=8, dim=16), 1)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(info.value)


@pytest.mark.parametrize(("config", "key"), [
    ({"generator_type": "vae", "generator_hidden_dim": 1e308}, "generator_hidden_dim"),
    ({"generator_type": "vae", "generator_hidden_dim": 2**31, "generator_latent_dim": 2**31}, "generator_hidden_dim"),
    ({"generator_training_sequence_length": 10**9}, "generator_training_sequence_length"),
    ({"generator_batch_size": 2**40}, "generator_batch_size"),
    ({"synthetic_samples_per_class": 10**15}, "synthetic_samples_per_class"),
])
def test_absurd_sizes_in_a_config_fail_validate_and_train_one_line_per_problem(tiny_data, tmp_path, capsys, config,
                                                                              key):
    import json

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"feda2v": config}))
    code, out, _ = run_main(["validate", str(path), "-q"], capsys)
    assert code == 1
    code, _, err = run_main(["train", "-c", str(path), "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"),
                             "--epochs", "1", "--seed", "0", "-q"], capsys)
    assert code == 1 and err.startswith(f"feda2v-tk: error: {path}: invalid generator config") and key in err
    problems = len([k for k in config if k != "generator_type"])
    assert len(err.splitlines()) == (1 if problems == 1 else 1 + problems), err  # one line per problem
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("argv", [
    ["plan", "--lengths", "1000000000", "--dim", "1000000000", "--full-length", "1000000000"],
    ["plan", "--lengths", "1000000000"],
    ["plan", "--lengths", ",".join(map(str, range(1, 10_001)))],
    ["plan", "--num-samples", "1000000000000000", "--num-classes", "1000000000"],
    ["plan", "--num-classes", "1000000000"],
    ["train", "-d", "DATA", "-o", "OUT", "--hidden-dim", "1000000000"],
    ["train", "-d", "DATA", "-o", "OUT", "--epochs", "1000000000"],
    ["split", "DATA", "-o", "OUT", "--nodes", "1000000000"],
    ["split", "DATA", "-o", "OUT", "--nodes", "2", "--by", "dirichlet", "--alpha", "1e308"],
])
def test_absurd_sizes_on_the_command_line_are_usage_errors_before_any_work(tiny_data, tmp_path, capsys, argv):
    argv = [str(tiny_data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    t0 = time.perf_counter()
    code, _, err = run_main([*argv, "-q"], capsys)
    assert code == 2 and "internal error" not in err and time.perf_counter() - t0 < 10, err
    assert not (tmp_path / "out").exists()


def test_demo_data_refuses_sizes_the_machine_cannot_hold_or_write_before_any_work(tmp_path, capsys, monkeypatch):
    """Widths and lengths are bounded like every option that sizes a sequence; what still does not fit the
    memory (a file written whole, or the structure and a chunk of a streamed directory) or the disk is refused
    in one line, exit 2, with nothing written."""
    code, _, err = run_main(["demo-data", str(tmp_path / "d.safetensors"), "--dim", "70000"], capsys)
    assert code == 2 and "--dim" in err and "65536" in err
    monkeypatch.setenv(ENV_MEMORY_LIMIT, str(10**8))
    for out in ("d.safetensors", "shards"):
        code, _, err = run_main(["demo-data", str(tmp_path / out), "--dim", "4096", "--full-length", "4096", "-q"],
                                capsys)
        assert code == 2 and "needs about" in err and "of memory" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv(ENV_MEMORY_LIMIT)
    code, _, err = run_main(["demo-data", str(tmp_path / "shards"), "--dim", "65536", "--full-length", "65536",
                             "--per-class", "1000000", "-q"], capsys)
    assert code == 2 and "not enough free disk space" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
