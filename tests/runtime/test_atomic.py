"""Atomic writes: the target is either the old file or the complete new one, never half of one."""

from __future__ import annotations

import os

import pytest

from feda2v_toolkit.runtime.atomic import atomic_open, atomic_path, atomic_write_text


def test_write_text_creates_file_with_exact_content(tmp_path):
    target = tmp_path / "sub" / "config.json"
    atomic_write_text(target, '{"a": 1}\r\n')
    assert target.read_bytes() == b'{"a": 1}\r\n'


def test_failure_inside_block_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as fh:
        fh.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_keyboard_interrupt_is_also_clean(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_file_permissions_are_kept(tmp_path):
    target = tmp_path / "c.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    atomic_write_text(target, "{}\n")
    assert (target.stat().st_mode & 0o777) == 0o640


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError), atomic_open(tmp_path / "x", "r"):
        pass
