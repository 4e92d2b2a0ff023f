"""Passes over full sequences, read ahead of their use by a background thread.

A pass that works on one chunk of clips after another (the reduce pass, ``evaluate``, ``analyze``, ``split``)
used to read each chunk through the memory map when it needed it: every page fault waited for the disk while
the arithmetic's threads spun, and the kernel's work of filling the page cache (and, on a virtual machine,
of handing it fresh memory) took the same cores. Measured on 2 cores, 6,000 AST clips, page cache dropped:
read + reduce + ``lstsq`` sums at 612-679 MB/s through the map, 1,360-1,478 MB/s read ahead (docs/performance.md).

:class:`ReadAhead` reads the next chunks' bytes (their byte ranges come from the safetensors header) into a
few reused, page-aligned buffers while the current chunk is worked on; the consumer converts each chunk to
the dtype asked for in one copy. Bytes that are not in the page cache are read with ``O_DIRECT``: the disk
writes straight into the buffer, the page cache is neither filled nor churned, and the memory used stays a
few chunks whatever the data's size. Bytes already cached (data just written, or read by something else) are
copied from the cache. Where ``O_DIRECT`` is refused (tmpfs, some network filesystems) or
``FEDA2V_DIRECT_IO=0`` is set, every read goes through the page cache.

Files in other forms (legacy ``.pt``, the original caches), and any file on a big-endian machine, are read as
before, one chunk at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError

#: chunks read ahead of the one being worked on (each holds one chunk's stored bytes)
READ_AHEAD_CHUNKS = 2

#: file offsets, lengths and buffer addresses of direct reads are multiples of this (the page size covers
#: every block size Linux filesystems use)
ALIGN = max(4096, mmap.PAGESIZE)

#: open files kept per pass (a pass moves through the shards in order)
OPEN_FILES = 4

_LITTLE_ENDIAN = sys.byteorder == "little"

#: largest safetensors header read to find where a file's rows lie
MAX_HEADER_BYTES = 100_000_000


def direct_io_allowed() -> bool:
    """Whether reads may bypass the page cache (``O_DIRECT``): Linux, and ``FEDA2V_DIRECT_IO`` not ``0``."""
    return hasattr(os, "O_DIRECT") and os.environ.get("FEDA2V_DIRECT_IO", "1").strip().lower() not in (
        "0", "false", "no", "off")


def buffer_bytes(rows: int, row_bytes: int) -> int:
    """Bytes of one read-ahead buffer for chunks of up to ``rows`` stored rows of ``row_bytes`` (each contiguous
    run padded to :data:`ALIGN` at both ends; at most one run per row)."""
    return rows * (row_bytes + 2 * ALIGN)


def pass_buffer_bytes(rows: int, row_bytes: int) -> int:
    """What a pass in chunks of ``rows`` keeps in read-ahead buffers: the chunk in use, the ones read ahead
    and the one being read (``plan`` counts this)."""
    return (READ_AHEAD_CHUNKS + 2) * buffer_bytes(rows, row_bytes)


def row_spans(path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (byte offset of the data, bytes per row)}`` of a safetensors file's tensors, from its header
    (read-ahead and ``Dataset.will_need``); the file was validated when the dataset was opened."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(fh.read(size))
    spans = {}
    for name, info in header.items():
        if name == "__metadata__" or not info.get("shape"):
            continue
        lo, hi = info["data_offsets"]
        spans[name] = (8 + size + int(lo), (int(hi) - int(lo)) // max(1, int(info["shape"][0])))
    return spans


_MAP_FAILED = ctypes.c_void_p(-1).value

#: ``sys.getrefcount`` of an output buffer no tensor uses: the pass's list, the loop variable, the call's argument
_UNUSED_REFS = 3


class _Mincore:
    """Which pages of a file range are in the page cache (``mincore`` on a throwaway read-only map; no I/O)."""

    def __init__(self) -> None:
        self.ok = False
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self._mmap, self._munmap, self._mincore = libc.mmap, libc.munmap, libc.mincore
        except (OSError, AttributeError):
            return
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.ok = True

    def resident(self, fd: int, offset: int, length: int, vec: Any = None) -> bool:
        """Whether every page of ``[offset, offset + length)`` is cached; False when that cannot be told.
        ``vec``: a ``ctypes`` byte array of at least a byte per page, for the answer (made if not given)."""
        if not self.ok or length <= 0:
            return False
        page = mmap.PAGESIZE
        start = offset // page * page
        size = offset + length - start
        pages = (size + page - 1) // page
        if vec is None or len(vec) < pages:
            vec = (ctypes.c_ubyte * pages)()
        addr = self._mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr is None or addr == _MAP_FAILED:
            return False
        try:
            if self._mincore(addr, size, vec) != 0:
                return False
            return all(vec[i] & 1 for i in range(pages))
        finally:
            self._munmap(addr, size)


_MINCORE = _Mincore()


class _Files:
    """The pass's open files: a buffered descriptor and, where allowed and accepted, an ``O_DIRECT`` one."""

    def __init__(self, direct: bool) -> None:
        self.direct_allowed = direct
        self._open: dict[Path, tuple[int, int | None]] = {}

    def get(self, path: Path) -> tuple[int, int | None]:
        if path in self._open:
            return self._open[path]
        if len(self._open) >= OPEN_FILES:
            self._close(next(iter(self._open)))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
        dfd = None
        if self.direct_allowed:
            try:
                dfd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:  # the filesystem refuses O_DIRECT (tmpfs, ...): through the page cache
                dfd = None
        self._open[path] = (fd, dfd)
        return fd, dfd

    def no_direct(self, path: Path) -> None:
        fd, dfd = self._open[path]
        if dfd is not None:
            os.close(dfd)
        self._open[path] = (fd, None)

    def _close(self, path: Path) -> None:
        for d in self._open.pop(path):
            if d is not None:
                os.close(d)

    def close(self) -> None:
        for path in list(self._open):
            self._close(path)


def _pread_full(fd: int, view: memoryview, offset: int, need: int, path: Path) -> None:
    """Read into ``view`` from ``offset`` until at least ``need`` bytes are in (a read past the end of the file
    may stop after them)."""
    got = 0
    while got < need:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise InputError(f"{path}: the file ends before the data its header describes (it changed or was "
                             f"truncated after it was opened)")
        got += n


class _Layout:
    """Where one chunk's runs lie in its buffer: ``(buffer offset, rows)`` per run, in sorted row order."""

    def __init__(self, buf: mmap.mmap, pieces: list[tuple[int, int]]) -> None:
        self.buf, self.pieces = buf, pieces


class ReadAhead:
    """Chunks of rows of a dataset's embeddings, read by a background thread ahead of their use.

    ``ds`` is a :class:`~feda2v_toolkit.data.dataset.Dataset` (not a view: ``Dataset.stream`` maps a view's rows).
    Iterating yields one ``[n, S, D]`` tensor of ``dtype`` per chunk of ``chunks`` (global row indices, any
    order, repeats allowed): the embeddings :meth:`Dataset.read` would return, before its finiteness check. Stop
    iterating early and the thread stops too (:meth:`close`)."""

    def __init__(self, ds: Any, chunks: Sequence[Tensor], *, dtype: torch.dtype = torch.float32,
                 direct: bool | None = None) -> None:
        self.ds, self.dtype = ds, dtype
        self.chunks = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in chunks]
        self.row_bytes = ds.seq_len * ds.dim * ds.storage_dtype.itemsize
        self.files = _Files(direct_io_allowed() if direct is None else direct)
        self._stop = threading.Event()
        self._ready: queue.Queue[Any] = queue.Queue()
        self._free: queue.Queue[mmap.mmap | None] = queue.Queue()
        self._buffer_bytes = buffer_bytes(max((c.numel() for c in self.chunks), default=0), self.row_bytes)
        for _ in range(READ_AHEAD_CHUNKS + 2):
            self._free.put(None)  # a buffer made on first use, reused for the rest of the pass
        self._vec = (ctypes.c_ubyte * (self._buffer_bytes // mmap.PAGESIZE + 2))()  # mincore's answer
        self._outputs: list[mmap.mmap] = []  # the chunks handed out live here (see _output)
        self._thread: threading.Thread | None = None

    # -- planned in the calling thread ---------------------------------------------------------------------
    def _plan(self, chunk: Tensor) -> list[tuple[Path, int, int, int]] | None:
        """``(file, first byte, end byte, rows)`` of each contiguous run of ``chunk``'s sorted distinct rows;
        ``None`` when a run lies in a file that is not a safetensors file (read as before)."""
        runs = list(self.ds._runs(torch.unique(chunk, sorted=True).tolist()))
        if not _LITTLE_ENDIAN or any(s.tensors is not None for s, _, _ in runs):  # safetensors: little-endian
            return None
        plan = []
        for source, lo, hi in runs:
            if source._spans is None:
                try:
                    source._spans = row_spans(source.path)
                except (OSError, ValueError) as exc:
                    raise InputError(f"{source.path}: cannot read its header again: {exc}") from None
            start, row_bytes = source._spans.get("embeddings", (0, 0))
            if row_bytes != self.row_bytes:
                raise InputError(f"{source.path}: its header changed after it was opened")
            plan.append((source.path, start + lo * row_bytes, start + hi * row_bytes, hi - lo))
        return plan

    # -- the reader (background thread): reads and nothing else, so that it allocates no memory the calling
    # thread's allocator would then have to work around (measured: a reader that also planned left the heap
    # fragmented, up to 1 GB more resident in `train --dp-epsilon`'s many short passes)
    def _read_chunk(self, buf: mmap.mmap, plan: list[tuple[Path, int, int, int]]) -> _Layout:
        view = memoryview(buf)
        pieces: list[tuple[int, int]] = []
        pos = 0
        for path, a, b, rows in plan:
            at = pos + a % ALIGN  # the buffer offset of byte a: congruent to a, so aligned offsets map to aligned
            fd, dfd = self.files.get(path)
            if dfd is not None and not _MINCORE.resident(fd, a, b - a, self._vec):
                lo_a = a - a % ALIGN
                length = -(-(b - lo_a) // ALIGN) * ALIGN
                try:
                    _pread_full(dfd, view[pos:pos + length], lo_a, b - lo_a, path)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.files.no_direct(path)  # stricter alignment than ALIGN: through the page cache
                    _pread_full(fd, view[at:at + b - a], a, b - a, path)
            else:
                _pread_full(fd, view[at:at + b - a], a, b - a, path)
            pieces.append((at, rows))
            pos += -(-(at - pos + b - a) // ALIGN) * ALIGN  # the next run starts aligned
        return _Layout(buf, pieces)

    def _reader(self, plans: list[list[tuple[Path, int, int, int]] | None]) -> None:
        try:
            for plan in plans:
                while True:
                    if self._stop.is_set():
                        return
                    try:
                        buf = self._free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                if buf is None:
                    buf = mmap.mmap(-1, self._buffer_bytes)  # page-aligned, as direct reads need
                self._ready.put(self._read_chunk(buf, plan) if plan is not None else (buf, None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._ready.put(exc)

    # -- the consumer ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tensor]:
        if not self.chunks:
            return
        plans = [self._plan(c) for c in self.chunks]
        self._thread = threading.Thread(target=self._reader, args=(plans,), name="feda2v-read-ahead", daemon=True)
        self._thread.start()
        try:
            for idx in self.chunks:
                item = self._ready.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Layout):
                    emb = self._assemble(item, idx)
                    self._free.put(item.buf)
                    yield emb
                else:  # a source that is not a safetensors file: read as before
                    self._free.put(item[0])
                    yield self.ds.read(idx, dtype=self.dtype, check_finite=False).embeddings
        finally:
            self.close()

    def _output(self, rows: int) -> Tensor:
        """A ``[rows, S, D]`` tensor of ``dtype`` in one of the pass's own output buffers that no tensor uses any
        more (a tensor made by ``torch.frombuffer`` holds a reference to its buffer until the last view of it
        is gone), else in a new one. The chunks thus never go through the allocator's heap, where 30 MB blocks
        freed among small allocations were split and not found again (measured: the heap of `train
        --dp-epsilon` grew by up to 1 GB over a pass); a consumer that keeps every chunk gets a buffer each."""
        size = rows * self.ds.seq_len * self.ds.dim * self.dtype.itemsize
        for buf in self._outputs:
            if len(buf) >= size and sys.getrefcount(buf) <= _UNUSED_REFS:
                break
        else:
            buf = mmap.mmap(-1, max(size, 1))
            self._outputs.append(buf)
        return torch.frombuffer(buf, dtype=self.dtype, count=size // self.dtype.itemsize).view(
            rows, self.ds.seq_len, self.ds.dim)

    def _assemble(self, layout: _Layout, idx: Tensor) -> Tensor:
        out = self._output(sum(rows for _, rows in layout.pieces))
        pos = 0
        for at, rows in layout.pieces:
            stored = torch.frombuffer(layout.buf, dtype=self.ds.storage_dtype, count=rows * self.row_bytes //
                                      self.ds.storage_dtype.itemsize, offset=at)
            out[pos:pos + rows].copy_(stored.view(rows, self.ds.seq_len, self.ds.dim))  # converts in the copy
            del stored
            pos += rows
        if out.shape[0] == idx.numel() and bool((idx[1:] > idx[:-1]).all()):  # sorted, distinct: as asked
            return out
        return out[torch.unique(idx, sorted=True, return_inverse=True)[1]]

    def close(self) -> None:
        """Stop the reader and close the files (iterating to the end does this)."""
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a reader waiting for a free buffer; drain what it made
                try:
                    self._ready.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()
            self._thread = None
        self.files.close()
