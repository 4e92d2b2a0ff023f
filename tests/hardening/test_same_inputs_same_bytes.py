"""Same seed and data -> byte-identical model files (sorted metadata, timings kept out)."""

from __future__ import annotations

import hashlib
import json
import struct

from feda2v_toolkit.training.pipeline import train
from tests.hardening.conftest import run_main


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_cli_runs_with_the_same_seed_write_files_with_the_same_sha256(tiny_data, tmp_path, capsys):
    args = ["--epochs", "2", "--training-length", "4", "--hidden-dim", "16", "--latent-dim", "4", "--seed", "3",
            "-q"]
    for name in ("a", "b"):
        code, _, err = run_main(["train", "-d", str(tiny_data), "-o", str(tmp_path / f"{name}.safetensors"),
                                 *args], capsys)
        assert code == 0, err
    assert _sha256(tmp_path / "a.safetensors") == _sha256(tmp_path / "b.safetensors")


def test_the_header_is_sorted_and_holds_no_wall_clock_timings(tiny_data, tiny_config, tmp_path):
    model = train(tiny_config, tiny_data, out=tmp_path / "m.safetensors")
    assert "train_seconds" in model.metrics  # the returned model still has them (and the metrics file)
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    doc = header["__metadata__"]["model"]
    assert "seconds" not in doc and "samples_per_s" not in doc
    assert json.loads(doc)["data_dtype"] == "float16"
