"""Passes over full sequences read ahead by a background thread: the same rows as ``read``, bounded buffers,
direct reads of what the page cache does not hold, errors that name the file."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
import torch

from feda2v_toolkit.data import readahead
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.readahead import ReadAhead
from feda2v_toolkit.data.writer import DatasetWriter, write_dataset
from feda2v_toolkit.errors import InputError

CHUNKS = [[0, 1, 2], [3, 4, 5, 6, 7], [9, 2, 2, 30], [31], [12, 11, 10], list(range(13, 29))]


def _shards(tmp_path, dtype=torch.float32, n=32, s=7, d=5):
    """``n`` rows in shards of three (runs cross file boundaries)."""
    emb = torch.randn(n, s, d, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    shard_bytes = 3 * s * d * dtype.itemsize
    with DatasetWriter(tmp_path / "shards", class_names=["a", "b", "c"], dtype=dtype, shard_bytes=shard_bytes) as w:
        for i in range(n):
            w.add(emb[i:i + 1], labels[i:i + 1])
    return open_dataset(tmp_path / "shards")


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direct", [True, False])
def test_a_stream_yields_what_read_returns_for_any_chunks_dtypes_and_files(tmp_path, stored, direct):
    ds = _shards(tmp_path, stored)
    for dtype in (torch.float32, stored):
        chunks = [torch.tensor(c) for c in CHUNKS]
        got = list(ReadAhead(ds, chunks, dtype=dtype, direct=direct))
        assert len(got) == len(chunks)
        for c, emb in zip(chunks, got, strict=True):
            assert emb.dtype == dtype and torch.equal(emb, ds.read(c, dtype=dtype).embeddings)
        for c, batch in zip(chunks, ds.stream(chunks, dtype=dtype), strict=True):  # what Dataset.stream adds
            ref = ds.read(c, dtype=dtype)
            assert torch.equal(batch.embeddings, ref.embeddings) and torch.equal(batch.labels, ref.labels)
            assert torch.equal(batch.indices, c)


def test_views_and_batches_stream_their_own_rows(tmp_path):
    ds = _shards(tmp_path, torch.float16)
    view = ds.subset([30, 2, 17, 5, 5, 8, 21])
    got = list(view.batches(3))
    assert [b.indices.tolist() for b in got] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([b.embeddings for b in got]), ds.read([30, 2, 17, 5, 5, 8, 21]).embeddings)
    assert torch.equal(torch.cat([b.labels for b in got]), view.labels)
    with pytest.raises(Exception, match="out of range"):
        list(view.stream([torch.tensor([7])]))


def test_files_that_are_not_safetensors_are_read_as_before(tmp_path):
    emb = torch.randn(6, 4, 3)
    torch.save({"embeddings": emb, "labels": torch.arange(6) % 2}, tmp_path / "c.pt")
    ds = open_dataset(tmp_path / "c.pt")
    assert torch.equal(torch.cat([b.embeddings for b in ds.batches(4)]), emb)


def test_a_pass_keeps_a_few_buffers_whatever_its_length(tmp_path, monkeypatch):
    ds = _shards(tmp_path)
    made = []
    original = readahead.mmap.mmap
    monkeypatch.setattr(readahead.mmap, "mmap", lambda *a, **k: made.append(a[1]) or original(*a, **k))
    chunks = [torch.tensor([i, i + 1]) for i in range(0, 30, 2)] * 4  # 60 chunks
    assert len(list(ReadAhead(ds, chunks))) == 60
    grown = [size for size in made if size > readahead.ALIGN]
    assert len(grown) <= readahead.READ_AHEAD_CHUNKS + 2  # each buffer grows once, to the largest chunk's need


def test_bytes_the_page_cache_holds_are_copied_the_rest_read_directly(tmp_path, monkeypatch):
    ds = _shards(tmp_path)
    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * 8192)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("this filesystem refuses O_DIRECT (the fallback is tested below)")
    direct = []
    original = readahead._pread_full

    def recording(fd, view, offset, need, path, is_direct=False):
        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        assert direct[-1] == is_direct
        if direct[-1]:
            assert offset % readahead.ALIGN == 0 and len(view) % readahead.ALIGN == 0
        return original(fd, view, offset, need, path, is_direct)

    monkeypatch.setattr(readahead, "_pread_full", recording)
    for cached in (False, True):
        direct.clear()
        monkeypatch.setattr(readahead._MINCORE, "resident", lambda fd, offset, length, vec=None, c=cached: c)
        got = list(ReadAhead(ds, [torch.tensor(c) for c in CHUNKS], direct=True))
        assert direct and set(direct) == {not cached}
        assert torch.equal(got[2], ds.read(CHUNKS[2]).embeddings)
    direct.clear()
    list(ReadAhead(ds, [torch.tensor([1, 2])], direct=False))  # FEDA2V_DIRECT_IO=0: through the page cache
    assert direct == [False]


def test_a_filesystem_that_refuses_direct_reads_is_read_through_the_page_cache(tmp_path, monkeypatch):
    ds = _shards(tmp_path)
    original = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return original(path, flags, *args)

    monkeypatch.setattr(readahead.os, "open", refusing)
    monkeypatch.setattr(readahead._MINCORE, "resident", lambda fd, offset, length, vec=None: False)
    chunks = [torch.tensor(c) for c in CHUNKS]
    for c, emb in zip(chunks, ReadAhead(ds, chunks, direct=True), strict=True):
        assert torch.equal(emb, ds.read(c).embeddings)


def test_direct_io_follows_the_environment(monkeypatch):
    monkeypatch.setenv("FEDA2V_DIRECT_IO", "0")
    assert not readahead.direct_io_allowed()
    monkeypatch.setenv("FEDA2V_DIRECT_IO", "1")
    assert readahead.direct_io_allowed() == hasattr(os, "O_DIRECT")


@pytest.mark.skipif(not readahead._MINCORE.ok, reason="mincore is Linux-only")
def test_residency_is_what_the_page_cache_holds(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * 1024))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 64 * 1024, 0)  # now cached
        assert readahead._MINCORE.resident(fd, 100, 50_000)
        assert not readahead._MINCORE.resident(fd, 0, 0)
        assert not readahead._MINCORE.resident(-1, 0, 10)  # cannot tell: read directly
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_truncated_after_it_was_opened_is_named(tmp_path, direct):
    emb = torch.randn(40, 64, 32)
    path = write_dataset(tmp_path / "d.safetensors", emb, torch.arange(40) % 2)
    ds = open_dataset(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 20 * 64 * 32 * 4)
    with pytest.raises(InputError, match=r"d\.safetensors: the file ends before the data its header describes"):
        list(ReadAhead(ds, [torch.arange(0, 10), torch.arange(10, 40)], direct=direct))


def test_stopping_early_stops_the_reader_and_closes_its_files(tmp_path):
    ds = _shards(tmp_path)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    threads = threading.active_count()
    stream = ds.batches(2)
    next(stream)
    assert threading.active_count() == threads + 1
    stream.close()
    assert threading.active_count() == threads
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_chunks_live_in_reused_buffers_that_are_never_taken_while_a_view_of_them_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "MIN_OUTPUT_BYTES", 0)  # the tiny chunks here too
    ds = _shards(tmp_path)
    chunks = [torch.tensor([i, i + 1, i + 2]) for i in range(0, 27, 3)] * 3
    stream = ReadAhead(ds, chunks)
    kept = []
    for i, emb in enumerate(stream):
        if i % 4 == 0:
            kept.append((chunks[i], emb[1:]))  # a view: its buffer stays taken
    assert all(torch.equal(v, ds.read(c[1:]).embeddings) for c, v in kept)
    assert len(stream._outputs) <= len(kept) + 2  # the others went back to the pass


def test_a_caller_that_keeps_every_chunk_gets_ordinary_tensors_past_a_few_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "MIN_OUTPUT_BYTES", 0)
    ds = _shards(tmp_path)
    chunks = [torch.tensor([i]) for i in range(32)]
    stream = ReadAhead(ds, chunks)
    kept = list(stream)
    assert len(stream._outputs) == readahead.MAX_OUTPUTS
    assert all(torch.equal(k, ds.read(c).embeddings) for c, k in zip(chunks, kept, strict=True))


def test_short_rows_scattered_get_buffers_of_their_runs_not_of_a_page_per_row(tmp_path, monkeypatch):
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", torch.randn(5000, 1, 1), torch.zeros(5000)))
    made = []
    original = readahead.mmap.mmap
    monkeypatch.setattr(readahead.mmap, "mmap", lambda *a, **k: made.append(a[1]) or original(*a, **k))
    chunks = [torch.arange(0, 4000), torch.arange(0, 4000, 2)]  # one run; 2,000 runs of one row each
    got = list(ReadAhead(ds, chunks, direct=False))
    assert torch.equal(got[1], ds.read(chunks[1]).embeddings)
    assert max(made) <= 2000 * readahead.ALIGN  # each run in whole pages; never rows x (row + 2 pages) bytes


def test_a_pass_is_iterated_once_and_a_closed_pass_says_so(tmp_path):
    ds = _shards(tmp_path)
    stream = ReadAhead(ds, [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])])
    assert len(list(stream)) == 3
    with pytest.raises(RuntimeError, match="once"):
        list(stream)
    stream = ReadAhead(ds, [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])])
    with pytest.raises(RuntimeError, match="closed"):
        for _ in stream:
            stream.close()


@pytest.mark.parametrize("garbage", [b"\x01", (5).to_bytes(8, "little") + b"[1,2]",
                                     (12).to_bytes(8, "little") + b'{"e": [1,2]}'])
def test_a_header_garbled_after_opening_is_named(tmp_path, garbage):
    path = write_dataset(tmp_path / "d.safetensors", torch.randn(8, 4, 3), torch.zeros(8))
    ds = open_dataset(path)
    path.write_bytes(garbage)
    with pytest.raises(InputError, match=r"d\.safetensors: cannot read its header again"):
        list(ds.batches(4))


@pytest.mark.parametrize("count", [1, 2])
def test_a_short_pass_makes_no_more_buffers_than_its_chunks_as_plan_counts(tmp_path, monkeypatch, count):
    ds = _shards(tmp_path)
    made = []
    original = readahead.mmap.mmap
    monkeypatch.setattr(readahead.mmap, "mmap", lambda *a, **k: made.append(a[1]) or original(*a, **k))
    chunks = [torch.tensor([i, i + 1]) for i in range(0, 2 * count, 2)]
    assert len(list(ReadAhead(ds, chunks))) == count
    read = [size for size in made if size > readahead.ALIGN]
    row_bytes = ds.seq_len * ds.dim * ds.storage_dtype.itemsize
    assert sum(read) <= readahead.pass_buffer_bytes(2, row_bytes, chunks=count)
    assert readahead.pass_buffer_bytes(2, row_bytes, chunks=count) \
        < readahead.pass_buffer_bytes(2, row_bytes, chunks=readahead.READ_AHEAD_CHUNKS + 2)
