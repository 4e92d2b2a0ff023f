"""`feda2v-tk embed` and `feda2v-tk convert-data` on the command line: reports, resume, one-line errors."""

from __future__ import annotations

import json

import pytest
from audio_fakes import TINY_TOKENS, make_class_folders, save_tiny_ast

pytest.importorskip("transformers")

from feda2v_toolkit.cli import main  # noqa: E402
from feda2v_toolkit.data.open import open_dataset  # noqa: E402


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    return save_tiny_ast(tmp_path_factory.mktemp("ast"))


def test_embed_a_folder_into_a_dataset(tiny_ast, tmp_path, capsys):
    clips = make_class_folders(tmp_path / "clips")
    args = ["embed", str(clips), "-o", str(tmp_path / "ds"), "--model", str(tiny_ast), "--clip-seconds", "1",
            "--device", "cpu", "--batch-size", "2", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["rows"] == 6 and report["skipped"] == [] and report["settings"]["tokens"] == TINY_TOKENS
    assert f"wrote 6 of 6 clips [{TINY_TOKENS}, 64] float16" in err
    assert open_dataset(tmp_path / "ds").class_names == ["bird", "engine"]
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.strip().endswith("is not empty; choose another path, or pass --overwrite to replace its "
                                              "dataset shards")


def test_an_unreadable_file_is_one_line_and_names_the_file(tiny_ast, tmp_path, capsys):
    clips = make_class_folders(tmp_path / "clips")
    (clips / "bird" / "zz.wav").write_bytes(b"garbage")
    base = ["embed", str(clips), "--model", str(tiny_ast), "--clip-seconds", "1", "--device", "cpu"]
    code, _, err = cli(capsys, *base, "-o", str(tmp_path / "a"), "--on-error", "fail")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"feda2v-tk: error: {clips / 'bird' / 'zz.wav'}: unreadable: ")
    code, _, err = cli(capsys, *base, "-o", str(tmp_path / "b"))
    assert code == 0
    assert f"skipped {clips / 'bird' / 'zz.wav'}: unreadable" in err and "wrote 6 of 7 clips" in err


def test_embed_without_the_audio_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    code, _, err = cli(capsys, "embed", str(tmp_path), "-o", str(tmp_path / "out"))
    assert code == 2
    assert err.strip() == ('feda2v-tk: error: embedding audio needs transformers, which is not installed; '
                           'run: pip install "feda2v-tk[audio]"  (transformers, soundfile, soxr)')


def test_a_missing_model_is_one_line(tmp_path, capsys):
    make_class_folders(tmp_path / "clips")
    code, _, err = cli(capsys, "embed", str(tmp_path / "clips"), "-o", str(tmp_path / "out"), "--model",
                       str(tmp_path / "nope"), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot load an AST model" in err


def test_convert_data_from_an_original_cache(tmp_path, capsys):
    import torch

    torch.save({"embeddings": {f"v{i}:{c}": torch.randn(6, 4) for i, c in enumerate("abab")}}, tmp_path / "c.pt")
    code, out, err = cli(capsys, "convert-data", str(tmp_path / "c.pt"), "-o", str(tmp_path / "ds"), "--json")
    assert code == 0, err
    assert json.loads(out)["clips"] == 4 and "wrote 4 clips [6, 4] float32, 2 classes" in err
    assert open_dataset(tmp_path / "ds").class_names == ["a", "b"]


def test_the_cli_default_model_is_the_library_default():
    from feda2v_toolkit.audio.embed import DEFAULT_MODEL
    from feda2v_toolkit.commands.embed import DEFAULT_MODEL as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_MODEL == "MIT/ast-finetuned-audioset-10-10-0.4593"


def test_shard_size_sets_the_shards_each_rank_embeds_whole(tiny_ast, tmp_path, capsys, monkeypatch):
    """--shard-size (MiB, like generate's) reaches embed(): under torchrun each rank embeds whole shards, so a few
    clips need small shards to keep every rank busy."""
    import feda2v_toolkit.audio.embed as embed_module
    from feda2v_toolkit.errors import InputError

    seen = {}

    def fake_embed(source, out, **kwargs):
        seen.update(kwargs)
        raise InputError("stopped by the test")

    monkeypatch.setattr(embed_module, "embed", fake_embed)
    clips = make_class_folders(tmp_path / "clips")
    base = ["embed", str(clips), "-o", str(tmp_path / "ds"), "--model", str(tiny_ast), "--device", "cpu"]
    code, _, err = cli(capsys, *base, "--shard-size", "3")
    assert code == 1 and "stopped by the test" in err and seen["shard_bytes"] == 3 * 2**20
    code, _, _ = cli(capsys, *base)
    assert code == 1 and seen["shard_bytes"] == 256 * 2**20  # the writer's default shard size
    code, _, err = cli(capsys, *base, "--shard-size", "0")
    assert code == 2 and "--shard-size" in err
