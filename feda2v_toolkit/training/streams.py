"""Data streams of a site: full sequences in bounded chunks, the reduced cache, (reduced, full) pairs.

The full ``[L, D]`` sequences are only ever read in chunks of :data:`READ_CHUNK_BYTES`; every sequence is
reduced once into a :class:`ReducedCache` (``[N, l, D]`` float32), which the generators train from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Reducer, Upsampler
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

#: bytes of full-length float32 sequences read per chunk (bounded memory)
READ_CHUNK_BYTES = 32 * 2**20


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
    """Every sequence of a dataset reduced once: raw until :meth:`standardize`, standardised in place after.

    ``labels`` are the site's labels mapped to the run's class indices; ``conditions`` the per-sample
    condition embeddings (or ``None``).
    """

    def __init__(self, values: Tensor, labels: Tensor, conditions: Tensor | None) -> None:
        self.values = values
        self.labels = labels
        self.conditions = conditions
        self.standardized = False

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the raw reduced values and the labels: what a resumed run must match."""
        h = hashlib.sha256(self.labels.numpy().tobytes())
        h.update(memoryview(self.values.contiguous().numpy()).cast("B"))
        return h.hexdigest()[:16]

    def standardize(self, normalization: dict[str, Tensor]) -> None:
        if normalization and not self.standardized:
            self.values.sub_(normalization["mean"]).div_(normalization["std"])
        self.standardized = True

    def reader(self, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]:
        def read(rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            cond = self.conditions[rows].to(device) if self.conditions is not None else None
            return self.values[rows].to(device, non_blocking=True), self.labels[rows].to(device), cond

        return read


def upsampler_pairs(ds: Dataset, indices: Tensor, reduced: Tensor, rows: int, seed: int,
                    *ids: Any) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """(reduced, full) float32 pairs over ``indices`` in chunks, the chunk order reshuffled per call (call ``k``
    uses ``derive_seed(seed, "upsampler-pairs", *ids, k)``). ``reduced`` holds the raw reduced sequences of
    the whole dataset, by index."""
    calls = [0]

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(derive_seed(seed, "upsampler-pairs", *ids, calls[0]))
        calls[0] += 1
        starts = torch.arange(0, indices.numel(), rows)
        for s in starts[torch.randperm(starts.numel(), generator=g)].tolist():
            chunk = indices[s:s + rows]
            yield reduced[chunk], ds.read(chunk).embeddings

    return pairs


def heldout_reconstruction(ds: Dataset, indices: Tensor, reduced: Tensor, upsampler: Upsampler,
                           device: torch.device) -> dict[str, Tensor]:
    """Sums (float64, mergeable over sites) for the held-out reconstruction error of ``upsampler`` and of linear
    interpolation: squared errors ``sse``/``sse_linear``, the squared norm ``sumsq`` and per-position sums
    ``total [L, D]`` of the held-out full sequences, and their ``count``; see :func:`reconstruction_metrics`."""
    f64 = torch.float64
    out = {"sse": torch.zeros((), dtype=f64), "sse_linear": torch.zeros((), dtype=f64),
           "sumsq": torch.zeros((), dtype=f64), "total": torch.zeros(ds.seq_len, ds.dim, dtype=f64),
           "count": torch.zeros((), dtype=f64)}
    rows = read_chunk_rows(ds)
    upsampler.eval()
    with torch.no_grad():
        for s in range(0, indices.numel(), rows):
            chunk = indices[s:s + rows]
            full = ds.read(chunk).embeddings.to(device)
            red = reduced[chunk].to(device)
            out["sse"] += float(torch.dist(full, upsampler(red, ds.seq_len).float())) ** 2
            out["sse_linear"] += float(torch.dist(full, interpolate_sequence(red, ds.seq_len, "linear"))) ** 2
            out["sumsq"] += float(torch.linalg.vector_norm(full)) ** 2
            out["total"] += full.sum(0, dtype=f64).cpu()
            out["count"] += full.shape[0]
    return out


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
