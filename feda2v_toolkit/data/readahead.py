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
import errno
import json
import mmap
import os
import queue
import struct
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError
from feda2v_toolkit.runtime.malloc import libc

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


def run_bytes(first: int, end: int) -> int:
    """Buffer bytes of the run of file bytes ``[first, end)``: whole :data:`ALIGN` blocks around it."""
    return -(-(first % ALIGN + end - first) // ALIGN) * ALIGN


def pass_buffer_bytes(rows: int, row_bytes: int, chunks: int, runs: int = 2) -> int:
    """What a pass of ``chunks`` chunks of ``rows`` stored rows, each in at most ``runs`` contiguous runs (2: a
    chunk of consecutive rows that crosses a file boundary), keeps in read-ahead buffers: the chunk being read,
    the ones read ahead and the one in use -- no more buffers than the pass has chunks (each is made on first
    use; ``plan`` counts this)."""
    return max(1, min(chunks, READ_AHEAD_CHUNKS + 2)) * (rows * row_bytes + runs * 2 * ALIGN)


def row_spans(path: Path) -> dict[str, tuple[int, int, int]]:
    """``{name: (byte offset of the data, bytes per row, rows)}`` of a safetensors file's tensors, from its header
    (read-ahead and the hints of scattered reads); the file was validated when the dataset was opened."""
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
        rows = int(info["shape"][0])
        spans[name] = (8 + size + int(lo), (int(hi) - int(lo)) // max(1, rows), rows)
    return spans


_MAP_FAILED = ctypes.c_void_p(-1).value

#: chunks smaller than this are handed out in ordinary tensors (the heap handles them well)
MIN_OUTPUT_BYTES = 1 << 20

#: output buffers a pass keeps; past them (a caller that keeps its chunks) ordinary tensors are made
MAX_OUTPUTS = 8


class _Mincore:
    """Which pages of a file range are in the page cache (``mincore`` on a throwaway read-only map; no I/O)."""

    def __init__(self) -> None:
        self._ok: bool | None = None  # looked up on first use

    @property
    def ok(self) -> bool:
        if self._ok is None:
            self._ok = self._load()
        return self._ok

    def _load(self) -> bool:
        try:
            c = libc()
            self._mmap, self._munmap, self._mincore = c.mmap, c.munmap, c.mincore  # type: ignore[union-attr]
        except AttributeError:  # no C library, or one without these
            return False
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return True

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


def _pread_full(fd: int, view: memoryview, offset: int, need: int, path: Path, direct: bool = False) -> None:
    """Read into ``view`` from ``offset`` until at least ``need`` bytes are in (a read past the end of the file
    may stop after them). A direct read's ``EINVAL`` (alignment refused) is raised as it is, for the caller to
    read through the page cache instead; every other failure is an :class:`InputError` naming the file."""
    got = 0
    while got < need:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
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
        self._buffer_bytes = 0  # the largest chunk's need, from the plans (__iter__)
        for _ in range(READ_AHEAD_CHUNKS + 2):
            self._free.put(None)  # a buffer made on first use, reused for the rest of the pass
        self._vec: Any = None  # mincore's answer, a byte per page of the largest run
        self._used = False
        self._outputs: list[tuple[mmap.mmap, Any]] = []  # the chunks handed out live here (see _output)
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
                except Exception as exc:  # noqa: BLE001 -- any garbled header: the file changed since it was opened
                    raise InputError(f"{source.path}: cannot read its header again (it changed after it was "
                                     f"opened?): {exc}") from None
            start, row_bytes, count = source._spans.get("embeddings", (0, 0, 0))
            if row_bytes != self.row_bytes or hi > count:
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
                    _pread_full(dfd, view[pos:pos + length], lo_a, b - lo_a, path, True)
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
                    buf = mmap.mmap(-1, self._buffer_bytes, flags=mmap.MAP_PRIVATE)  # page-aligned for direct reads
                self._ready.put(self._read_chunk(buf, plan) if plan is not None else (buf, None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._ready.put(exc)

    # -- the consumer ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tensor]:
        if self._used:
            raise RuntimeError("a ReadAhead pass can be iterated once")
        self._used = True
        if not self.chunks:
            return
        plans = [self._plan(c) for c in self.chunks]
        needs = [[run_bytes(a, b) for _, a, b, _ in plan] for plan in plans if plan]
        self._buffer_bytes = max((sum(n) for n in needs), default=ALIGN)
        self._vec = (ctypes.c_ubyte * (max((max(n) for n in needs), default=ALIGN) // mmap.PAGESIZE + 2))()
        self._thread = threading.Thread(target=self._reader, args=(plans,), name="feda2v-read-ahead", daemon=True)
        self._thread.start()
        try:
            for idx in self.chunks:
                item = self._next()
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

    def _next(self) -> Any:
        """The reader's next item; an error if the reader stopped without one (the pass was closed)."""
        while True:
            try:
                return self._ready.get(timeout=1.0)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:
                        return self._ready.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the read-ahead pass was closed") from None

    def _output(self, rows: int) -> Tensor:
        """A ``[rows, S, D]`` tensor of ``dtype`` in one of the pass's own output buffers that no tensor uses any
        more, else in a new one. Each tensor is made from a fresh ``memoryview`` of its buffer, which the tensor
        and every view of it keep alive: the buffer is free again once that memoryview is gone (a weak
        reference tells). The chunks thus stay off the allocator's heap, where 30 MB blocks freed among small
        allocations were split and not found again (measured: the heap of `train --dp-epsilon` grew by up to
        1 GB over a pass). Small chunks, and chunks past :data:`MAX_OUTPUTS` kept by the caller, are ordinary
        tensors."""
        shape = (rows, self.ds.seq_len, self.ds.dim)
        size = rows * self.ds.seq_len * self.ds.dim * self.dtype.itemsize
        if size < MIN_OUTPUT_BYTES:
            return torch.empty(shape, dtype=self.dtype)
        i = next((k for k, (buf, used) in enumerate(self._outputs)
                  if len(buf) >= size and (used is None or used() is None)), None)
        if i is None:
            if len(self._outputs) >= MAX_OUTPUTS:
                return torch.empty(shape, dtype=self.dtype)
            i = len(self._outputs)
            self._outputs.append((mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), None))
        buf = self._outputs[i][0]
        view = memoryview(buf)
        self._outputs[i] = (buf, weakref.ref(view))
        out = torch.frombuffer(view, dtype=self.dtype, count=size // self.dtype.itemsize).view(shape)
        del view
        return out

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
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            while True:  # drain what the reader made; it stops at its next wait for a free buffer
                try:
                    self._ready.get_nowait()
                except Exception:  # noqa: BLE001 -- queue.Empty (or the queue module gone at interpreter exit)
                    break
            thread.join()
        self.files.close()
