"""The shard writer: rows go to disk as they come, the shards are the files ``write_dataset`` writes, and
memory holds one batch in flight whatever the shard size."""

from __future__ import annotations

import gc
import hashlib
import sys
import weakref

import pytest
import torch

from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import DatasetWriter, dataset_metadata, write_dataset

NAMES = ["a", "b", "c"]


def _rows(n, s=5, d=3, seed=0, cond=0):
    g = torch.Generator().manual_seed(seed)
    conditions = torch.randn(n, cond, generator=g) if cond else None
    return torch.randn(n, s, d, generator=g), torch.arange(n) % 3, conditions


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(tmp_path, name, emb, labels, cond, *, sizes, shard_rows, dtype=torch.float32, rows=None):
    row_bytes = emb[0].numel() * torch.empty((), dtype=dtype).element_size()
    out = tmp_path / name
    with DatasetWriter(out, class_names=NAMES, dtype=dtype, shard_bytes=shard_rows * row_bytes, rows=rows) as w:
        start = 0
        for size in sizes:
            w.add(emb[start:start + size], labels[start:start + size],
                  cond[start:start + size] if cond is not None else None)
            start += size
    return sorted(out.glob("*.safetensors")), w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cond", [0, 4])
@pytest.mark.parametrize("rows", [None, 11, 9, 20])
def test_every_shard_is_the_file_write_dataset_writes_for_its_rows(tmp_path, dtype, cond, rows):
    emb, labels, conditions = _rows(11, cond=cond)
    shards, writer = _write(tmp_path, "out", emb, labels, conditions, sizes=[1, 5, 2, 3], shard_rows=4,
                            dtype=dtype, rows=rows)  # rows: exact, too many, too few, or unknown
    assert [s.name for s in shards] == ["part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    for k, shard in enumerate(shards):
        lo, hi = 4 * k, min(11, 4 * k + 4)
        ref = write_dataset(tmp_path / f"ref{k}.safetensors", emb[lo:hi].to(dtype), labels[lo:hi],
                            class_names=NAMES, conditions=conditions[lo:hi] if conditions is not None else None)
        assert _sha(shard) == _sha(ref), f"shard {k}"
    assert writer.rows == 11
    assert writer.bytes_written == sum(s.stat().st_size for s in shards)
    assert not list(tmp_path.glob("out/*.planned"))


def test_the_row_count_plans_the_last_shard_so_nothing_is_copied(tmp_path, monkeypatch):
    import feda2v_toolkit.data.writer as writer_module

    moved = []
    real_replace = writer_module.os.replace
    monkeypatch.setattr(writer_module.os, "replace",
                        lambda a, b: (moved.append(str(b)), real_replace(a, b))[1])
    emb, labels, _ = _rows(10)
    _write(tmp_path, "hinted", emb, labels, None, sizes=[10], shard_rows=4, rows=10)
    assert not [m for m in moved if m.endswith(".planned")]
    _write(tmp_path, "unhinted", emb, labels, None, sizes=[10], shard_rows=4)
    assert [m for m in moved if m.endswith(".planned")] == [m for m in moved if "part-00002" in m]
    assert [_sha(p) for p in sorted((tmp_path / "hinted").iterdir())] == \
        [_sha(p) for p in sorted((tmp_path / "unhinted").iterdir())]


def test_the_writer_holds_at_most_one_batch_in_flight(tmp_path):
    import numpy as np

    # the batches' memory is numpy's, so a weak reference to it lives as long as any tensor viewing it
    arrays = [np.full((3, 5, 3), float(i), dtype=np.float32) for i in range(6)]
    alive = [weakref.ref(a) for a in arrays]
    with DatasetWriter(tmp_path / "out", class_names=NAMES, shard_bytes=2**30) as w:  # one big shard
        for i in range(6):
            w.add(torch.from_numpy(arrays[i]), torch.zeros(3), copy=False)
            arrays[i] = None
            gc.collect()
            assert sum(ref() is not None for ref in alive[:i + 1]) <= 1, f"after add {i}"
    got = open_dataset(tmp_path / "out").read(range(18)).embeddings[:, 0, 0]
    assert got.tolist() == [float(i // 3) for i in range(18)]


def test_a_queued_writer_would_fail_the_in_flight_check(tmp_path):
    """The check above can fail: a writer keeping every batch keeps every array alive."""
    import numpy as np

    arrays = [np.full((3, 5, 3), float(i), dtype=np.float32) for i in range(3)]
    alive = [weakref.ref(a) for a in arrays]
    kept = [torch.from_numpy(a).detach() for a in arrays]
    arrays = None
    gc.collect()
    assert sum(ref() is not None for ref in alive) == 3
    del kept


@pytest.mark.parametrize("second", [
    (torch.zeros(2, 6, 3), None),           # another sequence length
    (torch.zeros(2, 5, 4), None),           # another dimension
    (torch.zeros(2, 5, 3), torch.zeros(2, 4)),  # conditions where the first rows had none
])
def test_rows_of_another_shape_are_refused(tmp_path, second):
    with pytest.raises(ValueError, match="one shape"), DatasetWriter(tmp_path / "out", class_names=NAMES) as w:
        w.add(torch.zeros(2, 5, 3), torch.zeros(2))
        w.add(second[0], torch.zeros(2), second[1])
    assert list(tmp_path.iterdir()) == []


def _open_files_under(path):
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(path) in target:
            found.append(target)
    return found


@pytest.mark.parametrize("failing", [3, 4])  # mid-shard; the write that fills the shard
def test_a_disk_filling_up_is_one_error_leaves_nothing_and_no_open_file(tmp_path, monkeypatch, failing):
    import feda2v_toolkit.data.writer as writer_module
    from feda2v_toolkit.errors import UsageError

    real = writer_module._Shard.write_rows
    calls = []

    def fills_up(self, first, emb):
        calls.append(1)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        real(self, first, emb)

    monkeypatch.setattr(writer_module._Shard, "write_rows", fills_up)
    emb, labels, _ = _rows(10)
    with pytest.raises(UsageError, match="No space left"), \
            DatasetWriter(tmp_path / "out", class_names=NAMES, shard_bytes=4 * 5 * 3 * 4) as w:
        for i in range(10):
            w.add(emb[i:i + 1], labels[i:i + 1])
    assert list(tmp_path.iterdir()) == []
    if sys.platform.startswith("linux"):
        assert _open_files_under(tmp_path) == []


def test_after_a_failed_write_every_call_raises_it_and_close_publishes_nothing(tmp_path, monkeypatch):
    import feda2v_toolkit.data.writer as writer_module
    from feda2v_toolkit.errors import UsageError

    real = writer_module._Shard.write_rows
    calls = []

    def fails_once(self, first, emb):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, first, emb)

    monkeypatch.setattr(writer_module._Shard, "write_rows", fails_once)
    emb, labels, _ = _rows(4)
    w = DatasetWriter(tmp_path / "out", class_names=NAMES, rows=4)
    w.add(emb[:1], labels[:1])
    w.add(emb[1:2], labels[1:2])  # its write fails on the writer thread
    with pytest.raises(UsageError, match="No space left"):
        w.add(emb[2:3], labels[2:3])  # ... and is reported by the next call
    with pytest.raises(UsageError, match="No space left"):
        w.add(emb[3:4], labels[3:4])  # a caller that carries on is told again
    with pytest.raises(UsageError, match="No space left"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_empty_adds_and_non_contiguous_rows_are_written_like_any_rows(tmp_path):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(6, 3, 5, generator=g).transpose(1, 2)  # [6, 5, 3], not contiguous
    labels = torch.arange(6) % 3
    with DatasetWriter(tmp_path / "out", class_names=NAMES, shard_bytes=4 * 5 * 3 * 4) as w:
        w.add(torch.empty(0, 0, 0), torch.empty(0))  # nothing, and no shape fixed by it
        w.add(emb[:4], labels[:4], copy=False)
        w.add(emb[4:], labels[4:])
    ref = write_dataset(tmp_path / "ref.safetensors", emb[4:], labels[4:], class_names=NAMES)
    assert _sha(tmp_path / "out" / "part-00001.safetensors") == _sha(ref)
    assert torch.equal(open_dataset(tmp_path / "out").read(range(6)).embeddings, emb)


def test_shard_metadata_is_the_dataset_metadata(tmp_path):
    from safetensors import safe_open

    emb, labels, _ = _rows(4)
    shards, _ = _write(tmp_path, "out", emb, labels, None, sizes=[4], shard_rows=8)
    with safe_open(str(shards[0]), framework="pt") as fh:
        assert fh.metadata() == dataset_metadata(NAMES)


def test_embeddings_are_stored_in_a_dataset_dtype(tmp_path):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        DatasetWriter(tmp_path / "out", class_names=NAMES, dtype=torch.float64)
