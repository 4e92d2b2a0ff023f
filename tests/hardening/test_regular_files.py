"""Only regular files are read as configs and datasets: devices, FIFOs, unbounded stdin and symlink
loops are refused with one line (never read until memory runs out, never a hang)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
