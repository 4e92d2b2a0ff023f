"""Every way of stopping leaves nothing behind: SIGTERM, kill -9 (stale temporaries), a full disk,
a resume against changed settings, and the metrics file across runs and resumes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from feda2v_toolkit.data.writer import DatasetWriter
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.atomic import atomic_write_text
from feda2v_toolkit.training import pipeline as training
from feda2v_toolkit.training import site
from feda2v_toolkit.training.pipeline import train
from tests.hardening.conftest import run_main


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_during_generate_is_handled_like_ctrl_c_and_leaves_no_partial_directory(model_file, tmp_path,
                                                                                         capsys, monkeypatch):
    real_add = DatasetWriter.add

    def add_then_terminated(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` / a job scheduler would

    monkeypatch.setattr(DatasetWriter, "add", add_then_terminated)
    code, _, err = run_main(["generate", str(model_file), "-o", str(tmp_path / "out"), "-k", "200",
                             "--batch-size", "8", "--shard-size", "1"], capsys)
    assert code == 143 and "terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out/, no hidden .out.*.partial


def test_main_leaves_the_host_process_sigterm_handler_as_it_was(capsys):
    before = signal.getsignal(signal.SIGTERM)
    code, _, _ = run_main(["schema", "-q"], capsys)
    assert code == 0 and signal.getsignal(signal.SIGTERM) is before


def test_stale_temporaries_of_dead_writers_are_removed_on_the_next_run_and_live_ones_kept(model_file, tmp_path,
                                                                                          capsys):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".out.{dead}-abc.partial").mkdir()
    (tmp_path / f".out.{dead}-abc.partial" / "part-00000.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / f".cfg.json.{dead}-x1.tmp").write_text("{")
    (tmp_path / f".cfg.json.{alive + 1_000_000_000}-x2.tmp").write_text("{")  # no such pid either
    other = tmp_path / f".cfg.json.{os.getppid()}-x3.tmp"  # a live process (may be writing right now)
    other.write_text("{")
    code, _, _ = run_main(["generate", str(model_file), "-o", str(tmp_path / "out"), "-k", "2", "-q"], capsys)
    assert code == 0
    atomic_write_text(tmp_path / "cfg.json", "{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([other.name, "cfg.json", "out"])


def test_a_full_disk_during_migrate_in_place_leaves_no_backup_and_the_original_intact(tmp_path, capsys,
                                                                                      monkeypatch):
    cfg = tmp_path / "old.json"
    original = b'{"feda2v": {"generator_target_sequence_length": 1214}}\n'
    cfg.write_bytes(original)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("feda2v_toolkit.commands.config.os.fsync", disk_full)
    code, _, err = run_main(["migrate", str(cfg), "--in-place"], capsys)
    assert code == 2 and "No space left on device" in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and cfg.read_bytes() == original


@pytest.mark.parametrize("change", [{"generator_training_sequence_length": 5}, {"generator_reducer": "adaptive_avg",
                                                                                 "generator_upsampler": "linear"}])
def test_resuming_a_fitted_reducer_with_changed_settings_is_the_documented_refusal(tiny_data, tiny_config, tmp_path,
                                                                                   change):
    tiny_config.update(generator_reducer="pca", generator_upsampler="lstsq", generator_training_epochs=2,
                       generator_checkpoint_frequency=1)
    train(tiny_config, tiny_data, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(UsageError, match="checkpoint was made with another config") as info:
        train({**tiny_config, **change}, tiny_data, checkpoint_dir=tmp_path / "ck", resume=True)
    for key in change:
        if key != "generator_upsampler":  # pca -> adaptive_avg names the reducer (first 3 keys are shown)
            assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_resuming_with_data_of_another_width_is_the_documented_refusal(tiny_config, tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset

    tiny_config.update(generator_reducer="pca", generator_upsampler="lstsq", generator_training_epochs=2,
                       generator_checkpoint_frequency=1)
    narrow = write_demo_dataset(tmp_path / "narrow.safetensors", 6, seq_len=20, dim=8)
    wide = write_demo_dataset(tmp_path / "wide.safetensors", 6, seq_len=20, dim=12)
    train(tiny_config, narrow, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(UsageError, match=r"checkpoint was made with another dataset \(data 24 x 20 x 8 -> 24 x 20 x 12\)"):
        train(tiny_config, wide, checkpoint_dir=tmp_path / "ck", resume=True)


def _epochs(path):
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_the_metrics_file_has_each_epoch_once_across_runs_and_kill_plus_resume(tiny_data, tiny_config, tmp_path,
                                                                              monkeypatch):
    metrics = tmp_path / "m.metrics.jsonl"
    tiny_config.update(generator_training_epochs=4, generator_checkpoint_frequency=1)
    train(tiny_config, tiny_data, metrics_path=metrics)
    train(tiny_config, tiny_data, metrics_path=metrics, overwrite=True)  # another run to the same output: anew
    assert _epochs(metrics) == [1, 2, 3, 4]

    save = training.save_checkpoint

    def killed_after_epoch_3(path, model, optimizers, state):
        if state.epoch == 3:  # the metrics line of epoch 3 is written, its checkpoint is not
            raise KeyboardInterrupt
        save(path, model, optimizers, state)

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_checkpoint", killed_after_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config, tiny_data, metrics_path=metrics, overwrite=True)
    assert _epochs(metrics) == [1, 2, 3]
    train(tiny_config, tiny_data, metrics_path=metrics, resume=True)  # resumes after epoch 2
    assert _epochs(metrics) == [1, 2, 3, 4]


def test_train_checks_its_outputs_before_training(tiny_data, not_a_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(site, "ReducedCache", lambda *a, **k: pytest.fail("training started"))
    code, _, err = run_main(["train", "-d", str(tiny_data), "-o", str(not_a_dir / "m.safetensors")], capsys)
    assert code == 2 and "cannot write" in err and "internal error" not in err


def test_checkpoints_go_beside_the_model_and_train_says_where(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "-d", str(tiny_data), "-o", "m.safetensors", "--generator-type", "vae", "--epochs", "1",
            "--training-length", "4", "--hidden-dim", "16", "--latent-dim", "4", "--seed", "0"]
    code, _, err = run_main([*argv, "--keep-checkpoints"], capsys)
    assert code == 0, err
    assert "checkpoints: m.checkpoints/" in err
    assert (tmp_path / "m.checkpoints").is_dir() and not (tmp_path / "checkpoints").exists()


def test_a_finished_run_removes_its_checkpoints(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["train", "-d", str(tiny_data), "-o", "m.safetensors", "--generator-type", "vae",
                             "--epochs", "2", "--training-length", "4", "--hidden-dim", "16", "--latent-dim", "4",
                             "--seed", "0"], capsys)
    assert code == 0, err
    assert (tmp_path / "m.safetensors").is_file() and not (tmp_path / "m.checkpoints").exists()


def test_sigterm_during_federated_rounds_is_a_clean_stop_with_a_resumable_checkpoint(tiny_data, tmp_path):
    """The in-process engine runs the sites in the command's own thread: SIGTERM in the middle of a round is
    Ctrl-C (exit 143, one line), never an abort of a thread killed with the interpreter."""
    import subprocess
    import sys
    import time

    pytest.importorskip("flwr")
    ckpt = tmp_path / "fed.checkpoints" / "generator.checkpoint.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "feda2v_toolkit", "federate", "--node", str(tiny_data), "-o",
                             str(tmp_path / "fed.safetensors"), "--generator-type", "vae", "--rounds", "400",
                             "--training-length", "4", "--hidden-dim", "16", "--latent-dim", "4", "--seed", "0",
                             "--no-progress"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminate called" not in err and "Traceback" not in err
    assert "--resume" in err and ckpt.exists() and not (tmp_path / "fed.safetensors").exists()
