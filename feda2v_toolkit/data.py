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

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from feda2v_toolkit import __version__
from feda2v_toolkit.atomic import atomic_path, default_mode, remove_stale_temporaries, temp_prefix
from feda2v_toolkit.errors import InputError, NewerVersionError, UsageError, short_list

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

    def read(self, name: str, lo: int, hi: int) -> Tensor:
        if self.tensors is not None:
            return self.tensors[name][lo:hi]
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                return fh.get_slice(name)[lo:hi]
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{self.path}: cannot read {name!r}: {exc}") from None


def _class_names_from_metadata(path: Path, meta: dict[str, str] | None) -> list[str] | None:
    if not meta or "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata 'class_names' is not JSON: {exc}") from None
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
            self._check_finite(emb, idx)
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
        for start in range(0, idx.numel(), batch_size):
            yield self.read(idx[start:start + batch_size], dtype=dtype, check_finite=check_finite)

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

    def _check_finite(self, emb: Tensor, idx: Tensor) -> None:
        if bool(torch.isfinite(emb.sum())):  # NaN or inf anywhere makes the sum non-finite
            return
        bad = ~torch.isfinite(emb).all(dim=2).all(dim=1)
        if bool(bad.any()):
            first = int(idx[bad.nonzero()[0, 0]])
            raise InputError(f"{self._file_of(first)}: sample {first} contains NaN or inf values")

    def _file_of(self, index: int) -> Path:
        for src in self.sources:
            if src.start <= index < src.start + src.count:
                return src.path
        return self.path


def _files_of(path: Path) -> list[Path]:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path}: symbolic link loop") from None
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            raise UsageError(f"{path}: no such file or directory") from None
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))
        files = [p for p in files if _is_regular(p)]
        if not files:
            raise UsageError(f"{path}: directory holds no .safetensors shards")
        return files
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never ends
        raise UsageError(f"{path}: not a regular file (a device, pipe or socket); datasets are files or "
                         "directories of shards")
    return [path]


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _load_pt(path: Path) -> Any:
    """``torch.load`` a legacy cache with ``weights_only=True`` (memory-mapped when the format allows)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # files from torch's legacy (non-zip) format cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-object files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read as a PyTorch tensor cache (weights_only): {first}") from None
    return obj


def _legacy_tensors(path: Path, obj: Any = None) -> dict[str, Any]:
    obj = _load_pt(path) if obj is None else obj
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key in _LEGACY_EMBEDDING_KEYS:
        if isinstance(obj.get(key), Tensor):
            out["embeddings"] = obj[key]
            break
    for key in _LEGACY_LABEL_KEYS:
        if key in obj:
            try:
                out["labels"] = torch.as_tensor(obj[key])
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"{path}: {key!r} must be integer labels, found {type(obj[key]).__name__} "
                                 f"that is not a tensor of numbers") from None
            break
    if isinstance(obj.get("conditions"), Tensor):
        out["conditions"] = obj["conditions"]
    if obj.get("class_names") is not None:
        out["class_names"] = _checked_class_names(path, obj["class_names"])
    missing = [k for k in ("embeddings", "labels") if k not in out]
    if missing:
        raise InputError(f"{path}: missing tensor(s) {', '.join(missing)}; found keys: {short_list(map(str, obj), 10)}")
    return out


def open_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Open a dataset file, shard directory, legacy ``.pt`` cache or AST cache of the original code
    (:mod:`feda2v_toolkit.caches`), checking shapes and labels.

    Raises :class:`UsageError` for a missing path and :class:`InputError` (one line naming the file)
    for anything wrong with the content: missing tensors, wrong ranks or dtypes, corrupt files,
    inconsistent shards, labels out of range.
    """
    root = Path(path)
    if root.is_dir() and not any(root.glob("*.safetensors")):  # the original code's AST cache directories
        from feda2v_toolkit.caches import is_ast_cache, open_ast_cache

        if is_ast_cache(root):
            return open_ast_cache(root)
    files = _files_of(root)
    preloaded = None
    if root.is_file() and root.suffix in (".pt", ".pth"):  # the original code's {file_id: tensor} caches
        from feda2v_toolkit.caches import keyed_table, open_keyed

        preloaded = _load_pt(root)
        table = keyed_table(preloaded)
        if table is not None:
            return open_keyed(root, table)
    sources: list[_Source] = []
    labels_parts: list[Tensor] = []
    shape: tuple[int, int] | None = None
    dtype: torch.dtype | None = None
    class_names: list[str] | None = None
    condition_dim: int | None = None
    start = 0
    for file in files:
        tensors = None
        if file.suffix in (".pt", ".pth"):
            legacy = _legacy_tensors(file, preloaded)
            names = legacy.pop("class_names", None)
            tensors = legacy
            emb_shape = tuple(legacy["embeddings"].shape)
            emb_dtype = legacy["embeddings"].dtype
            labels = legacy["labels"]
            cond_shape = tuple(legacy["conditions"].shape) if "conditions" in legacy else None
        else:
            try:
                with safe_open(str(file), framework="pt") as fh:
                    keys = set(fh.keys())
                    meta = fh.metadata() or {}
                    missing = [k for k in ("embeddings", "labels") if k not in keys]
                    if missing:
                        raise InputError(f"{file}: missing tensor(s) {', '.join(missing)}; "
                                         f"found: {', '.join(sorted(keys)) or 'none'}")
                    emb_slice = fh.get_slice("embeddings")
                    emb_shape = tuple(emb_slice.get_shape())
                    emb_dtype = _dtype_of(file, emb_slice.get_dtype())
                    _require_label_memory(file, fh.get_slice("labels").get_shape())
                    labels = fh.get_tensor("labels")
                    cond_shape = tuple(fh.get_slice("conditions").get_shape()) if "conditions" in keys else None
            except SafetensorError as exc:
                if "mmap" in str(exc).lower():  # the file is fine; the address space (ulimit -v) is not
                    raise UsageError(f"{file}: cannot memory-map the file ({exc}); raise the virtual memory "
                                     "limit (ulimit -v) or split the dataset into shards") from None
                raise InputError(f"{file}: not a valid safetensors file ({exc})") from None
            except OSError as exc:
                raise UsageError(f"{file}: cannot read: {exc.strerror or exc}") from None
            _check_format(file, meta)
            names = _class_names_from_metadata(file, meta)
        if len(emb_shape) != 3:
            raise InputError(f"{file}: 'embeddings' must be [N, S, D], found shape {list(emb_shape)}")
        if emb_dtype not in FLOAT_DTYPES:
            raise InputError(f"{file}: 'embeddings' must be float32, float16 or bfloat16, found {emb_dtype}")
        if labels.dim() != 1 or labels.shape[0] != emb_shape[0]:
            raise InputError(f"{file}: 'labels' must be [N] with N = {emb_shape[0]}, found {list(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise InputError(f"{file}: 'labels' must be integers, found {labels.dtype}")
        if cond_shape is not None and (len(cond_shape) != 2 or cond_shape[0] != emb_shape[0]):
            raise InputError(f"{file}: 'conditions' must be [N, C] with N = {emb_shape[0]}, found {list(cond_shape)}")
        if shape is None:
            shape, dtype = (emb_shape[1], emb_shape[2]), emb_dtype
            condition_dim = cond_shape[1] if cond_shape else 0
            class_names = names
        else:
            if (emb_shape[1], emb_shape[2]) != shape:
                raise InputError(f"{file}: sequences are {list(emb_shape[1:])}, but {files[0].name} has {list(shape)}")
            if (cond_shape[1] if cond_shape else 0) != condition_dim:
                raise InputError(f"{file}: 'conditions' present in some shards and not others, or of other width")
            if names is not None and class_names is not None and names != class_names:
                raise InputError(f"{file}: class_names differ from those of {files[0].name}")
            class_names = class_names or names
        sources.append(_Source(file, start, emb_shape[0], tensors))
        labels_parts.append(labels.to(torch.long))
        start += emb_shape[0]
    assert shape is not None and dtype is not None
    all_labels = torch.cat(labels_parts) if labels_parts else torch.empty(0, dtype=torch.long)
    if all_labels.numel() == 0:
        raise InputError(f"{root}: the dataset holds no samples")
    if int(all_labels.min()) < 0:
        raise InputError(f"{root}: negative label {int(all_labels.min())}")
    num_labels = int(all_labels.max()) + 1
    if class_names is None:
        if num_labels > MAX_UNNAMED_CLASSES:  # bounded before a class list is built up to the largest label
            raise InputError(f"{root}: label {num_labels - 1} but no 'class_names' metadata; without class names "
                             f"labels must be below {MAX_UNNAMED_CLASSES} (write class_names, or renumber the "
                             "labels 0, 1, 2, ...)")
        class_names = [f"class_{i}" for i in range(num_labels)]
    elif num_labels > len(class_names):
        raise InputError(f"{root}: label {num_labels - 1} is out of range for {len(class_names)} class names")
    return Dataset(root, sources, seq_len=shape[0], dim=shape[1], storage_dtype=dtype, labels=all_labels,
                   class_names=class_names, condition_dim=condition_dim or 0)


def _require_label_memory(file: Path, shape: list[int]) -> None:
    """Labels are read whole (8 bytes each once widened to int64): bounded before they are read."""
    from feda2v_toolkit.resources import require_memory

    count = 1
    for s in shape:
        count *= int(s)
    require_memory(count * 16, f"{file}: reading its {count:,} labels", hint="split the dataset into shards")


def _dtype_of(file: Path, name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32}
    if name not in table:
        raise InputError(f"{file}: 'embeddings' has unsupported dtype {name}")
    return table[name]


def _check_format(file: Path, meta: dict[str, str]) -> None:
    fmt = meta.get("feda2v_format")
    if fmt is not None and fmt != FORMAT:
        raise InputError(f"{file}: this is a feda2v-tk {fmt} file, not a dataset")
    version = meta.get("format_version")
    if fmt == FORMAT and version is not None:
        try:
            v = int(version)
        except ValueError:
            raise InputError(f"{file}: bad format_version {version!r}") from None
        if v > FORMAT_VERSION:
            raise NewerVersionError(
                f"{file}: dataset format version {v} is newer than this feda2v-tk ({__version__}) supports "
                f"(up to {FORMAT_VERSION}); upgrade feda2v-tk")


def dataset_metadata(class_names: Sequence[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """String metadata for a dataset file (safetensors metadata values must be strings)."""
    meta = {"feda2v_format": FORMAT, "format_version": str(FORMAT_VERSION), "toolkit_version": __version__,
            "class_names": json.dumps(list(class_names))}
    meta.update(extra or {})
    return meta


def write_dataset(path: str | os.PathLike[str], embeddings: Any, labels: Any, *,
                  class_names: Sequence[str] | None = None, conditions: Any = None,
                  dtype: str | torch.dtype | None = None, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write one dataset file atomically from tensors or numpy arrays.

    ``embeddings`` ``[N, S, D]``, ``labels`` ``[N]`` ints, ``conditions`` ``[N, C]`` or None; class
    names default to ``class_0..``; ``dtype`` converts the embeddings (default: keep a float dtype).
    """
    emb = torch.as_tensor(embeddings)
    lab = torch.as_tensor(labels).to(torch.long)
    if emb.dim() != 3:
        raise ValueError(f"embeddings must be [N, S, D], got {list(emb.shape)}")
    if lab.shape != (emb.shape[0],):
        raise ValueError(f"labels must be [N] = [{emb.shape[0]}], got {list(lab.shape)}")
    target = _resolve_dtype(dtype) or (emb.dtype if emb.dtype in FLOAT_DTYPES else torch.float32)
    names = list(class_names) if class_names is not None else [
        f"class_{i}" for i in range(int(lab.max()) + 1 if lab.numel() else 0)]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)})")
    tensors = {"embeddings": emb.to(target).contiguous(), "labels": lab.contiguous()}
    if conditions is not None:
        cond = torch.as_tensor(conditions).to(torch.float32)
        if cond.dim() != 2 or cond.shape[0] != emb.shape[0]:
            raise ValueError(f"conditions must be [N, C], got {list(cond.shape)}")
        tensors["conditions"] = cond.contiguous()
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=dataset_metadata(names, extra_metadata))
    return out


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_replaceable(directory: Path) -> None:
    """``--overwrite`` replaces a dataset directory, never anything else: only ``*.safetensors`` shards."""
    if not directory.is_dir() or directory.is_symlink():
        raise UsageError(f"{directory}: exists and is not a directory; --overwrite replaces shard directories only")
    others = [p.name for p in directory.iterdir() if p.suffix != ".safetensors" or not p.is_file()]
    if others:
        raise UsageError(f"{directory}: holds files that are not dataset shards ({short_list(others, 3)}); "
                         "not replacing it -- remove it yourself or choose another output directory")


class DatasetWriter:
    """Stream rows into a shard directory with bounded memory; all-or-nothing.

    Shards (``part-00000.safetensors``, ...) are written, by one background thread so that writing
    overlaps producing the next shard, into a hidden staging directory next to
    ``directory``; :meth:`close` moves them into place (``directory`` must be absent or empty). If the
    ``with`` block raises (including KeyboardInterrupt) nothing is left behind.
    """

    def __init__(self, directory: str | os.PathLike[str], *, class_names: Sequence[str],
                 dtype: str | torch.dtype = torch.float32, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 extra_metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        self.overwrite = overwrite
        if self.directory.exists() and (not self.directory.is_dir() or any(self.directory.iterdir())):
            if not overwrite:
                raise UsageError(f"{self.directory}: output directory exists and is not empty (--overwrite "
                                 "replaces it)")
            _check_replaceable(self.directory)
        self.class_names = list(class_names)
        self.dtype = _resolve_dtype(dtype) or torch.float32
        self.shard_bytes = int(shard_bytes)
        self.extra_metadata = extra_metadata or {}
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory, ".partial")
        self._staging = Path(tempfile.mkdtemp(prefix=temp_prefix(self.directory), suffix=".partial",
                                              dir=self.directory.parent))
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._pending_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feda2v-writer")
        self._inflight: Future[None] | None = None
        self.shards: list[Path] = []
        self.rows = 0
        self.bytes_written = 0

    def add(self, embeddings: Tensor, labels: Tensor, conditions: Tensor | None = None, *,
            copy: bool = True) -> None:
        """Queue rows; every time ``shard_bytes`` worth of rows is queued, they are written as a shard.

        Rows are copied (shards are written later, on another thread), so the caller may reuse its
        buffers; ``copy=False`` skips that for tensors the caller hands over and never touches again.
        """
        emb = embeddings.detach().to("cpu", self.dtype, copy=copy)
        lab = torch.as_tensor(labels).to("cpu", torch.long).reshape(-1)
        if emb.dim() != 3 or lab.shape[0] != emb.shape[0]:
            raise ValueError("embeddings must be [B, S, D] and labels [B]")
        cond = conditions.detach().to("cpu", torch.float32, copy=copy) if conditions is not None else None
        self._pending.append((emb, lab, cond))
        self._pending_rows += int(lab.shape[0])
        rows_per_shard = max(1, self.shard_bytes // max(1, emb[0].numel() * emb.element_size()))
        while self._pending_rows >= rows_per_shard:
            self._write_rows(rows_per_shard)

    def _take(self, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Remove the first ``rows`` queued rows from the queue and return them concatenated."""
        taken: list[tuple[Tensor, Tensor, Tensor | None]] = []
        need = rows
        while need:
            emb, lab, cond = self._pending[0]
            if emb.shape[0] <= need:
                taken.append(self._pending.pop(0))
                need -= emb.shape[0]
            else:
                taken.append((emb[:need], lab[:need], cond[:need] if cond is not None else None))
                self._pending[0] = (emb[need:], lab[need:], cond[need:] if cond is not None else None)
                need = 0
        self._pending_rows -= rows
        emb = torch.cat([t[0] for t in taken]) if len(taken) > 1 else taken[0][0]
        lab = torch.cat([t[1] for t in taken])
        cond = torch.cat([t[2] for t in taken]) if taken[0][2] is not None else None  # type: ignore[misc]
        return emb, lab, cond

    def _write_rows(self, rows: int) -> None:
        """Hand the first ``rows`` queued rows to the writer thread as one shard."""
        emb, lab, cond = self._take(rows)
        tensors = {"embeddings": emb.contiguous(), "labels": lab}
        if cond is not None:
            tensors["conditions"] = cond.contiguous()
        shard = self._staging / f"part-{len(self.shards):05d}.safetensors"
        self.shards.append(shard)
        self.rows += int(lab.shape[0])
        self._wait()  # at most one shard in flight: memory stays bounded
        self._inflight = self._pool.submit(self._write_shard, shard, tensors)

    def _write_shard(self, shard: Path, tensors: dict[str, Tensor]) -> None:
        """Write and fsync one shard (runs on the writer thread, overlapping the next shard's production)."""
        save_file(tensors, str(shard), metadata=dataset_metadata(self.class_names, self.extra_metadata))
        with open(shard, "rb") as fh:
            os.fsync(fh.fileno())
        self.bytes_written += shard.stat().st_size

    def _wait(self) -> None:
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.result()

    def flush(self) -> None:
        """Write whatever is queued as one (possibly smaller) shard."""
        if self._pending_rows:
            self._write_rows(self._pending_rows)

    def close(self) -> Path:
        """Flush, wait for the writer thread and move the shards into ``directory``; all or nothing."""
        try:
            self.flush()
            self._wait()
            self._pool.shutdown(wait=True)
            file_mode = default_mode()
            for shard in self.shards:
                os.chmod(shard, file_mode)
            os.chmod(self._staging, default_mode(directory=True))
            old = None
            if self.directory.exists():
                if self.overwrite and any(self.directory.iterdir()):
                    old = self.directory.with_name(f"{temp_prefix(self.directory)}old.partial")
                    os.replace(self.directory, old)  # moved aside, removed once the new one is in place
                else:
                    self.directory.rmdir()  # empty (checked at construction)
            os.replace(self._staging, self.directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self.shards = [self.directory / s.name for s in self.shards]
        return self.directory

    def abort(self) -> None:
        """Drop everything written so far."""
        self._pending.clear()
        self._pending_rows = 0
        with contextlib.suppress(Exception):
            self._wait()
        self._pool.shutdown(wait=True)
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
