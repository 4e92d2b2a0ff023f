"""Read the AST embedding caches the original FedA2V code writes, in place (no conversion first).

* A cache directory: one sub-directory per class, each with ``embeddings_NNN.npy`` chunks (float32
  ``[n, S, D]``) and a ``manifest.json`` (``file_id_to_index``: file id -> ``[chunk, offset]``,
  ``chunks``: ``[{"file", "num_samples", "shape"}]``, ``class_name``). Chunks are memory-mapped with
  ``np.load(mmap_mode="c", allow_pickle=False)`` (copy-on-write: nothing ever writes to the cache); rows are those the manifest indexes, in chunk order.
* A ``.pt`` dict keyed by file id (read by :mod:`feda2v_toolkit.data.dataset` with ``weights_only=True``):
  ``{"embeddings": {"file_id:class": tensor}, "metadata": {...}}`` or ``{file_id: tensor}``; the class is
  the part after the last ``:`` of the key (keys without one all go to the class ``unlabelled``).

Both give a :class:`~feda2v_toolkit.data.dataset.Dataset`, so ``train``, ``analyze`` and ``evaluate`` read them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError

MANIFEST = "manifest.json"
#: largest manifest.json read
MAX_MANIFEST_BYTES = 64 * 2**20


class _Rows:
    """Rows of a memory-mapped tensor handed out as copies, so that a batch never aliases the map
    (``_Source.read`` slices ``tensors[name][lo:hi]``)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.dtype = tensor.dtype
        self.shape = tensor.shape

    def __getitem__(self, index: slice) -> Tensor:
        return self.tensor[index].clone()


def _class_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_ast_cache(path: Path) -> bool:
    """Whether ``path`` is a directory in the original code's cache layout (class dirs with a manifest)."""
    if not path.is_dir():
        return False
    if os.path.lexists(path / MANIFEST):
        return True
    return any(os.path.lexists(p / MANIFEST) for p in _class_dirs(path))


def _manifest(path: Path) -> dict[str, Any]:
    from feda2v_toolkit.errors import UsageError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the cache manifest: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{path}: the cache manifest is not a regular file (a device, pipe, socket or "
                             "directory)")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"{path}: manifest is {info.st_size} bytes, more than the {MAX_MANIFEST_BYTES} read")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InputError(f"{path}: manifest is more than the {MAX_MANIFEST_BYTES} bytes read")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the cache manifest: {exc}") from None
    except RecursionError:
        raise InputError(f"{path}: cannot read the cache manifest: JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("chunks"), list):
        raise InputError(f"{path}: not an AST cache manifest (no 'chunks' list)")
    return data


def _chunk(path: Path, expected_rows: Any) -> Tensor:
    import numpy as np

    from feda2v_toolkit.data.dataset import check_sequence_shape

    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        raise InputError(f"{path}: chunk listed in the manifest is missing") from None
    if not regular:
        raise InputError(f"{path}: chunk listed in the manifest is not a regular file")
    try:
        # copy-on-write map: even a stray write never reaches the file
        arr = np.load(path, mmap_mode="c", allow_pickle=False)
    except EOFError:
        raise InputError(f"{path}: empty or truncated .npy chunk") from None
    except Exception as exc:  # numpy raises ValueError, OSError, OverflowError... for corrupt headers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read as a .npy array: {first}") from None
    if arr.ndim != 3 or arr.dtype not in (np.float32, np.float16):
        raise InputError(f"{path}: expected a float32 [n, S, D] array, found {arr.dtype} {list(arr.shape)}")
    check_sequence_shape(path, arr.shape)
    if isinstance(expected_rows, int) and expected_rows != arr.shape[0]:
        raise InputError(f"{path}: manifest says {expected_rows} samples, the chunk holds {arr.shape[0]}")
    return torch.from_numpy(arr)


def open_ast_cache(root: Path) -> Any:
    """Open a cache directory of the original code as a :class:`~feda2v_toolkit.data.dataset.Dataset` (streaming)."""
    from feda2v_toolkit.data.dataset import Dataset, _Source, contiguous_runs

    class_dirs = [root] if os.path.lexists(root / MANIFEST) else _class_dirs(root)
    for d in class_dirs:  # a class without its manifest would silently go missing
        if not os.path.lexists(d / MANIFEST):
            raise InputError(f"{d}: class directory of the AST cache {root} has no {MANIFEST}; restore it or move "
                             "the directory out of the cache")
    entries: list[tuple[str, Path, dict[str, Any]]] = []
    for d in class_dirs:
        manifest = _manifest(d / MANIFEST)
        name = manifest.get("class_name") if isinstance(manifest.get("class_name"), str) else d.name
        entries.append((name, d, manifest))
    names = sorted({name for name, _, _ in entries})
    if len(names) != len(entries):
        raise InputError(f"{root}: two class directories name the same class")
    sources: list[_Source] = []
    labels: list[Tensor] = []
    shape: tuple[int, int] | None = None
    start = 0
    for name, d, manifest in sorted(entries):
        chunks = manifest["chunks"]
        used: dict[int, set[int]] = {}
        index = manifest.get("file_id_to_index", {})
        if not isinstance(index, dict):
            raise InputError(f"{d / MANIFEST}: 'file_id_to_index' must be an object")
        for file_id, where in index.items():
            if not (isinstance(where, list) and len(where) == 2 and all(isinstance(w, int) for w in where)):
                raise InputError(f"{d / MANIFEST}: file {file_id!r} has index {where!r}, expected [chunk, offset]")
            if not 0 <= where[0] < len(chunks):
                raise InputError(f"{d / MANIFEST}: file {file_id!r} points to chunk {where[0]}, but "
                                 f"{len(chunks)} chunk(s) are listed")
            used.setdefault(where[0], set()).add(where[1])
        for ci, meta in enumerate(chunks):
            if not isinstance(meta, dict) or not isinstance(meta.get("file"), str) or "/" in meta["file"] \
                    or meta["file"] in ("", ".", ".."):
                raise InputError(f"{d / MANIFEST}: chunk {ci} has no plain file name")
            tensor = _chunk(d / meta["file"], meta.get("num_samples"))
            if shape is None:
                shape = (int(tensor.shape[1]), int(tensor.shape[2]))
            elif tuple(tensor.shape[1:]) != shape:
                raise InputError(f"{d / meta['file']}: sequences are {list(tensor.shape[1:])}, others {list(shape)}")
            rows = sorted(used.get(ci, set())) if index else list(range(tensor.shape[0]))
            if rows and (rows[0] < 0 or rows[-1] >= tensor.shape[0]):
                raise InputError(f"{d / MANIFEST}: an index points past the {tensor.shape[0]} rows of {meta['file']}")
            for lo, hi in contiguous_runs(rows):
                sources.append(_Source(d / meta["file"], start, hi - lo, {"embeddings": _Rows(tensor[lo:hi])}))
                labels.append(torch.full((hi - lo,), names.index(name), dtype=torch.long))
                start += hi - lo
    if not sources or shape is None:
        raise InputError(f"{root}: the cache holds no samples")
    dtype = sources[0].tensors["embeddings"].dtype  # type: ignore[index]
    return Dataset(root, sources, seq_len=shape[0], dim=shape[1], storage_dtype=dtype, labels=torch.cat(labels),
                   class_names=names, condition_dim=0)


def keyed_table(obj: Any) -> dict[str, Tensor] | None:
    """The ``{file_id: tensor}`` table of a ``.pt`` dict keyed by file id, or None when ``obj`` is not one."""
    if not isinstance(obj, dict):
        return None
    table = obj.get("embeddings") if isinstance(obj.get("embeddings"), dict) else obj
    if not table or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in table.items()):
        return None
    first = next(iter(table.values()))
    if first.dim() not in (2, 3) or (first.dim() == 3 and first.shape[0] != 1):
        return None
    return table


def open_keyed(path: Path, table: dict[str, Tensor]) -> Any:
    """A :class:`~feda2v_toolkit.data.dataset.Dataset` over a ``{file_id: [S, D] tensor}`` table (memory-mapped
    tensors stay mapped: each entry is its own one-row source). Rows follow the keys' order."""
    from feda2v_toolkit.data.dataset import FLOAT_DTYPES, Dataset, _Source, check_sequence_shape

    first = next(iter(table.values()))
    row_shape = tuple(first.shape[-2:])
    check_sequence_shape(path, (1, *row_shape))
    classes = [k.rsplit(":", 1)[1] if ":" in k else "unlabelled" for k in table]
    names = sorted(set(classes))
    sources = []
    for i, (key, value) in enumerate(table.items()):
        if tuple(value.shape[-2:]) != row_shape or value.numel() != first.numel():
            raise InputError(f"{path}: {key!r} is {list(value.shape)}, the first entry {list(first.shape)}")
        if value.dtype != first.dtype or value.dtype not in FLOAT_DTYPES:
            raise InputError(f"{path}: {key!r} is {value.dtype}; entries must all be float32, float16 or bfloat16")
        sources.append(_Source(path, i, 1, {"embeddings": _Rows(value.reshape(1, *row_shape))}))
    labels = torch.tensor([names.index(c) for c in classes], dtype=torch.long)
    return Dataset(path, sources, seq_len=row_shape[0], dim=row_shape[1], storage_dtype=first.dtype,
                   labels=labels, class_names=names, condition_dim=0)
