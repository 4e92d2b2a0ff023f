"""The shard writer: rows go to disk as they come, the shards are the files ``write_dataset`` writes, and
memory holds one batch in flight whatever the shard size."""

from __future__ import annotations

import gc
import hashlib
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
    batches = [torch.full((3, 5, 3), float(i)) for i in range(6)]
    alive = [weakref.ref(b) for b in batches]
    with DatasetWriter(tmp_path / "out", class_names=NAMES, shard_bytes=2**30) as w:  # one big shard
        for i in range(6):
            w.add(batches[i], torch.zeros(3), copy=False)
            batches[i] = None
            gc.collect()
            assert sum(ref() is not None for ref in alive[:i + 1]) <= 1, f"after add {i}"
    got = open_dataset(tmp_path / "out").read(range(18)).embeddings[:, 0, 0]
    assert got.tolist() == [float(i // 3) for i in range(18)]


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


def test_a_disk_filling_up_mid_shard_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import feda2v_toolkit.data.writer as writer_module
    from feda2v_toolkit.errors import UsageError

    real = writer_module._Shard.write_rows
    calls = []

    def fills_up(self, emb):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(self, emb)

    monkeypatch.setattr(writer_module._Shard, "write_rows", fills_up)
    emb, labels, _ = _rows(10)
    with pytest.raises(UsageError, match="No space left"), DatasetWriter(tmp_path / "out", class_names=NAMES) as w:
        for i in range(10):
            w.add(emb[i:i + 1], labels[i:i + 1])
    assert list(tmp_path.iterdir()) == []


def test_shard_metadata_is_the_dataset_metadata(tmp_path):
    from safetensors import safe_open

    emb, labels, _ = _rows(4)
    shards, _ = _write(tmp_path, "out", emb, labels, None, sizes=[4], shard_rows=8)
    with safe_open(str(shards[0]), framework="pt") as fh:
        assert fh.metadata() == dataset_metadata(NAMES)


def test_embeddings_are_stored_in_a_dataset_dtype(tmp_path):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        DatasetWriter(tmp_path / "out", class_names=NAMES, dtype=torch.float64)
