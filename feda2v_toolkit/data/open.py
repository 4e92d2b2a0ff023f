"""Opening a dataset: a safetensors file or shard directory, a legacy ``.pt`` cache, or an AST cache of the
original code (:mod:`feda2v_toolkit.data.original_caches`), with every shape, dtype and label checked."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from feda2v_toolkit import __version__
from feda2v_toolkit.data.dataset import (
    _LEGACY_EMBEDDING_KEYS,
    _LEGACY_LABEL_KEYS,
    FLOAT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MAX_UNNAMED_CLASSES,
    Dataset,
    _checked_class_names,
    _class_names_from_metadata,
    _Source,
    check_sequence_shape,
    mmap_error,
)
from feda2v_toolkit.errors import (
    InputError,
    NewerVersionError,
    ToolkitError,
    UsageError,
    first_line,
    short_list,
    stat_mode,
    unpickling_refusal,
)


def _files_of(path: Path) -> list[Path]:
    mode = stat_mode(path)
    if stat.S_ISDIR(mode):
        files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))
        for p in files:  # skipping one would run on a subset of the data: refused instead
            _check_shard(p)
        if not files:
            raise UsageError(f"{path}: directory holds no .safetensors shards")
        return files
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never ends
        raise UsageError(f"{path}: not a regular file (a device, pipe or socket); datasets are files or "
                         "directories of shards")
    return [path]


def _check_shard(path: Path) -> None:
    """Refuse an entry ``*.safetensors`` of a shard directory that is not a regular file (a dangling symbolic
    link, a link loop, a directory, a FIFO, a device or socket) with a one-line :class:`UsageError`."""
    mode = stat_mode(path)
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket"
        raise UsageError(f"{path}: shard is not a regular file ({kind}); every *.safetensors entry of a shard "
                         "directory is read: remove or rename it")


def _load_pt(path: Path) -> Any:
    """``torch.load`` a legacy cache with ``weights_only=True`` (memory-mapped when the format allows)."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "zipfile" not in str(exc):  # torch's legacy (non-zip) format cannot be memory-mapped
                    raise
                from feda2v_toolkit.runtime.resources import require_memory

                require_memory(path.stat().st_size * 2, f"{path}: reading a legacy (non-zip) .pt cache whole",
                               hint="convert it once on a larger machine with feda2v-tk convert-data")
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except ToolkitError:
        raise
    except Exception as exc:  # torch raises many types for corrupt, pickled-object or unmappable files
        refusal = unpickling_refusal(exc, _head(path))
        handled = mmap_error(path, exc) if refusal is None else None
        if handled is None:
            handled = InputError(f"{path}: cannot read as a PyTorch tensor cache: {refusal or first_line(exc)}")
        raise handled from None
    return obj


def _head(path: Path, size: int = 2) -> bytes | None:
    """The first ``size`` bytes of ``path`` (``None`` if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return None


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
    (:mod:`feda2v_toolkit.data.original_caches`), checking shapes and labels.

    Raises :class:`UsageError` for a missing path and :class:`InputError` (one line naming the file)
    for anything wrong with the content: missing tensors, wrong ranks or dtypes, corrupt files,
    inconsistent shards, labels out of range.
    """
    root = Path(path)
    if root.is_dir() and not any(root.glob("*.safetensors")):  # the original code's AST cache directories
        from feda2v_toolkit.data.original_caches import is_ast_cache, open_ast_cache

        if is_ast_cache(root):
            return open_ast_cache(root)
    files = _files_of(root)
    preloaded = None
    if root.is_file() and root.suffix in (".pt", ".pth"):  # the original code's {file_id: tensor} caches
        from feda2v_toolkit.data.original_caches import keyed_table, open_keyed

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
            except (SafetensorError, MemoryError) as exc:  # the file may be fine and the address space not
                raise mmap_error(file, exc) or InputError(f"{file}: not a valid safetensors file ({exc})") from None
            except OSError as exc:
                raise mmap_error(file, exc) or UsageError(f"{file}: cannot read: {exc.strerror or exc}") from None
            _check_format(file, meta)
            names = _class_names_from_metadata(file, meta)
        if len(emb_shape) != 3:
            raise InputError(f"{file}: 'embeddings' must be [N, S, D], found shape {list(emb_shape)}")
        check_sequence_shape(file, emb_shape)
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
    from feda2v_toolkit.runtime.resources import require_memory

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
