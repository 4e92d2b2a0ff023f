"""Writing datasets: one file (:func:`write_dataset`) or a streamed shard directory (:class:`DatasetWriter`),
atomically."""

from __future__ import annotations

import contextlib
import json
import math
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
from feda2v_toolkit.runtime.tensorfile import little_endian_bytes, safetensors_header, write_safetensors


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
    if emb.dim() != 3 or emb.shape[1] < 1 or emb.shape[2] < 1:
        raise ValueError(f"embeddings must be [N, S, D] with S, D >= 1, got {list(emb.shape)}")
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


class _Shard:
    """One shard being written: its header (for the ``planned`` rows it is expected to hold) first, then
    every row's embedding bytes at their place as they arrive, up to ``capacity`` rows; labels and conditions,
    which precede the embeddings in the file (wider dtypes first), are kept until the shard is finished."""

    def __init__(self, path: Path, planned: int, capacity: int, row_shape: tuple[int, int], dtype: torch.dtype,
                 cond_dim: int | None, metadata: dict[str, str]) -> None:
        self.path, self.planned, self.capacity = path, planned, capacity
        self.row_shape, self.dtype, self.cond_dim = row_shape, dtype, cond_dim
        self.row_bytes = math.prod(row_shape) * dtype.itemsize
        self.metadata = metadata
        self.filled = 0
        self.labels: list[Tensor] = []
        self.conditions: list[Tensor] = []
        self._fh: Any = None
        self._spans: dict[str, tuple[int, int]] = {}

    def layout(self, rows: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
        specs: dict[str, tuple[torch.dtype, Sequence[int]]] = {
            "embeddings": (self.dtype, (rows, *self.row_shape)), "labels": (torch.int64, (rows,))}
        if self.cond_dim is not None:
            specs["conditions"] = (torch.float32, (rows, self.cond_dim))
        return safetensors_header(specs, self.metadata)

    def write_rows(self, first: int, emb: Tensor) -> None:
        """Write rows ``first .. first + len(emb)`` of the shard (writer thread; the header first)."""
        if self._fh is None:
            head, self._spans = self.layout(self.planned)
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by finish() or abort()
            self._fh.write(head)
        self._fh.seek(self._spans["embeddings"][0] + first * self.row_bytes)  # labels and conditions: at the end
        self._fh.write(little_endian_bytes(emb))

    def finish(self) -> int:
        """Write the labels and conditions, fsync and close (writer thread); the shard's size in bytes.

        A shard given another number of rows than planned (the last one, when the total was not known) is
        rewritten with its real header: its embedding bytes are copied over from the planned file, 16 MiB at
        a time."""
        try:
            return self._finish()
        finally:
            self.abort()  # closed in every case; the labels are no longer needed

    def _finish(self) -> int:
        labels = torch.cat(self.labels)
        conditions = torch.cat(self.conditions) if self.cond_dim is not None else None
        if self._fh is None:  # no rows were ever written (an empty shard is never finished)
            raise RuntimeError("finishing a shard without rows")
        if self.filled != self.planned:
            self._fh.close()
            planned = self.path.with_name(self.path.name + ".planned")
            os.replace(self.path, planned)
            head, spans = self.layout(self.filled)
            with open(planned, "rb") as src, open(self.path, "wb") as dst:
                dst.write(head)
                dst.seek(spans["embeddings"][0])
                src.seek(self._spans["embeddings"][0])
                left = self.filled * self.row_bytes
                while left:
                    chunk = src.read(min(left, 16 * 2**20))
                    if not chunk:
                        raise OSError(f"{planned}: shorter than the rows written to it")
                    dst.write(chunk)
                    left -= len(chunk)
            planned.unlink()
            self._fh, self._spans = open(self.path, "r+b"), spans  # noqa: SIM115
        self._fh.seek(self._spans["labels"][0])
        self._fh.write(little_endian_bytes(labels))
        if conditions is not None:
            self._fh.seek(self._spans["conditions"][0])
            self._fh.write(little_endian_bytes(conditions))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return os.fstat(self._fh.fileno()).st_size

    def abort(self) -> None:
        """Close the file (if open) and drop the kept labels and conditions."""
        self.labels, self.conditions = [], []
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


class DatasetWriter:
    """Stream rows into a shard directory with bounded memory; all-or-nothing.

    Shards (``part-00000.safetensors``, ...) hold ``shard_bytes`` of embeddings each (the last one fewer) and
    are written into a hidden staging directory next to ``directory``, by one background thread so that
    writing overlaps producing the next rows; :meth:`close` moves them into place. Rows go to disk as they
    come (the shard's header is written for the rows it is planned to hold), so the writer holds at most the
    rows of one :meth:`add` in flight, whatever the shard size; the last shard, when it holds fewer rows, is
    rewritten once with its real header. ``rows``, the total number of rows when the caller knows it, plans
    the last shard right and spares that copy (a wrong count costs the copy, nothing else). The files are
    byte for byte those :func:`write_dataset` would write for the same rows.

    ``directory`` must be absent or empty, or, with ``overwrite``, hold only dataset shards (the overwrite
    rule, :func:`~feda2v_toolkit.runtime.atomic.check_output`), which are replaced once the new ones are
    complete. If the ``with`` block raises (including KeyboardInterrupt) nothing is left behind; a full disk
    is a one-line error naming ``directory``. After a failed write every later call raises that error again
    and :meth:`close` leaves nothing behind.
    """

    def __init__(self, directory: str | os.PathLike[str], *, class_names: Sequence[str],
                 dtype: str | torch.dtype = torch.float32, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 extra_metadata: dict[str, str] | None = None, overwrite: bool = False,
                 rows: int | None = None) -> None:
        self.directory = check_output(directory, overwrite=overwrite, directory=True)
        self.overwrite = overwrite
        self.class_names = list(class_names)
        self.dtype = _resolve_dtype(dtype) or torch.float32
        if self.dtype not in FLOAT_DTYPES:  # (and so the embeddings come last in a shard, after the labels)
            raise ValueError(f"dataset embeddings are stored as {', '.join(DTYPES)}, not {self.dtype}")
        self.shard_bytes = int(shard_bytes)
        self.extra_metadata = extra_metadata or {}
        self.expected_rows = rows
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
        self._row_shape: tuple[int, int] | None = None
        self._cond_dim: int | None = None
        self._shard: _Shard | None = None
        self._started: list[_Shard] = []  # every shard whose file may be open (closed by abort)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feda2v-writer")
        self._inflight: Future[Any] | None = None
        self._error: BaseException | None = None
        self.shards: list[Path] = []
        self.rows = 0
        self.bytes_written = 0

    def add(self, embeddings: Tensor, labels: Tensor, conditions: Tensor | None = None, *,
            copy: bool = True) -> None:
        """Write rows (``embeddings`` ``[B, S, D]``, ``labels`` ``[B]``, ``conditions`` ``[B, C]`` or None, the
        same ``S``, ``D`` and ``C`` every time); a shard is finished every ``shard_bytes`` of embeddings.

        Rows are copied (they are written later, on another thread), so the caller may reuse its buffers;
        ``copy=False`` skips that for tensors the caller hands over and never touches again.
        """
        self._check()
        emb = embeddings.detach().to("cpu", self.dtype, copy=copy)
        lab = torch.as_tensor(labels).to("cpu", torch.long, copy=True).reshape(-1)  # kept until the shard ends
        if emb.dim() != 3 or lab.shape[0] != emb.shape[0]:
            raise ValueError("embeddings must be [B, S, D] and labels [B]")
        cond = conditions.detach().to("cpu", torch.float32, copy=copy) if conditions is not None else None
        if cond is not None and (cond.dim() != 2 or cond.shape[0] != emb.shape[0]):
            raise ValueError("conditions must be [B, C]")
        n = int(emb.shape[0])
        if n == 0:
            return
        if emb.shape[1] < 1 or emb.shape[2] < 1:
            raise ValueError(f"embeddings must be [B, S, D] with S, D >= 1, got {list(emb.shape)}")
        row_shape, cond_dim = (int(emb.shape[1]), int(emb.shape[2])), int(cond.shape[1]) if cond is not None else None
        if self._row_shape is None:
            self._row_shape, self._cond_dim = row_shape, cond_dim
        elif row_shape != self._row_shape or cond_dim != self._cond_dim:
            raise ValueError(f"rows of shape {list(row_shape)} with conditions {cond_dim} after rows of "
                             f"{list(self._row_shape)} with conditions {self._cond_dim}: every row of a dataset "
                             "has one shape")
        emb = emb.contiguous()
        start = 0
        while start < n:
            if self._shard is None:
                capacity = max(1, self.shard_bytes // max(1, math.prod(row_shape) * self.dtype.itemsize))
                planned = capacity
                if self.expected_rows is not None and self.expected_rows > self.rows:
                    planned = min(capacity, self.expected_rows - self.rows)
                path = self._staging / f"part-{len(self.shards):05d}.safetensors"
                self._shard = _Shard(path, planned, capacity, row_shape, self.dtype, cond_dim,
                                     dataset_metadata(self.class_names, self.extra_metadata))
                self.shards.append(path)
                self._started.append(self._shard)
            shard = self._shard
            take = min(n - start, shard.capacity - shard.filled)
            self._submit(shard.write_rows, shard.filled, emb[start:start + take])
            shard.labels.append(lab[start:start + take])
            if cond is not None:
                shard.conditions.append(cond[start:start + take].contiguous())
            shard.filled += take
            self.rows += take
            start += take
            if shard.filled == shard.capacity:
                self._finish()

    def _submit(self, task: Any, *args: Any) -> None:
        """Run ``task(*args)`` on the writer thread once the task in flight is done (at most one in flight:
        memory stays bounded)."""
        self._wait()
        self._inflight = self._pool.submit(self._guarded, task, *args)

    def _guarded(self, task: Any, *args: Any) -> Any:
        try:
            return task(*args)
        except Exception as exc:
            handled = write_error(self.directory, exc)
            if handled is not None:
                raise handled from None
            raise

    def _finish(self) -> None:
        shard, self._shard = self._shard, None
        assert shard is not None
        self._submit(self._count, shard)

    def _count(self, shard: _Shard) -> None:
        self.bytes_written += shard.finish()

    def _wait(self) -> None:
        """Wait for the task in flight; its error is kept and raised again by every later call."""
        self._check()
        inflight = self._inflight
        if inflight is None:
            return
        try:
            inflight.result()
        except Exception as exc:
            self._error = exc
            raise
        finally:
            if inflight.done():  # a Ctrl-C while waiting leaves it in flight, for abort() to wait for
                self._inflight = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Finish the shard being written (with the rows it has: a smaller last shard)."""
        if self._shard is not None and self._shard.filled:
            self._finish()

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
        self._pool.shutdown(wait=True)  # the task in flight ends first: no file is closed under it
        self._inflight = None
        for shard in self._started:
            shard.abort()
        self._shard = None
        shutil.rmtree(self._staging, ignore_errors=True)
        remove_created(self._created)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
