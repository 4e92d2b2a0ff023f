"""Data streams of a site: full sequences in bounded chunks, the reduced cache, (reduced, full) pairs.

The full ``[L, D]`` sequences are only ever read in chunks of :data:`READ_CHUNK_BYTES`; every sequence is
reduced once into a :class:`ReducedCache` (``[N, l, D]`` float32), which the generators train from.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Reducer, Upsampler
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.runtime.scratch import read_at, write_at
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

#: bytes of full-length float32 sequences read per chunk (bounded memory)
READ_CHUNK_BYTES = 32 * 2**20

#: blocks a file-backed :class:`ReducedCache` holds on their way to its file (bounded memory)
PENDING_WRITES = 2


def chunk_rows(seq_len: int, dim: int) -> int:
    """Full sequences ``[seq_len, dim]`` (float32) per read chunk of :data:`READ_CHUNK_BYTES`."""
    return max(1, READ_CHUNK_BYTES // (seq_len * dim * 4))


def read_chunk_rows(ds: Dataset) -> int:
    return chunk_rows(ds.seq_len, ds.dim)


def full_batches(ds: Dataset, indices: Tensor, rows: int | None = None) -> Callable[[], Iterator[Tensor]]:
    """A re-iterable stream of full-length float32 batches ``[B, L, D]`` over ``indices``."""
    rows = rows or read_chunk_rows(ds)

    def batches() -> Iterator[Tensor]:
        for batch in ds.batches(rows, indices):
            yield batch.embeddings

    return batches


def reduce_dataset(ds: Dataset, reducer: Reducer, indices: Tensor | None = None, *,
                   device: torch.device | str = "cpu") -> Tensor:
    """Reduce every (or the given) sequence once, streaming: ``[n, l, D]`` float32 on CPU."""
    idx = torch.arange(len(ds)) if indices is None else indices
    out = torch.empty(idx.numel(), reducer.length, ds.dim)
    pos = 0
    with torch.no_grad():
        for batch in ds.batches(read_chunk_rows(ds), idx):
            r = reducer(batch.embeddings.to(device))
            out[pos:pos + r.shape[0]] = r.to("cpu", torch.float32)
            pos += r.shape[0]
    return out


class ReducedCache:
    """Every sequence of a site reduced once (``[N, l, D]`` float32, raw), in memory or -- when it is larger than
    the memory budget allows (:func:`feda2v_toolkit.runtime.resources.cache_in_memory`) -- in an unlinked
    temporary file read with ``pread`` (the page cache, not this process, holds what fits; the file disappears
    with the process, however it ends). Writes to the file are made by a background thread (at most
    :data:`PENDING_WRITES` blocks waiting, as :class:`~feda2v_toolkit.data.writer.DatasetWriter` writes shards),
    so the pass that reduces the data goes on computing while the kernel takes the pages (on the benchmark's
    virtual machine, filling the page cache took 5-9 s of a 16k-clip pass); every read waits for the writes
    before it. A pending write holds the cache, so its file stays open until the write is done.

    ``labels`` are the site's labels mapped to the run's class indices; ``conditions`` the per-sample
    condition embeddings (or ``None``). After :meth:`standardize`, :meth:`read` returns standardised rows
    (``(raw - mean) / std``, computed on every read: the same float32 numbers as standardising in place);
    :meth:`raw` always returns the raw ones.
    """

    def __init__(self, rows: int, length: int, dim: int, labels: Tensor, conditions: Tensor | None, *,
                 in_memory: bool = True, directory: str | None = None) -> None:
        self.rows, self.length, self.dim = int(rows), int(length), int(dim)
        self.labels = labels
        self.conditions = conditions
        self.normalization: dict[str, Tensor] | None = None
        self.row_bytes = self.length * self.dim * 4
        self._values: Tensor | None = None
        self._file: Any = None
        self._writer: ThreadPoolExecutor | None = None  # a file-backed cache's writer, started by the first write
        self._pending: deque[Future[None]] = deque()
        self._error: BaseException | None = None
        if in_memory:
            self._values = torch.empty(self.rows, self.length, self.dim)  # every row is written before it is read
        else:
            import tempfile

            self._file = tempfile.TemporaryFile(prefix="feda2v-reduced-", dir=directory)  # noqa: SIM115 (closed by close())
            self._closer = weakref.finalize(self, self._file.close)  # closed with the cache at the latest
            self._file.truncate(self.rows * self.row_bytes)

    @property
    def in_memory(self) -> bool:
        return self._values is not None

    @property
    def standardized(self) -> bool:
        return self.normalization is not None

    def close(self) -> None:
        """Release the temporary file now, once the writes queued so far are done (an in-memory cache: nothing to
        do)."""
        if self._file is not None:
            if self._writer is not None:
                self._writer.shutdown(wait=True)  # the writes already running end; the others are made too
                self._writer = None
            self._closer()  # the finalizer's close, run now (and never again)
            self._file = None

    def write(self, start: int, values: Tensor) -> None:
        """Rows ``start .. start + len(values)`` (raw). A file-backed cache writes them in the background and
        keeps ``values`` until then: the caller must not change them afterwards. An error of an earlier write
        (a full disk) is raised here or by the next read."""
        values = values.to("cpu", torch.float32).contiguous()
        if self._values is not None:
            self._values[start:start + values.shape[0]] = values
            return
        while len(self._pending) > PENDING_WRITES:  # the one being written and PENDING_WRITES waiting
            self._wait_oldest()
        if self._error is not None:
            raise self._error
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feda2v-cache-writer")
        self._pending.append(self._writer.submit(self._pwrite, start * self.row_bytes, values))

    def _pwrite(self, offset: int, values: Tensor) -> None:
        write_at(self._file.fileno(), memoryview(values.numpy()).cast("B"), offset)

    def _wait_oldest(self) -> None:
        """Wait for the oldest pending write; its error is kept and raised by every later write or read."""
        try:
            self._pending.popleft().result()
        except Exception as exc:  # a Ctrl-C while waiting goes straight through
            if self._error is None:
                self._error = exc

    def flush(self) -> None:
        """Wait until every row given to :meth:`write` is in the file; raise the first write's error, if any."""
        while self._pending:
            self._wait_oldest()
        if self._error is not None:
            raise self._error

    def raw(self, rows: Tensor) -> Tensor:
        """Rows ``rows`` (any order, repeats allowed), raw: ``[len(rows), l, D]`` float32."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if self._values is not None:
            return self._values[rows]
        self.flush()
        out = torch.empty(rows.numel(), self.length, self.dim)
        if rows.numel() == 0:
            return out
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        got = torch.empty(unique.numel(), self.length, self.dim)
        buf = memoryview(got.numpy()).cast("B")
        u = unique.tolist()
        i = 0
        while i < len(u):  # one pread per run of consecutive rows
            j = i
            while j + 1 < len(u) and u[j + 1] == u[j] + 1:
                j += 1
            read_at(self._file.fileno(), buf[i * self.row_bytes:(j + 1) * self.row_bytes], u[i] * self.row_bytes,
                    "the reduced cache")
            i = j + 1
        return got if unique.numel() == rows.numel() and torch.equal(unique, rows) else got[inverse]

    def read(self, rows: Tensor) -> Tensor:
        """Rows ``rows``, standardised once :meth:`standardize` was called."""
        x = self.raw(rows)  # a copy: indexing by a tensor copies
        if self.normalization:
            x.sub_(self.normalization["mean"]).div_(self.normalization["std"])
        return x

    def standardize(self, normalization: dict[str, Tensor]) -> None:
        """From now on :meth:`read` returns standardised rows (an empty ``normalization``: raw rows)."""
        if self.normalization is None:
            self.normalization = dict(normalization)

    def reader(self, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]:
        def read(rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            cond = self.conditions[rows].to(device) if self.conditions is not None else None
            return self.read(rows).to(device, non_blocking=True), self.labels[rows].to(device), cond

        return read


def block_digest(values: Tensor) -> bytes:
    """SHA-256 of raw reduced values (one block of a :class:`ReducedCache`)."""
    return hashlib.sha256(memoryview(values.contiguous().numpy()).cast("B")).digest()


def cache_fingerprint(labels: Tensor, digests: list[bytes]) -> str:
    """What a resumed run must match (16 hex digits): the labels and the blocks' :func:`block_digest`, in order."""
    h = hashlib.sha256(labels.numpy().tobytes())
    for d in digests:
        h.update(d)
    return h.hexdigest()[:16]


def upsampler_pairs(ds: Dataset, indices: Tensor, reduced: Callable[[Tensor], Tensor], rows: int, seed: int,
                    *ids: Any) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """(reduced, full) float32 pairs over ``indices`` in chunks, the chunk order reshuffled per call (call ``k``
    uses ``derive_seed(seed, "upsampler-pairs", *ids, k)``). ``reduced(rows)`` reads the raw reduced sequences
    of the dataset by index (:meth:`ReducedCache.raw`)."""
    calls = [0]

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(derive_seed(seed, "upsampler-pairs", *ids, calls[0]))
        calls[0] += 1
        starts = torch.arange(0, indices.numel(), rows)
        for batch in ds.stream([indices[s:s + rows] for s in starts[torch.randperm(starts.numel(), generator=g)].tolist()]):
            yield reduced(batch.indices), batch.embeddings

    return pairs


def heldout_reconstruction(ds: Dataset, indices: Tensor, reduced: Callable[[Tensor], Tensor], upsampler: Upsampler,
                           device: torch.device) -> dict[str, Tensor]:
    """Sums (float64, mergeable over sites) for the held-out reconstruction error of ``upsampler`` and of linear
    interpolation (``reduced(rows)``: the raw reduced rows): squared errors ``sse``/``sse_linear``, the squared norm ``sumsq`` and per-position sums
    ``total [L, D]`` of the held-out full sequences, and their ``count``; see :func:`reconstruction_metrics`."""
    f64 = torch.float64
    out = {"sse": torch.zeros((), dtype=f64), "sse_linear": torch.zeros((), dtype=f64),
           "sumsq": torch.zeros((), dtype=f64), "total": torch.zeros(ds.seq_len, ds.dim, dtype=f64),
           "count": torch.zeros((), dtype=f64)}
    rows = read_chunk_rows(ds)
    upsampler.eval()
    with torch.no_grad():
        for batch in ds.batches(rows, indices):
            full = batch.embeddings.to(device)
            red = reduced(batch.indices).to(device)
            pred, lin = upsampler(red, ds.seq_len).float(), interpolate_sequence(red, ds.seq_len, "linear")
            out["sse"] += squared_norm(pred - full)
            out["sse_linear"] += squared_norm(lin - full)
            # the norms and sums about the chunk's first sequence, in float32, then float64: the positional
            # pattern every sequence shares cancels before any float32 rounding, and R^2's total sum of squares
            # (sumsq - |total|^2 / n, a small difference of large numbers) keeps its digits
            ref = full[0].to(f64)
            dev = full - full[0]
            dev_sum = dev.sum(0).to(f64)
            out["sumsq"] += squared_norm(dev) + (2 * dev_sum * ref + full.shape[0] * ref.square()).sum().cpu()
            out["total"] += (full.shape[0] * ref + dev_sum).cpu()
            out["count"] += full.shape[0]
    return out


def squared_norm(x: Tensor) -> Tensor:
    """``||x||^2`` in float64 from float32 ``x`` ``[..., D]``: float32 norms of the rows (short sums, exact to
    ~1e-7 relative), squared and summed in float64 -- a float32 sum over millions of elements would lose ~1e-4."""
    return torch.linalg.vector_norm(x, dim=-1).to(torch.float64).square().sum().cpu()


def reconstruction_metrics(sums: dict[str, Tensor], seq_len: int, dim: int) -> dict[str, float]:
    """MSE per element and R^2 about the held-out set's per-position mean, for the upsampler and for linear
    interpolation, from (merged) :func:`heldout_reconstruction` sums; ``{}`` without held-out sequences."""
    n = float(sums["count"])
    if n == 0:
        return {}
    sst = float(sums["sumsq"]) - float(sums["total"].square().sum()) / n if n >= 2 else 0.0
    elements = n * seq_len * dim

    def r2(sse: float) -> float:
        return 1.0 - sse / sst if sst > 0 else float("nan")

    sse, sse_lin = float(sums["sse"]), float(sums["sse_linear"])
    return {"heldout_mse": sse / elements, "heldout_mse_linear": sse_lin / elements, "heldout_r2": r2(sse),
            "heldout_r2_linear": r2(sse_lin)}
