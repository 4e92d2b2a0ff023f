"""Writing datasets: one file (:func:`write_dataset`) or a streamed shard directory (:class:`DatasetWriter`),
atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit import __version__
from feda2v_toolkit.data.dataset import DEFAULT_SHARD_BYTES, DTYPES, FLOAT_DTYPES, FORMAT, FORMAT_VERSION
from feda2v_toolkit.errors import UsageError, write_error
from feda2v_toolkit.runtime.atomic import (
    check_output,
    default_mode,
    make_parents,
    remove_created,
    remove_stale_temporaries,
    replace_directory,
    temp_prefix,
)
from feda2v_toolkit.runtime.tensorfile import write_safetensors, write_tensor_file


def dataset_metadata(class_names: Sequence[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """String metadata for a dataset file (safetensors metadata values must be strings)."""
    meta = {"feda2v_format": FORMAT, "format_version": str(FORMAT_VERSION), "toolkit_version": __version__,
            "class_names": json.dumps(list(class_names))}
    meta.update(extra or {})
    return meta


def write_dataset(path: str | os.PathLike[str], embeddings: Any, labels: Any, *,
                  class_names: Sequence[str] | None = None, conditions: Any = None,
                  dtype: str | torch.dtype | None = None, extra_metadata: dict[str, str] | None = None,
                  display: str | os.PathLike[str] | None = None) -> Path:
    """Write one dataset file atomically from tensors or numpy arrays (byte for byte the same for the same
    input; a full disk is a one-line error naming ``path``, or ``display``, and leaves nothing).

    ``embeddings`` ``[N, S, D]``, ``labels`` ``[N]`` ints, ``conditions`` ``[N, C]`` or None; class
    names default to ``class_0..``; ``dtype`` converts the embeddings (default: keep a float dtype).
    A low-level writer: it replaces ``path``; commands check the overwrite rule first.
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
    return write_safetensors(Path(path), tensors, dataset_metadata(names, extra_metadata), display=display)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class DatasetWriter:
    """Stream rows into a shard directory with bounded memory; all-or-nothing.

    Shards (``part-00000.safetensors``, ...) are written, by one background thread so that writing
    overlaps producing the next shard, into a hidden staging directory next to
    ``directory``; :meth:`close` moves them into place. ``directory`` must be absent or empty, or, with
    ``overwrite``, hold only dataset shards (the overwrite rule, :func:`~feda2v_toolkit.runtime.atomic.check_output`),
    which are replaced once the new ones are complete. If the ``with`` block raises (including
    KeyboardInterrupt) nothing is left behind; a full disk is a one-line error naming ``directory``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, class_names: Sequence[str],
                 dtype: str | torch.dtype = torch.float32, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 extra_metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
        self.directory = check_output(directory, overwrite=overwrite, directory=True)
        self.overwrite = overwrite
        self.class_names = list(class_names)
        self.dtype = _resolve_dtype(dtype) or torch.float32
        self.shard_bytes = int(shard_bytes)
        self.extra_metadata = extra_metadata or {}
        self._created = make_parents(self.directory)
        remove_stale_temporaries(self.directory, ".partial")
        try:
            self._staging = Path(tempfile.mkdtemp(prefix=temp_prefix(self.directory), suffix=".partial",
                                                  dir=self.directory.parent))
        except BaseException as exc:
            remove_created(self._created)
            handled = write_error(self.directory, exc) if isinstance(exc, Exception) else None
            if handled is not None:
                raise handled from None
            raise
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
        try:
            write_tensor_file(shard, tensors, dataset_metadata(self.class_names, self.extra_metadata))
            with open(shard, "rb") as fh:
                os.fsync(fh.fileno())
        except Exception as exc:
            handled = write_error(self.directory, exc)
            if handled is not None:
                raise handled from None
            raise
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
            replace_directory(self._staging, self.directory)  # the old shards go once the new ones are in place
        except BaseException as exc:
            self.abort()
            handled = write_error(self.directory, exc) if isinstance(exc, Exception) else None
            if handled is not None:
                raise handled from None
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
        remove_created(self._created)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
