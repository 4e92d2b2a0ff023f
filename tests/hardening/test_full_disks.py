"""A full disk is a handled error in every writing command: exit 2, one line naming the path, nothing left.

The commands write into a small tmpfs filled to the last byte (mounted here when the tests run as root
with mount rights); elsewhere ENOSPC is simulated in the lowest write functions (the byte-reproducible
safetensors writer and the fsync of every atomic write).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
import torch

from feda2v_toolkit.data.writer import write_dataset
from tests.hardening.conftest import run_main


def _fill(path):
    """Write to ``path`` until its file system has no byte left."""
    with open(path, "wb", buffering=0) as fh:
        for size in (2**16, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory whose file system has no byte left: ``(directory, how)``."""
    mount = tmp_path / "full"
    mount.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0
    if mounted:
        try:
            _fill(mount / "filler")
            yield mount, "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        return

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (mount / "filler").write_bytes(b"")
    monkeypatch.setattr("feda2v_toolkit.runtime.tensorfile._write_sorted", no_space)
    monkeypatch.setattr("feda2v_toolkit.runtime.atomic.os.fsync", no_space)
    yield mount, "simulated"


@pytest.fixture
def inputs(tmp_path, model_file, capsys):
    """Inputs outside the full file system: a dataset, an original checkpoint, a legacy config."""
    from tests.model.test_original_checkpoints import orig, save_unified

    data = write_dataset(tmp_path / "data.safetensors", torch.randn(400, 30, 8), torch.arange(400) % 2,
                         class_names=["a", "b"])
    ckpt = save_unified(tmp_path / "ckpt.pt", orig(0), selected_classes=["dog", "cat"])
    legacy = tmp_path / "old.json"
    legacy.write_text('{"feda2v": {"generator_target_sequence_length": 1214}}')
    return {"data": str(data), "model": str(model_file), "ckpt": str(ckpt), "legacy": str(legacy)}


def _commands(i, full):
    return {
        "demo-data file": ["demo-data", f"{full}/d.safetensors", "--per-class", "20", "--full-length", "30",
                           "--dim", "8"],
        "demo-data shards": ["demo-data", f"{full}/shards", "--per-class", "20", "--full-length", "30", "--dim", "8"],
        "demo-data legacy config": ["demo-data", "--legacy-config", f"{full}/legacy.json"],
        "generate": ["generate", i["model"], "-o", f"{full}/gen", "-k", "200"],
        "convert-data": ["convert-data", i["data"], "-o", f"{full}/conv"],
        "split": ["split", i["data"], "-o", f"{full}/nodes", "--nodes", "2"],
        "convert": ["convert", i["ckpt"], "-o", f"{full}/converted.safetensors", "--dim", "8", "--full-length", "50"],
        "migrate -o": ["migrate", i["legacy"], "-o", f"{full}/new.json", "-q"],
        "schema -o": ["schema", "-o", f"{full}/schema.json"],
    }


def test_every_writing_command_ends_in_one_line_exit_2_and_leaves_nothing(inputs, full_disk, capsys):
    full, how = full_disk
    for name, argv in _commands(inputs, full).items():
        code, out, err = run_main(argv, capsys)
        assert code == 2, (name, how, err)
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and "No space left on device" in lines[0], (name, err)
        assert str(full) in lines[0] and "internal error" not in err, (name, err)  # the path is named
        assert sorted(p.name for p in full.iterdir()) == ["filler"], (name, how)


def test_migrate_in_place_on_a_full_disk_keeps_the_original(full_disk, capsys):
    full, how = full_disk
    if how != "tmpfs":
        pytest.skip("needs a real full file system (test_stopping covers the simulated case)")
    cfg = full / "filler"  # the only file there: migrate it in place (the backup cannot be written)
    cfg.write_bytes(b"")  # frees the space the filler took ...
    original = json.dumps({"feda2v": {"generator_target_sequence_length": 1214}}).encode()
    cfg.write_bytes(original)
    _fill(full / "refill")  # ... and takes it again
    code, _, err = run_main(["migrate", str(cfg), "--in-place"], capsys)
    assert code == 2 and "No space left on device" in err and cfg.read_bytes() == original
    assert sorted(p.name for p in full.iterdir()) == ["filler", "refill"]


def test_embed_on_a_full_disk(full_disk, tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.audio_fakes import make_class_folders, save_tiny_ast

    full, _ = full_disk
    ast = save_tiny_ast(tmp_path / "ast")
    clips = make_class_folders(tmp_path / "clips")
    capsys.readouterr()
    code, _, err = run_main(["embed", str(clips), "-o", f"{full}/emb", "--model", str(ast), "--clip-seconds", "1",
                             "--device", "cpu", "-q"], capsys)
    assert code == 2 and "No space left on device" in err and f"{full}/emb" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
