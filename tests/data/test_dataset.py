"""The dataset format: what is read, what is refused, and that reading streams."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import DatasetWriter, write_dataset
from feda2v_toolkit.errors import InputError, NewerVersionError, UsageError


def _rows(n=6, s=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, d, generator=g), torch.arange(n) % 3


def test_write_then_open_round_trips_shapes_labels_names_and_values(tmp_path):
    emb, labels = _rows()
    path = write_dataset(tmp_path / "d.safetensors", emb, labels, class_names=["a", "b", "c"])
    ds = open_dataset(path)
    assert (len(ds), ds.seq_len, ds.dim) == (6, 5, 3)
    assert ds.class_names == ["a", "b", "c"]
    assert ds.storage_dtype == torch.float32
    assert torch.equal(ds.labels, labels)
    assert ds.class_counts() == {"a": 2, "b": 2, "c": 2}
    assert torch.equal(ds.read(range(6)).embeddings, emb)


def test_numpy_arrays_and_dtype_conversion_are_accepted(tmp_path):
    emb, labels = _rows()
    write_dataset(tmp_path / "d.safetensors", emb.numpy(), labels.numpy(), dtype="float16")
    ds = open_dataset(tmp_path / "d.safetensors")
    assert ds.storage_dtype == torch.float16
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    assert torch.allclose(ds.read([0]).embeddings, emb[:1].half().float())


def test_read_returns_rows_in_the_order_asked_including_duplicates(tmp_path):
    emb, labels = _rows()
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, labels))
    batch = ds.read([4, 1, 1, 5])
    assert torch.equal(batch.embeddings, emb[[4, 1, 1, 5]])
    assert torch.equal(batch.labels, labels[[4, 1, 1, 5]])


def test_shard_directory_reads_as_one_dataset_across_shard_boundaries(tmp_path):
    emb, labels = _rows(n=10)
    shard_bytes = 3 * 5 * 3 * 4  # three rows per shard
    with DatasetWriter(tmp_path / "shards", class_names=["a", "b", "c"], shard_bytes=shard_bytes) as w:
        for i in range(10):
            w.add(emb[i:i + 1], labels[i:i + 1])
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 4
    ds = open_dataset(tmp_path / "shards")
    assert len(ds) == 10
    assert torch.equal(ds.read([2, 3, 7, 9]).embeddings, emb[[2, 3, 7, 9]])
    streamed = torch.cat([b.embeddings for b in ds.batches(4)])
    assert torch.equal(streamed, emb)


def test_writer_leaves_nothing_behind_when_interrupted(tmp_path):
    emb, labels = _rows()
    with pytest.raises(KeyboardInterrupt), DatasetWriter(tmp_path / "out", class_names=["a", "b", "c"],
                                                         shard_bytes=1) as w:
        w.add(emb, labels)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        DatasetWriter(tmp_path / "out", class_names=["a"])


def test_conditions_are_carried_through(tmp_path):
    emb, labels = _rows()
    cond = torch.randn(6, 7)
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, labels, conditions=cond))
    assert ds.condition_dim == 7
    assert torch.equal(ds.read([3, 0]).conditions, cond[[3, 0]])


def test_legacy_pt_cache_is_read_without_unpickling_objects(tmp_path):
    emb, labels = _rows()
    torch.save({"audio_embeddings": emb, "labels": labels, "class_names": ["x", "y", "z"]}, tmp_path / "c.pt")
    ds = open_dataset(tmp_path / "c.pt")
    assert ds.class_names == ["x", "y", "z"]
    assert torch.equal(ds.read([1]).embeddings, emb[1:2])


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_legacy_pt_with_pickled_objects_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"embeddings": torch.zeros(1, 2, 2), "labels": torch.zeros(1), "extra": _Evil(marker)},
               tmp_path / "c.pt")
    with pytest.raises(InputError, match="weights_only"):
        open_dataset(tmp_path / "c.pt")
    assert not marker.exists()


def test_random_bytes_named_pt_are_not_called_pickled_objects(tmp_path):
    (tmp_path / "g.pt").write_bytes(bytes(range(256)) * 20)  # a zip-less, damaged "legacy" file
    with pytest.raises(InputError, match="not a PyTorch file torch can read") as info:
        open_dataset(tmp_path / "g.pt")
    assert "pickled Python objects" not in str(info.value)


@pytest.mark.parametrize(("tensors", "message"), [
    ({"labels": torch.zeros(2, dtype=torch.long)}, "missing tensor"),
    ({"embeddings": torch.zeros(2, 3), "labels": torch.zeros(2, dtype=torch.long)}, r"must be \[N, S, D\]"),
    ({"embeddings": torch.zeros(2, 3, 4), "labels": torch.zeros(3, dtype=torch.long)}, "'labels' must be"),
    ({"embeddings": torch.zeros(2, 3, 4), "labels": torch.zeros(2)}, "must be integers"),
    ({"embeddings": torch.zeros(2, 3, 4, dtype=torch.int32), "labels": torch.zeros(2, dtype=torch.long)},
     "float32, float16 or bfloat16"),
    ({"embeddings": torch.zeros(2, 3, 4), "labels": torch.tensor([0, -1])}, "negative label"),
    ({"embeddings": torch.zeros(2, 3, 0), "labels": torch.zeros(2, dtype=torch.long)}, r"width D >= 1.*\[2, 3, 0\]"),
    ({"embeddings": torch.zeros(2, 0, 4), "labels": torch.zeros(2, dtype=torch.long)}, r"length S >= 1.*\[2, 0, 4\]"),
])
def test_malformed_files_are_refused_with_one_line_naming_the_file(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=message) as info:
        open_dataset(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_labels_beyond_the_class_names_are_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"embeddings": torch.zeros(2, 3, 4), "labels": torch.tensor([0, 2])}, str(path),
              metadata={"class_names": json.dumps(["a", "b"])})
    with pytest.raises(InputError, match="out of range"):
        open_dataset(path)


def test_class_names_nested_too_deeply_are_refused_with_one_line_naming_the_file(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"embeddings": torch.zeros(2, 3, 4), "labels": torch.tensor([0, 1])}, str(path),
              metadata={"class_names": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(InputError, match="'class_names'.*nested too deeply") as info:
        open_dataset(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    emb, labels = _rows()
    path = write_dataset(tmp_path / "d.safetensors", emb, labels)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputError, match="not a valid safetensors file"):
        open_dataset(path)


def test_nan_values_are_reported_with_the_sample_index(tmp_path):
    emb, labels = _rows()
    emb[4, 2, 1] = float("nan")
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, labels))
    with pytest.raises(InputError, match="sample 4 contains NaN"):
        list(ds.batches(2))


def test_a_summary_of_the_values_stands_in_for_them_and_only_flagged_rows_are_looked_at(tmp_path):
    """A pass that computes a reduction anyway checks it instead of the full values; a summary that overflowed
    on finite values is no error; a view reports the sample by the file's numbering."""
    emb, labels = _rows(n=10)
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, labels))
    idx = torch.arange(len(ds))
    summary = emb.mean(dim=1, keepdim=True)
    ds.check_finite(emb, idx, summary=summary)  # all finite
    overflowed = summary.clone()
    overflowed[3] = float("inf")
    ds.check_finite(emb, idx, summary=overflowed)  # the values of row 3 are finite: accepted
    bad = emb.clone()
    bad[5, 1, 0] = float("-inf")
    with pytest.raises(InputError, match=r"d\.safetensors: sample 5 contains NaN or inf"):
        ds.check_finite(bad, idx, summary=bad.mean(dim=1, keepdim=True))
    view = ds.subset(torch.tensor([7, 5, 2]))
    with pytest.raises(InputError, match="sample 5 contains NaN or inf"):
        view.check_finite(bad[[7, 5, 2]], torch.arange(3), summary=bad[[7, 5, 2]].mean(dim=1))


def test_missing_path_and_empty_directory_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        open_dataset(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .safetensors shards"):
        open_dataset(tmp_path / "empty")


def _dangling_link(path):
    path.symlink_to(path.parent / "on-an-unmounted-disk.safetensors")


def _link_loop(path):
    other = path.with_name("loop.other")
    path.symlink_to(other)
    other.symlink_to(path)


@pytest.mark.parametrize(("make", "message"), [
    (_dangling_link, "no such file or directory .a symbolic link to a missing file."),
    (_link_loop, "symbolic link loop"),
    (lambda path: path.mkdir(), r"shard is not a regular file \(a directory\)"),
    (lambda path: __import__("os").mkfifo(path), r"shard is not a regular file \(a device, pipe or socket\)"),
], ids=["dangling-link", "link-loop", "directory", "fifo"])
def test_a_shard_entry_that_is_not_a_regular_file_is_refused_not_skipped(tmp_path, make, message):
    (tmp_path / "s").mkdir()
    write_dataset(tmp_path / "s" / "a.safetensors", torch.zeros(2, 5, 3), torch.zeros(2))
    make(tmp_path / "s" / "b.safetensors")
    with pytest.raises(UsageError, match=message) as info:
        open_dataset(tmp_path / "s")
    assert str(tmp_path / "s" / "b.safetensors") in str(info.value) and "\n" not in str(info.value)


def test_hidden_entries_of_a_shard_directory_are_still_ignored(tmp_path):
    (tmp_path / "s").mkdir()
    write_dataset(tmp_path / "s" / "a.safetensors", torch.zeros(2, 5, 3), torch.zeros(2))
    (tmp_path / "s" / ".b.safetensors").symlink_to(tmp_path / "missing")
    assert len(open_dataset(tmp_path / "s")) == 2


def test_a_dataset_from_a_newer_format_version_is_refused(tmp_path):
    emb, labels = _rows()
    path = write_dataset(tmp_path / "d.safetensors", emb, labels, extra_metadata={"format_version": "99"})
    with pytest.raises(NewerVersionError, match="newer"):
        open_dataset(path)


def test_shards_with_different_shapes_are_refused(tmp_path):
    (tmp_path / "s").mkdir()
    write_dataset(tmp_path / "s" / "a.safetensors", torch.zeros(2, 5, 3), torch.zeros(2))
    write_dataset(tmp_path / "s" / "b.safetensors", torch.zeros(2, 6, 3), torch.zeros(2))
    with pytest.raises(InputError, match="sequences are"):
        open_dataset(tmp_path / "s")


@pytest.mark.parametrize("shape", [(2, 3, 0), (2, 0, 4)])
def test_writers_refuse_sequences_without_positions_or_features(tmp_path, shape):
    with pytest.raises(ValueError, match="S, D >= 1"):
        write_dataset(tmp_path / "d.safetensors", torch.zeros(shape), torch.zeros(2))
    with pytest.raises(ValueError, match="S, D >= 1"), DatasetWriter(tmp_path / "out", class_names=["a"]) as w:
        w.add(torch.zeros(shape), torch.zeros(2))
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "out").exists()


def test_writer_copies_rows_so_callers_may_reuse_their_buffer(tmp_path):
    buf = torch.zeros(1, 5, 3)
    with DatasetWriter(tmp_path / "out", class_names=["a"], shard_bytes=1) as w:
        for value in range(5):
            buf.fill_(value)
            w.add(buf, torch.zeros(1))
        buf.fill_(99)
    got = open_dataset(tmp_path / "out").read(range(5)).embeddings[:, 0, 0]
    assert got.tolist() == [0, 1, 2, 3, 4]


def test_a_failing_close_leaves_nothing_behind(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("feda2v_toolkit.data.writer.os.fsync", disk_full)
    with pytest.raises(UsageError, match="No space left"), DatasetWriter(tmp_path / "out", class_names=["a"]) as w:
        w.add(torch.zeros(2, 5, 3), torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_output_directory_and_shards_get_the_usual_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with DatasetWriter(tmp_path / "out", class_names=["a"]) as w:
            w.add(torch.zeros(2, 5, 3), torch.zeros(2))
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "out").iterdir())


def test_conditions_are_read_without_the_embeddings(tmp_path, monkeypatch):
    cond = torch.randn(6, 4)
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", torch.zeros(6, 5, 3), torch.arange(6) % 2,
                                    conditions=cond))
    read = []
    original = type(ds.sources[0]).read
    monkeypatch.setattr(type(ds.sources[0]), "read", lambda self, name, lo, hi: read.append(name) or
                        original(self, name, lo, hi))
    assert torch.equal(ds.read_conditions([4, 1, 4]), cond[[4, 1, 4]])
    assert set(read) == {"conditions"}


@pytest.mark.parametrize(("payload", "message"), [
    ({"embeddings": torch.zeros(2, 3, 4), "labels": ["a", "b"]}, "integer labels"),
    ({"embeddings": torch.zeros(2, 3, 4), "labels": torch.zeros(2), "class_names": "ab"}, "class_names"),
    ({"embeddings": torch.zeros(2, 3, 4), "labels": torch.zeros(2), "class_names": ["a", "a"]}, "duplicates"),
])
def test_legacy_caches_are_checked_like_safetensors_files(tmp_path, payload, message):
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(InputError, match=message):
        open_dataset(tmp_path / "c.pt")


def test_legacy_caches_in_the_old_non_zip_format_are_read(tmp_path):
    emb, labels = _rows()
    torch.save({"embeddings": emb, "labels": labels}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(open_dataset(tmp_path / "old.pt").read([2]).embeddings, emb[2:3])


def _fadvise_calls(monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)), raising=False)
    return calls


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_scattered_rows_are_hinted_to_the_kernel_with_their_exact_byte_ranges(tmp_path, monkeypatch):
    import os

    emb, labels = _rows(n=10)
    shard_bytes = 3 * 5 * 3 * 4  # three rows per shard
    with DatasetWriter(tmp_path / "shards", class_names=["a", "b", "c"], shard_bytes=shard_bytes) as w:
        w.add(emb, labels)
    ds = open_dataset(tmp_path / "shards")
    calls = _fadvise_calls(monkeypatch)
    assert torch.equal(ds.read([1, 2, 7]).embeddings, emb[[1, 2, 7]])  # rows 1-2 of shard 0, row 1 of shard 2
    assert [c[3] for c in calls] == [os.POSIX_FADV_WILLNEED] * 2
    for (path, offset, length, _), rows in zip(calls, ([1, 2], [7]), strict=True):
        with open(path, "rb") as fh:  # the hinted bytes are exactly those rows' stored values
            fh.seek(offset)
            stored = torch.frombuffer(bytearray(fh.read(length)), dtype=torch.float32)
        assert torch.equal(stored, emb[rows].flatten())


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_contiguous_reads_are_left_to_the_kernels_read_ahead_and_scattered_reads_are_hinted(tmp_path, monkeypatch):
    emb, labels = _rows(n=10)
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, labels))
    calls = _fadvise_calls(monkeypatch)
    ds.read([3, 4, 5])
    assert calls == []
    assert torch.equal(ds.read([0, 5]).embeddings, emb[[0, 5]]) and len(calls) == 2  # one hint per run
    calls.clear()
    batches = list(ds.batches(2, [0, 5, 9, 1, 3, 7]))  # a stream reads ahead in a thread (data.readahead)
    assert torch.equal(batches[1].embeddings, emb[[9, 1]]) and calls == []
    view = ds.subset([9, 8, 7, 6])
    calls.clear()
    view.read([0, 2])  # rows 9 and 7 of the file
    assert len(calls) == 2


def test_a_hint_that_cannot_be_given_changes_nothing(tmp_path, monkeypatch):
    emb, labels = _rows(n=10)
    path = write_dataset(tmp_path / "d.safetensors", emb, labels)
    ds = open_dataset(path)
    calls = _fadvise_calls(monkeypatch)
    for junk in (b"\xff" * 16, b"\x01", (2).to_bytes(8, "little") + b"[]", (4).to_bytes(8, "little") + b"{\"e\"}"):
        path.write_bytes(junk)  # the header is gone or garbled: the hint is skipped, not an error
        ds.sources[0]._spans = None
        ds.sources[0].will_need("embeddings", 0, 1)
        assert ds.sources[0]._spans == {} and calls == []


def test_contiguous_runs_are_the_consecutive_stretches_of_sorted_rows():
    from feda2v_toolkit.data.dataset import contiguous_runs

    assert contiguous_runs([0, 1, 3, 6, 7, 8]) == [(0, 2), (3, 4), (6, 9)]
    assert contiguous_runs([5]) == [(5, 6)] and contiguous_runs([]) == []
