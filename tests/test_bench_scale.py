"""bench/bench_scale.py's data for sizes that do not fit the disk (``--link``): what a command reads and what
the read probe measures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench_scale():
    sys.path.insert(0, str(_BENCH))  # the script imports its sibling _memory
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", _BENCH / "bench_scale.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(_BENCH))


def test_linked_copies_are_read_as_whole_passes_over_the_data_on_disk(bench_scale, tmp_path):
    """Name order (how a dataset directory is read) visits every file on disk once per copy, never one file
    several times in a row -- which the page cache would serve (the first 64k run's defect)."""
    import torch

    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import DatasetWriter

    data = tmp_path / "data"
    with DatasetWriter(data, class_names=["a", "b"], shard_bytes=8 * 5 * 3 * 4) as writer:  # 8 rows a shard
        writer.add(torch.randn(24, 5, 3), torch.arange(24) % 2)
    originals = sorted(p.name for p in data.glob("*.safetensors"))
    assert len(originals) == 3
    assert bench_scale.link_copies(data, 3) == 3 * len(originals)
    inodes = [p.stat().st_ino for p in sorted(data.glob("*.safetensors"))]
    per_pass = len(originals)
    passes = [inodes[i:i + per_pass] for i in range(0, len(inodes), per_pass)]
    assert len(passes) == 3 and all(sorted(p) == sorted(passes[0]) for p in passes)
    assert len(set(passes[0])) == per_pass  # each pass reads every file on disk once
    assert len(open_dataset(data)) == 3 * 24


def test_the_read_probe_reads_each_file_on_disk_once(bench_scale, tmp_path):
    data = tmp_path / "data"
    bench_scale.make_data(data, 8)
    on_disk = sum(p.stat().st_size for p in data.glob("*.safetensors"))
    bench_scale.link_copies(data, 4)
    assert bench_scale.disk_read_rate(data, 10 * on_disk)["bytes"] == on_disk
