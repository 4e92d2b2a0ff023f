"""The installed `feda2v-tk` executable, end to end: demo-data -> train -> inspect -> generate -> train again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).parent / "feda2v-tk")


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"feda2v-tk {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


CONFIG = {
    "feda2v": {
        "generator_training_mode": True,
        "generator_type": "vae",
        "use_conditioned_vae": True,
        "generator_training_sequence_length": 4,
        "generator_output_sequence_length": 40,
        "generator_training_epochs": 3,
        "generator_hidden_dim": 32,
        "generator_latent_dim": 8,
        "generator_batch_size": 8,
        "synthetic_samples_per_class": 2,
    },
    "wandb": {"project": "untouched"},
}


def test_train_inspect_generate_and_train_again_on_the_generated_shards(tmp_path):
    run("demo-data", "data.safetensors", "--per-class", "8", "--seq-len", "40", "--dim", "8", cwd=tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    run("train", "-c", "cfg.json", "-d", "data.safetensors", "-o", "m.safetensors", "--seed", "3",
        "--checkpoint-dir", "ck", cwd=tmp_path)
    assert (tmp_path / "m.metrics.jsonl").read_text().count("\n") == 3

    info = json.loads(run("inspect", "m.safetensors", "--json", cwd=tmp_path).stdout)
    assert info["generator_type"]["qualified_name"] == "builtin:vae"
    assert (info["full_length"], info["training_length"], info["output_length"], info["dim"]) == (40, 4, 40, 8)
    assert info["parameters"]["generator[all]"] > 0
    assert info["config"]["generator_training_epochs"] == 3
    assert "held out" in run("inspect", "m.safetensors", cwd=tmp_path).stdout

    run("generate", "m.safetensors", "-o", "synthetic", "--seed", "1", cwd=tmp_path)
    shards = list((tmp_path / "synthetic").glob("*.safetensors"))
    assert shards
    run("train", "-d", "synthetic", "-o", "again.safetensors", "--epochs", "1", "--hidden-dim", "16",
        "--latent-dim", "4", "--checkpoint-dir", "ck2", "--seed", "0", cwd=tmp_path)
    assert (tmp_path / "again.safetensors").exists()


def test_cli_options_override_config_keys(tmp_path):
    run("demo-data", "data.safetensors", "--per-class", "4", "--seq-len", "40", "--dim", "8", cwd=tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    run("train", "-c", "cfg.json", "-d", "data.safetensors", "-o", "m.safetensors", "--epochs", "1",
        "--training-length", "8", "--granularity", "per_class", "--checkpoint-dir", "ck", "-q", cwd=tmp_path)
    info = json.loads(run("inspect", "m.safetensors", "--json", cwd=tmp_path).stdout)
    assert info["training_length"] == 8 and info["granularity"] == "per_class"
    assert info["metrics"]["epochs"] == 1


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["train", "-d", "missing.safetensors", "-o", "m.safetensors"], 2, "missing.safetensors"),
    (["generate", "nope.safetensors", "-o", "out"], 2, "nope.safetensors"),
    (["generate", "garbage.safetensors", "-o", "out"], 1, "garbage.safetensors"),
    (["inspect", "garbage.safetensors"], 1, "garbage.safetensors"),
])
def test_bad_input_is_one_line_on_stderr_with_a_nonzero_exit_and_no_traceback(tmp_path, args, code, needle):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 100)
    proc = run(*args, cwd=tmp_path, check=False)
    assert proc.returncode == code
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.safetensors").exists()


def test_train_refuses_a_generator_section_that_is_not_an_object(tmp_path):
    """`validate` exits 1 on it; `train` used to train with every default and exit 0."""
    from feda2v_toolkit.data.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "data.safetensors", 4, seq_len=40, dim=8)
    (tmp_path / "bad.json").write_text(json.dumps({"feda2v": [1, 2], "training": {}}))
    proc = run("train", "-c", "bad.json", "-d", "data.safetensors", "-o", "m.safetensors", "--epochs", "1",
               "--checkpoint-dir", "ck", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("feda2v-tk: error: bad.json: invalid generator config: line 1, column 12: $.feda2v")
    assert lines[0].endswith("[invalid-section]")
    assert not (tmp_path / "m.safetensors").exists()
    assert run("validate", "bad.json", cwd=tmp_path, check=False).returncode == 1


def test_train_warns_about_a_non_positional_reducer_with_an_interpolating_upsampler(tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "data.safetensors", 4, seq_len=40, dim=8)
    proc = run("train", "-d", "data.safetensors", "-o", "m.safetensors", "--reducer", "pca", "--upsampler", "linear",
               "--epochs", "1",
               "--hidden-dim", "8", "--latent-dim", "4", "--checkpoint-dir", "ck", "--seed", "0", cwd=tmp_path)
    [warning] = [line for line in proc.stderr.splitlines() if line.startswith("feda2v-tk: warning: ")]
    assert "reducer 'pca' outputs components" in warning and "'linear'" in warning
    assert '"lstsq"' in warning and warning.endswith("[non-positional-reducer]")
    proc = run("train", "-d", "data.safetensors", "-o", "m2.safetensors", "--reducer", "pca", "--upsampler", "lstsq",
               "--epochs", "1", "--hidden-dim", "8", "--latent-dim", "4", "--checkpoint-dir", "ck2", "--seed", "0",
               cwd=tmp_path)
    assert "warning" not in proc.stderr


def test_traceback_flag_shows_the_traceback(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 100)
    proc = run("--traceback", "inspect", "garbage.safetensors", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_real_ast_shape_end_to_end(tmp_path):
    """One run at the real [1214, 768] shape: reduce to 4 tokens, train, generate full-length samples."""
    run("demo-data", "ast.safetensors", "--per-class", "4", cwd=tmp_path)
    run("train", "-d", "ast.safetensors", "-o", "m.safetensors", "--epochs", "2", "--hidden-dim", "64",
        "--latent-dim", "16", "--batch-size", "8", "--output-length", "1214", "--checkpoint-dir", "ck",
        "--seed", "0", "-q", cwd=tmp_path)
    run("generate", "m.safetensors", "-o", "synthetic", "-k", "2", "--dtype", "float16", cwd=tmp_path)
    from feda2v_toolkit.data.open import open_dataset

    ds = open_dataset(tmp_path / "synthetic")
    assert (len(ds), ds.seq_len, ds.dim) == (8, 1214, 768)


def test_a_legacy_config_is_migrated_in_memory_and_the_deprecation_is_shown(tmp_path):
    run("demo-data", "data.safetensors", "--per-class", "4", "--seq-len", "40", "--dim", "8", cwd=tmp_path)
    legacy = {"feda2v": {"generator_target_sequence_length": 8, "generator_training_epochs": 1,
                         "generator_hidden_dim": 16, "generator_latent_dim": 4}}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    proc = run("train", "-c", "old.json", "-d", "data.safetensors", "-o", "m.safetensors", "--checkpoint-dir",
               "ck", "--seed", "0", cwd=tmp_path)
    warning = [line for line in proc.stderr.splitlines() if "warning" in line and "generator_target" in line]
    assert warning and "feda2v-tk migrate" in warning[0]
    info = json.loads(run("inspect", "m.safetensors", "--json", cwd=tmp_path).stdout)
    assert info["training_length"] == 8 and info["output_length"] is None
    assert "generator_target_sequence_length" not in info["config"]
