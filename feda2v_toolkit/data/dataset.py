"""The dataset format: safetensors files or shard directories of AST-style embedding sequences.

A dataset is a ``.safetensors`` file, or a directory of ``*.safetensors`` shards read in name order.
Each file holds

* ``embeddings`` ``[n, S, D]`` float32, float16 or bfloat16,
* ``labels`` ``[n]`` integers (index into the class names),
* optionally ``conditions`` ``[n, C]`` per-sample condition embeddings,

and string metadata ``feda2v_format = "dataset"``, ``format_version`` and ``class_names`` (a JSON list).
Reading goes through safetensors' memory map, a batch at a time, so data larger than memory streams.
Legacy PyTorch caches (``.pt`` dicts of tensors) are read with ``torch.load(weights_only=True)``.
See ``docs/data.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from feda2v_toolkit.data.readahead import ReadAhead, row_spans
from feda2v_toolkit.errors import InputError, UsageError, short_list

FORMAT = "dataset"
FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: default shard size for writers (bytes of embeddings per shard)
DEFAULT_SHARD_BYTES = 256 * 2**20
#: labels of a dataset without ``class_names`` must lie below this (class_0 .. class_N are made up)
MAX_UNNAMED_CLASSES = 100_000
_LEGACY_EMBEDDING_KEYS = ("embeddings", "audio_embeddings", "features", "x")
_LEGACY_LABEL_KEYS = ("labels", "targets", "y")


def mmap_error(path: Path, exc: BaseException) -> UsageError | None:
    """A one-line :class:`UsageError` when a file cannot be memory-mapped because it is larger than the
    process's address space (``ulimit -v``), which safetensors reports as ``unable to mmap``, an ``ENOMEM``
    OS error or a ``MemoryError``; ``None`` for anything else."""
    text = str(exc).lower()
    if not ("mmap" in text or isinstance(exc, MemoryError) or getattr(exc, "errno", None) == 12
            or "os error 12" in text):
        return None
    try:
        size = f" ({path.stat().st_size / 2**30:.1f} GiB)"
    except OSError:
        size = ""
    return UsageError(f"{path}: cannot memory-map the file{size}: it is larger than this process may map "
                      "(ulimit -v); raise the virtual memory limit or split the dataset into shards")


@dataclass
class Batch:
    """A batch read from a dataset: float32 embeddings, long labels, optional float32 conditions."""

    embeddings: Tensor
    labels: Tensor
    conditions: Tensor | None
    indices: Tensor


@dataclass
class _Source:
    """One file of a dataset: where its rows sit in the global index."""

    path: Path
    start: int
    count: int
    tensors: dict[str, Tensor] | None = None  # legacy .pt content (already in memory / mmapped)
    _spans: dict[str, tuple[int, int, int]] | None = field(default=None, repr=False, compare=False)

    def will_need(self, name: str, lo: int, hi: int) -> None:
        """Ask the kernel to start reading rows ``[lo, hi)`` of tensor ``name`` into the page cache
        (``posix_fadvise(WILLNEED)``; returns at once). A hint: nothing happens where it cannot be given.

        Rows read through the memory map one after another are read ahead by the kernel; rows scattered over
        a file are not, and each costs a synchronous read of a page or a few at a time (measured: a tenth of
        the clips of a cold 2 GB range at 250 MB/s, 1.5 GB/s once hinted)."""
        if self.tensors is not None or not hasattr(os, "posix_fadvise"):
            return
        try:
            if self._spans is None:
                self._spans = row_spans(self.path)
            start, row_bytes, _ = self._spans[name]
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start + lo * row_bytes, (hi - lo) * row_bytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except Exception:  # noqa: BLE001 -- a hint never fails; a file changed since it was opened: reading it says so
            self._spans = self._spans or {}

    def read(self, name: str, lo: int, hi: int) -> Tensor:
        if self.tensors is not None:
            return self.tensors[name][lo:hi]
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                return fh.get_slice(name)[lo:hi]
        except (SafetensorError, OSError, MemoryError) as exc:
            raise mmap_error(self.path, exc) or InputError(f"{self.path}: cannot read {name!r}: {exc}") from None


def check_sequence_shape(path: Path, shape: Sequence[int]) -> None:
    """Refuse (:class:`InputError`, one line naming ``path``) embeddings ``[n, S, D]`` with ``S < 1`` or ``D < 1``:
    such sequences hold no values, and every size derived from them divides by zero."""
    if len(shape) == 3 and (shape[1] < 1 or shape[2] < 1):
        raise InputError(f"{path}: 'embeddings' must be [N, S, D] with sequence length S >= 1 and width D >= 1, "
                         f"found shape {list(shape)}")


def contiguous_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` runs of sorted row numbers."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _hint(runs: Sequence[tuple[_Source, int, int]], name: str) -> None:
    for source, lo, hi in runs:
        source.will_need(name, lo, hi)


def _class_names_from_metadata(path: Path, meta: dict[str, str] | None) -> list[str] | None:
    if not meta or "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata 'class_names' is not JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{path}: metadata 'class_names' is not a JSON list of strings: nested too deeply") from None
    return _checked_class_names(path, names)


def _checked_class_names(path: Path, names: Any) -> list[str]:
    if not (isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)):
        raise InputError(f"{path}: metadata 'class_names' must be a JSON list of strings")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: metadata 'class_names' has duplicates")
    return list(names)


class Dataset:
    """A read-only, lazily read dataset (see the module docstring for the format).

    Attributes:
        path: what was opened; ``num_samples`` / ``seq_len`` / ``dim``: the shape ``[N, S, D]``;
        storage_dtype: the embeddings' dtype on disk; ``labels``: every label (``[N]``, long);
        class_names: label ``i`` is ``class_names[i]``; ``condition_dim``: ``C`` or 0.
    """

    def __init__(self, path: Path, sources: list[_Source], *, seq_len: int, dim: int,
                 storage_dtype: torch.dtype, labels: Tensor, class_names: list[str], condition_dim: int) -> None:
        self.path = path
        self.sources = sources
        self.seq_len = seq_len
        self.dim = dim
        self.storage_dtype = storage_dtype
        self.labels = labels
        self.class_names = class_names
        self.condition_dim = condition_dim

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def nbytes(self) -> int:
        """Bytes of embeddings on disk."""
        return len(self) * self.seq_len * self.dim * self.storage_dtype.itemsize

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def read(self, indices: Tensor | Sequence[int], *, dtype: torch.dtype = torch.float32,
             check_finite: bool = True) -> Batch:
        """Read rows by global index (any order); contiguous runs are read with one slice each."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            empty = torch.empty(0, self.seq_len, self.dim, dtype=dtype)
            cond = torch.empty(0, self.condition_dim) if self.condition_dim else None
            return Batch(empty, idx.clone(), cond, idx.clone())
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise UsageError(f"{self.path}: index out of range (dataset has {len(self)} samples)")
        emb = self._gather("embeddings", idx, dtype, (self.seq_len, self.dim))
        cond = self._gather("conditions", idx, torch.float32, (self.condition_dim,)) if self.condition_dim else None
        if check_finite:
            self.check_finite(emb, idx)
        return Batch(emb, self.labels[idx], cond, idx)

    def read_conditions(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The ``conditions`` rows ``[n, C]`` (float32) of the given samples, without reading embeddings."""
        if not self.condition_dim:
            raise InputError(f"{self.path}: holds no 'conditions' tensor")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            return torch.empty(0, self.condition_dim)
        out = self._gather("conditions", idx, torch.float32, (self.condition_dim,))
        if not bool(torch.isfinite(out).all()):
            raise InputError(f"{self.path}: 'conditions' contain NaN or inf values")
        return out

    def _gather(self, name: str, idx: Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]) -> Tensor:
        """Rows ``idx`` (any order, repeats allowed) of tensor ``name`` as ``dtype``: each contiguous run of
        the sorted distinct indices is one slice, copied straight into the output."""
        unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        runs = list(self._runs(unique.tolist()))
        if len(runs) > 1:  # scattered rows: start every run's read now, the copies below then find them read
            _hint(runs, name)
        if len(runs) == 1:
            source, lo, hi = runs[0]
            out = source.read(name, lo, hi).to(dtype)
        else:
            out = torch.empty(unique.numel(), *row_shape, dtype=dtype)
            pos = 0
            for source, lo, hi in runs:
                out[pos:pos + hi - lo].copy_(source.read(name, lo, hi))
                pos += hi - lo
        in_order = unique.numel() == idx.numel() and torch.equal(unique, idx)
        return out if in_order else out[inverse]

    def batches(self, batch_size: int, indices: Tensor | Sequence[int] | None = None, *,
                dtype: torch.dtype = torch.float32, check_finite: bool = True) -> Iterator[Batch]:
        """Stream batches of at most ``batch_size`` rows, in the given order (default: all, in order)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        yield from self.stream([idx[s:s + batch_size] for s in range(0, idx.numel(), batch_size)], dtype=dtype,
                               check_finite=check_finite)

    def stream(self, chunks: Sequence[Tensor], *, dtype: torch.dtype = torch.float32,
               check_finite: bool = True) -> Iterator[Batch]:
        """One :class:`Batch` per chunk of ``chunks`` (row indices, any order), as :meth:`read` returns it, each
        read by a background thread ahead of its use (:class:`~feda2v_toolkit.data.readahead.ReadAhead`)."""
        idx = self._chunks(chunks)
        for c, emb in zip(idx, ReadAhead(self, idx, dtype=dtype), strict=True):
            if check_finite:
                self.check_finite(emb, c)
            cond = self._gather("conditions", c, torch.float32, (self.condition_dim,)) if self.condition_dim else None
            yield Batch(emb, self.labels[c], cond, c)

    def _chunks(self, chunks: Sequence[Tensor]) -> list[Tensor]:
        """``chunks`` as flat long tensors, the empty ones left out; an index out of range is refused."""
        idx = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in chunks]
        for c in idx:
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= len(self)):
                raise UsageError(f"{self.path}: index out of range (dataset has {len(self)} samples)")
        return [c for c in idx if c.numel()]

    def _runs(self, values: list[int]) -> Iterator[tuple[_Source, int, int]]:
        """Yield ``(source, lo, hi)`` slices covering sorted, unique global indices."""
        i, src_i = 0, 0
        while i < len(values):
            while values[i] >= self.sources[src_i].start + self.sources[src_i].count:
                src_i += 1
            src = self.sources[src_i]
            end = src.start + src.count
            j = i
            while j + 1 < len(values) and values[j + 1] == values[j] + 1 and values[j + 1] < end:
                j += 1
            yield src, values[i] - src.start, values[j] - src.start + 1
            i = j + 1

    def check_finite(self, emb: Tensor, idx: Tensor, *, summary: Tensor | None = None) -> None:
        """Refuse (:class:`InputError`, naming the file and the sample) rows ``idx`` of this dataset whose
        values ``emb [B, ...]`` hold a NaN or inf.

        ``summary [B, ...]``, if given, is a smaller tensor computed from ``emb`` that is non-finite in a row
        wherever that row of ``emb`` is (a reducer's output, see
        :attr:`~feda2v_toolkit.components.Reducer.propagates_non_finite`): only the rows it flags are then
        looked at, so a pass that computes it anyway saves a read of the full values."""
        if summary is None:
            if bool(torch.isfinite(emb.sum())):  # NaN or inf anywhere makes the sum non-finite
                return
            bad = ~torch.isfinite(emb).flatten(1).all(dim=1)
        else:
            flagged = ~torch.isfinite(summary).flatten(1).all(dim=1)  # rows whose summary is NaN / inf
            if not bool(flagged.any()):
                return
            bad = torch.zeros_like(flagged)  # a summary may overflow where the values are finite: look at them
            bad[flagged] = ~torch.isfinite(emb[flagged]).flatten(1).all(dim=1)
        if bool(bad.any()):
            first = int(idx[bad.nonzero()[0, 0]])
            raise InputError(f"{self._file_of(first)}: sample {first} contains NaN or inf values")

    def _file_of(self, index: int) -> Path:
        for src in self.sources:
            if src.start <= index < src.start + src.count:
                return src.path
        return self.path

    def subset(self, rows: Tensor | Sequence[int], name: str | None = None,
               classes: Sequence[str] | None = None) -> Dataset:
        """Rows ``rows`` of this dataset as a dataset of their own, read lazily from the same files (a federated
        site's part, a rank's slice). ``name`` replaces the path's name in messages; ``classes`` (names of this
        dataset's classes, covering every row's class) become the view's class list, labels renumbered."""
        return DatasetView(self, rows, name, classes)


class DatasetView(Dataset):
    """Rows of a :class:`Dataset` (see :meth:`Dataset.subset`): index ``i`` is row ``rows[i]`` of ``base``."""

    def __init__(self, base: Dataset, rows: Tensor | Sequence[int], name: str | None = None,
                 classes: Sequence[str] | None = None) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(base)):
            raise UsageError(f"{base.path}: subset rows out of range (dataset has {len(base)} samples)")
        labels = base.labels[idx]
        names = list(base.class_names)
        if classes is not None:
            unknown = [c for c in classes if c not in base.class_names]
            if unknown:
                raise InputError(f"{base.path}: no class(es) {short_list(map(repr, unknown))} (classes: "
                                 f"{short_list(base.class_names, 10)})")
            mapping = torch.full((len(base.class_names),), -1, dtype=torch.long)
            mapping[torch.tensor([base.class_names.index(c) for c in classes], dtype=torch.long)] = \
                torch.arange(len(classes))
            labels, names = mapping[labels], list(classes)
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError("subset rows of classes outside `classes`")
        super().__init__(base.path.with_name(name) if name else base.path, base.sources, seq_len=base.seq_len,
                         dim=base.dim, storage_dtype=base.storage_dtype, labels=labels, class_names=names,
                         condition_dim=base.condition_dim)
        self.base, self.rows = base, idx

    def read(self, indices: Tensor | Sequence[int], *, dtype: torch.dtype = torch.float32,
             check_finite: bool = True) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise UsageError(f"{self.path}: index out of range (dataset has {len(self)} samples)")
        batch = self.base.read(self.rows[idx], dtype=dtype, check_finite=check_finite)
        return Batch(batch.embeddings, self.labels[idx], batch.conditions, idx)

    def stream(self, chunks: Sequence[Tensor], *, dtype: torch.dtype = torch.float32,
               check_finite: bool = True) -> Iterator[Batch]:
        idx = self._chunks(chunks)
        for c, batch in zip(idx, self.base.stream([self.rows[c] for c in idx], dtype=dtype,
                                                  check_finite=check_finite), strict=True):
            yield Batch(batch.embeddings, self.labels[c], batch.conditions, c)

    def check_finite(self, emb: Tensor, idx: Tensor, *, summary: Tensor | None = None) -> None:
        self.base.check_finite(emb, self.rows[torch.as_tensor(idx, dtype=torch.long).reshape(-1)], summary=summary)

    def read_conditions(self, indices: Tensor | Sequence[int]) -> Tensor:
        return self.base.read_conditions(self.rows[torch.as_tensor(indices, dtype=torch.long).reshape(-1)])
