"""No silent garbage: what does not match is refused with one line, never completed or dropped quietly --
AST model directories whose weights do not match their config, cache classes without their manifest,
classes none of whose clips could be read, and configs shown with an upsampler they do not use."""

from __future__ import annotations

import json
import shutil

import pytest

from feda2v_toolkit.errors import InputError, UsageError
from tests.data.test_original_caches import write_ast_cache
from tests.hardening.conftest import run_main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    from tests.audio_fakes import save_tiny_ast

    return save_tiny_ast(tmp_path_factory.mktemp("ast") / "base")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from tests.audio_fakes import make_class_folders

    return make_class_folders(tmp_path_factory.mktemp("audio") / "clips")


def _variant(tiny_ast, tmp_path, name, config=None, weights=None):
    """A copy of the tiny AST with ``config.json`` keys changed and/or its weights edited."""
    from safetensors.torch import load_file

    d = tmp_path / name
    shutil.copytree(tiny_ast, d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    if weights:
        state = load_file(d / "model.safetensors")
        weights(state, d)
    return d


def _drop_one(state, d):
    from safetensors.torch import save_file

    del state[sorted(state)[5]]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(state, d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _pickled_bin(state, d):
    import pickle

    (d / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Payload()}, fh)


BROKEN = {
    "missing-tensor": ({}, _drop_one, "the weights do not match config.json"),
    "extra-layer-in-config": ({"num_hidden_layers": 2}, None, "the weights do not match config.json"),
    "truncated-weights": ({}, _truncate, "truncated or corrupt"),
    "zero-heads": ({"num_attention_heads": 0}, None, "num_attention_heads is 0"),
    "zero-stride": ({"frequency_stride": 0}, None, "frequency_stride is 0"),
    "hidden-size-1e6": ({"hidden_size": 1000000}, None, "hidden_size is 1000000"),
    "heads-do-not-divide": ({"num_attention_heads": 3}, None, "not a multiple of num_attention_heads"),
    "pickled-weights": ({}, _pickled_bin, "weights_only=True"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_model_directory_that_does_not_match_its_config_is_refused_in_one_line(case, tiny_ast, clips, tmp_path,
                                                                                 capsys):
    config, weights, needle = BROKEN[case]
    model = _variant(tiny_ast, tmp_path, case, config, weights)
    capsys.readouterr()
    code, out, err = run_main(["embed", str(clips), "-o", str(tmp_path / "out"), "--model", str(model),
                               "--clip-seconds", "1", "--device", "cpu"], capsys)
    assert code in (1, 2) and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err and "must never run" not in out + err
    assert not (tmp_path / "out").exists()


def test_a_classification_checkpoint_still_loads_its_encoder(tmp_path):
    """The only extra weights allowed: an ASTForAudioClassification head (the hub checkpoints FedA2V uses)."""
    from transformers import ASTConfig, ASTForAudioClassification

    from feda2v_toolkit.audio.ast_model import load_ast
    from tests.audio_fakes import TINY_AST, save_tiny_ast

    save_tiny_ast(tmp_path / "clf")  # its feature extractor and config
    ASTForAudioClassification(ASTConfig(**TINY_AST, num_labels=3)).save_pretrained(tmp_path / "clf")
    _, model = load_ast(str(tmp_path / "clf"))
    assert type(model).__name__ == "ASTModel"


def test_loading_info_that_reports_random_weights_is_refused():
    from feda2v_toolkit.audio.ast_model import check_loading_info

    check_loading_info({"missing_keys": set(), "unexpected_keys": {"classifier.dense.bias"}}, "m")
    with pytest.raises(InputError, match="missing"):
        check_loading_info({"missing_keys": {"layers.1.mlp.fc1.weight"}, "unexpected_keys": set()}, "m")
    with pytest.raises(InputError, match="unexpected"):
        check_loading_info({"missing_keys": set(), "unexpected_keys": {"encoder.layer.9.x"}}, "m")


def test_a_cache_class_without_its_manifest_is_an_error_not_dropped(tmp_path, capsys):
    write_ast_cache(tmp_path / "cache", {"dog": [3], "cat": [2], "bird": [2]})
    (tmp_path / "cache" / "cat" / "manifest.json").unlink()
    from feda2v_toolkit.data.open import open_dataset

    with pytest.raises(InputError, match=r"cat: class directory of the AST cache .* has no manifest.json"):
        open_dataset(tmp_path / "cache")
    (tmp_path / "cache" / "cat" / "manifest.json").mkdir()  # not a regular file
    code, _, err = run_main(["convert-data", str(tmp_path / "cache"), "-o", str(tmp_path / "out")], capsys)
    assert code in (1, 2) and "manifest" in err and "cat" in err and not (tmp_path / "out").exists()


def test_embed_leaves_out_a_class_none_of_whose_clips_could_be_read(tiny_ast, tmp_path, capsys):
    from tests.audio_fakes import make_class_folders

    clips = make_class_folders(tmp_path / "clips")
    (tmp_path / "clips" / "broken").mkdir()
    (tmp_path / "clips" / "broken" / "a.wav").write_bytes(b"RIFF not audio")
    code, out, err = run_main(["embed", str(clips), "-o", str(tmp_path / "ds"), "--model", str(tiny_ast),
                               "--clip-seconds", "1", "--device", "cpu", "--batch-size", "2", "--json"], capsys)
    assert code == 0, err
    assert "left out class 'broken': none of its clips could be read" in err
    assert json.loads(out)["dropped_classes"] == ["broken"]
    from feda2v_toolkit.data.open import open_dataset

    ds = open_dataset(tmp_path / "ds")
    assert ds.class_names == ["bird", "engine"] and ds.class_counts() == {"bird": 3, "engine": 3}
    code, _, err = run_main(["train", "-d", str(tmp_path / "ds"), "-o", str(tmp_path / "m.safetensors"), "-q",
                             "--training-length", "2", "--seed", "0"], capsys)
    assert code == 0, err  # the class that had no clips no longer stops train


def test_load_config_shows_the_upsampler_the_model_uses():
    from feda2v_toolkit.config import load_config

    cfg = load_config({"use_learned_upsampling": True})
    assert cfg["generator_upsampler"] == "learned" and cfg["use_learned_upsampling"] is True
    cfg = load_config({"generator_upsampler": "learned"})
    assert cfg["use_learned_upsampling"] is True
    cfg = load_config({})
    assert cfg["generator_upsampler"] == "lstsq" and cfg["use_learned_upsampling"] is False


def test_a_path_that_is_not_a_model_directory_is_not_sent_to_the_hub(tmp_path):
    from feda2v_toolkit.audio.embed import ASTEmbedder

    with pytest.raises(UsageError, match="no such directory"):
        ASTEmbedder(str(tmp_path / "models" / "nope"), device="cpu")
