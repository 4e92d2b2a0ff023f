"""Only regular files are read as configs and datasets: devices, FIFOs, unbounded stdin and symlink
loops are refused with one line (never read until memory runs out, never a hang)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from feda2v_toolkit.config.document import MAX_CONFIG_BYTES
from tests.hardening.conftest import run_main
from tests.plugin_fakes import run_cli


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_config_is_refused(device, capsys):
    code, out, _ = run_main(["validate", device], capsys)
    assert code == 2 and "not a regular file" in out
    code, _, err = run_main(["train", "-c", device, "-d", device, "-o", "/nonexistent/m.safetensors"], capsys)
    assert code in (1, 2) and "not a regular file" in err and "internal error" not in err


def test_a_fifo_as_config_or_data_is_refused_without_blocking(fifo, tmp_path):
    # in a subprocess with a timeout: a regression would hang here, not fail
    for args in (["validate", str(fifo)], ["migrate", str(fifo)],
                 ["train", "-c", str(fifo), "-d", str(tmp_path), "-o", str(tmp_path / "m.safetensors")],
                 ["train", "-d", str(fifo), "-o", str(tmp_path / "m.safetensors")],
                 ["plan", "--data", str(fifo)]):
        result = run_cli(*args, timeout=60)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "not a regular file" in result.stdout + result.stderr, args
        assert "internal error" not in result.stderr


def test_a_shard_directory_with_a_fifo_or_dangling_link_is_refused_with_exit_2_not_read_in_part(tmp_path):
    from feda2v_toolkit.data.writer import write_dataset

    shards = tmp_path / "shards"
    shards.mkdir()
    write_dataset(shards / "a.safetensors", torch.zeros(4, 8, 3), torch.tensor([0, 1, 0, 1]))
    (shards / "b.safetensors").symlink_to("/nonexistent/b.safetensors")
    os.mkfifo(shards / "c.safetensors")
    for args in (["train", "-d", str(shards), "-o", str(tmp_path / "m.safetensors")], ["plan", "--data", str(shards)],
                 ["split", str(shards), "-o", str(tmp_path / "nodes"), "--nodes", "2"]):
        result = run_cli(*args, timeout=60)  # a subprocess: a regression that reads the FIFO would hang
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"feda2v-tk: error: {shards / 'b.safetensors'}: no such file or directory "
            "(a symbolic link to a missing file)"], args
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "nodes").exists()


def test_standard_input_is_read_bounded():
    code = ("import sys; from feda2v_toolkit.cli import main; main(['validate', '-'])")
    proc = subprocess.run([sys.executable, "-c", code], input=b" " * (MAX_CONFIG_BYTES + 10), capture_output=True,
                          timeout=60)
    assert proc.returncode == 1 and b"file-too-large" in proc.stdout


def test_a_symlink_loop_is_a_one_line_error(symlink_loop, tmp_path, capsys):
    for argv in (["train", "-d", str(symlink_loop), "-o", str(tmp_path / "m.safetensors")],
                 ["analyze", "-d", str(symlink_loop)],
                 ["plan", "-d", str(symlink_loop)],
                 ["validate", str(symlink_loop)]):
        code, out, err = run_main(argv, capsys)
        assert code == 2, argv
        assert "internal error" not in err and ("loop" in err + out or "Too many levels" in err + out), argv


@pytest.fixture
def audio_world(tmp_path):
    """A tiny AST, a good clip and a FIFO posing as a clip, under one audio root."""
    pytest.importorskip("transformers")
    from tests.audio_fakes import save_tiny_ast, tone, write_audio

    ast = save_tiny_ast(tmp_path / "ast")
    root = tmp_path / "audio"
    write_audio(root / "good.wav", tone(440, 1.0, 16000), 16000)
    os.mkfifo(root / "fifo.wav")
    return ast, root


def test_a_fifo_listed_in_a_manifest_is_skipped_without_blocking(audio_world, tmp_path):
    ast, root = audio_world
    manifest = root / "m.csv"
    manifest.write_text("path,label\ngood.wav,a\nfifo.wav,b\n")
    # a subprocess with a timeout: a regression would hang here (and ignore SIGTERM), not fail
    result = run_cli("embed", str(manifest), "-o", str(tmp_path / "out"), "--model", str(ast), "--clip-seconds", "1",
                     "--device", "cpu", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"skipped {root / 'fifo.wav'}: not a regular file" in result.stderr
    assert "internal error" not in result.stderr


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_manifest_that_is_a_device_or_a_fifo_is_refused_at_once(target, tmp_path):
    manifest = tmp_path / "m.csv"
    if target == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(target)
    result = run_cli("embed", str(manifest), "-o", str(tmp_path / "out"), timeout=60)
    assert result.returncode == 2 and "the manifest is not a regular file" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_manifest_is_read_bounded(tmp_path, monkeypatch):
    from feda2v_toolkit.audio import sources
    from feda2v_toolkit.errors import InputError

    monkeypatch.setattr(sources, "MAX_MANIFEST_BYTES", 64)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "a.wav,x\n" * 20)
    with pytest.raises(InputError, match="larger than the 64 bytes read"):
        sources.open_source(manifest)


def test_a_cache_manifest_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from tests.data.test_original_caches import write_ast_cache

    write_ast_cache(tmp_path / "cache", {"dog": [2]})
    (tmp_path / "cache" / "dog" / "manifest.json").unlink()
    os.mkfifo(tmp_path / "cache" / "dog" / "manifest.json")
    result = run_cli("plan", "-d", str(tmp_path / "cache"), timeout=60)
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr
