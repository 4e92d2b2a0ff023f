"""One overwrite rule for every command and the Python API (``runtime.atomic.check_output``): an output is
never, contains no, and lies inside no input; an existing output is replaced only with --overwrite
(``overwrite=True`` in Python), only by what the command itself wrote, and a directory only when it holds
nothing but dataset shards -- nothing the command did not write is ever deleted."""

from __future__ import annotations

import os

import pytest
import torch

from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.atomic import check_output, replace_directory
from tests.hardening.conftest import run_main


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def data_dir(tmp_path):
    """``p/s.safetensors`` next to a file of the user's, ``p/notes.txt``."""
    p = tmp_path / "p"
    write_dataset(p / "s.safetensors", torch.zeros(4, 6, 4), torch.tensor([0, 1, 0, 1]), class_names=["a", "b"])
    (p / "notes.txt").write_text("mine")
    return p


def test_convert_data_never_deletes_its_input_or_files_it_did_not_write(data_dir, tmp_path, capsys):
    before = {p: p.read_bytes() for p in data_dir.iterdir()}
    for out in (data_dir, tmp_path):  # the output is the input's directory, or holds it
        code, _, err = run_main(["convert-data", str(data_dir / "s.safetensors"), "-o", str(out), "--overwrite"],
                                capsys)
        assert code == 2 and "contains the source dataset" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["convert-data", str(data_dir), "-o", str(data_dir / "sub"), "--overwrite"], capsys)
    assert code == 2 and "is inside the source dataset" in err
    assert {p: p.read_bytes() for p in data_dir.iterdir()} == before
    # an output directory holding anything but dataset shards is never replaced, with or without --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _, err = run_main(["convert-data", str(data_dir / "s.safetensors"), "-o", str(other), "--overwrite"],
                            capsys)
    assert code == 2 and "not dataset shards (keep.txt)" in err and (other / "keep.txt").read_text() == "mine"


def test_aliases_of_the_input_are_the_input(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(data_dir)
    for out in ("./p", "link", "p/../p"):
        code, _, err = run_main(["convert-data", "p/s.safetensors", "-o", out, "--overwrite"], capsys)
        assert code == 2 and "contains the source dataset" in err, out
    assert (data_dir / "s.safetensors").exists() and (data_dir / "notes.txt").exists()


def test_every_writing_command_refuses_an_existing_output_without_overwrite(data_dir, model_file, tmp_path, capsys):
    data = str(data_dir / "s.safetensors")
    legacy = tmp_path / "old.json"
    legacy.write_text('{"feda2v": {"generator_target_sequence_length": 1214}}')
    outputs = {
        "demo-data": (["demo-data", "{out}", "--per-class", "1", "--full-length", "6", "--dim", "4", "-q"], "d.safetensors"),
        "demo-data shards": (["demo-data", "{out}", "--per-class", "1", "--full-length", "6", "--dim", "4", "-q"], "dd"),
        "legacy config": (["demo-data", "--legacy-config", "{out}", "-q"], "legacy.json"),
        "convert-data": (["convert-data", data, "-o", "{out}", "-q"], "conv"),
        "generate": (["generate", str(model_file), "-o", "{out}", "-k", "2", "-q"], "gen"),
        "split": (["split", data, "-o", "{out}", "--nodes", "2", "-q"], "nodes"),
        "migrate -o": (["migrate", str(legacy), "-o", "{out}", "-q"], "new.json"),
        "schema -o": (["schema", "-o", "{out}", "-q"], "schema.json"),
    }
    for name, (argv, out) in outputs.items():
        argv = [a.replace("{out}", str(tmp_path / out)) for a in argv]
        assert run_main(argv, capsys)[0] == 0, name
        first = _tree(tmp_path)
        code, _, err = run_main(argv, capsys)
        assert code == 2 and "--overwrite" in err and "overwrite=True" not in err, (name, err)
        assert _tree(tmp_path) == first, name
        code, _, err = run_main([*argv, "--overwrite"], capsys)
        assert code == 0, (name, err)
        assert _tree(tmp_path) == first, name  # replaced in place, nothing else left


def test_convert_replaces_an_existing_model_only_with_overwrite(tmp_path, capsys):
    from tests.model.test_original_checkpoints import (  # the original code's checkpoint layout
        FULL,
        D,
        orig,
        save_unified,
    )

    ckpt = save_unified(tmp_path / "ckpt.pt", orig(0), selected_classes=["dog", "cat"])
    args = ["--dim", str(D), "--full-length", str(FULL), "-q"]
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"an older model")
    code, _, err = run_main(["convert", str(ckpt), "-o", str(out), *args], capsys)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"an older model"
    code, _, err = run_main(["convert", str(ckpt), "-o", str(out), *args, "--overwrite"], capsys)
    assert code == 0, err
    code, _, err = run_main(["convert", str(ckpt), "-o", str(ckpt), *args, "--overwrite"], capsys)
    assert code == 2 and "is also an input checkpoint" in err


def test_the_python_api_follows_the_same_rule_and_speaks_python(model_file, tmp_path):
    import feda2v_toolkit as ftk

    model = ftk.load_model(model_file)
    ftk.generate(model, tmp_path / "syn", samples=2)
    with pytest.raises(UsageError) as info:
        ftk.generate(model, tmp_path / "syn", samples=2)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
    ftk.generate(model, tmp_path / "syn", samples=3, overwrite=True)
    assert len(ftk.open_dataset(tmp_path / "syn")) == 6
    (tmp_path / "syn" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not dataset shards"):
        ftk.generate(model, tmp_path / "syn", samples=2, overwrite=True)
    assert (tmp_path / "syn" / "notes.txt").read_text() == "mine"


def test_check_output_is_the_one_rule(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="contains the input"):
        check_output(tmp_path, inputs=[tmp_path / "in" / "x.safetensors"])
    with pytest.raises(UsageError, match="is inside the input"):
        check_output(tmp_path / "in" / "out", inputs=[tmp_path / "in"], directory=True)
    with pytest.raises(UsageError, match="is also an input"):
        check_output(tmp_path / "in" / "x.safetensors", inputs=[tmp_path / "in" / "x.safetensors"], overwrite=True)
    with pytest.raises(UsageError, match="is a directory"):
        check_output(tmp_path / "in", overwrite=True)
    with pytest.raises(UsageError, match="not a directory"):
        check_output(tmp_path / "in" / "x.safetensors", overwrite=True, directory=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        check_output(fifo, overwrite=True)
    assert check_output(tmp_path / "new" / "deeper" / "f.json") == tmp_path / "new" / "deeper" / "f.json"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_replace_directory_deletes_only_the_old_shards(tmp_path):
    out = tmp_path / "out"
    write_dataset(out / "part-00000.safetensors", torch.zeros(1, 2, 2), torch.zeros(1))
    staging = tmp_path / ".out.new"
    write_dataset(staging / "part-00000.safetensors", torch.ones(1, 2, 2), torch.zeros(1))
    check_output(out, overwrite=True, directory=True)
    (out / "appeared-later.txt").write_text("mine")  # after the check, before the replacement
    with pytest.raises(UsageError, match="not dataset shards"):
        replace_directory(staging, out)
    (out / "appeared-later.txt").unlink()
    replace_directory(staging, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_embed_never_deletes_the_audio_it_reads(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.audio_fakes import make_class_folders, save_tiny_ast

    ast = save_tiny_ast(tmp_path / "ast")
    clips = make_class_folders(tmp_path / "clips")
    capsys.readouterr()  # transformers' own progress bars while saving the tiny model
    before = _tree(clips)
    base = ["--model", str(ast), "--clip-seconds", "1", "--device", "cpu", "-q", "--overwrite"]
    for out in (clips, tmp_path, clips / "bird" / "emb"):  # the source, a directory holding it, inside it
        code, _, err = run_main(["embed", str(clips), "-o", str(out), *base], capsys)
        assert code == 2 and "audio source" in err and len(err.strip().splitlines()) == 1, (out, err)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nbird/a.wav,bird\nengine/a.flac,engine\n")
    code, _, err = run_main(["embed", str(manifest), "--audio-root", str(clips), "-o", str(clips / "engine"), *base],
                            capsys)
    assert code == 2 and "contains the audio source" in err
    assert _tree(clips) == before


@pytest.mark.parametrize("command", ["train", "federate"])
@pytest.mark.parametrize("flag", ["-o", "--metrics"])
def test_a_training_run_never_writes_over_the_config_file_it_reads(data_dir, tmp_path, capsys, command, flag):
    """The config is an input like the data: the model or metrics file may not be it (nor hold it), even with
    --overwrite; the refusal comes before any work and leaves the config as it was."""
    config = tmp_path / "config.json"
    config.write_text('{"feda2v": {"generator_type": "gaussian", "generator_training_sequence_length": 2}}')
    before = config.read_bytes()
    data = str(data_dir / "s.safetensors")
    source = ["train", "-d", data] if command == "train" else ["federate", "--node", data]
    outputs = {"-o": str(tmp_path / "m.safetensors"), "--metrics": str(tmp_path / "m.jsonl")}
    outputs[flag] = str(config)
    argv = [*source, "-c", str(config), "-o", outputs["-o"], "--metrics", outputs["--metrics"], "--seed", "0", "-q",
            "--overwrite"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "is also a config file" in err and len(err.strip().splitlines()) == 1, err
    assert config.read_bytes() == before and not (tmp_path / "m.safetensors").exists()
