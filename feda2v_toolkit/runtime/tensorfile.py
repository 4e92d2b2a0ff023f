"""Safetensors files written byte for byte the same for the same tensors and metadata (imports torch).

``safetensors.save_file`` writes the metadata in a random order (a hash map), so two identical runs give
files with different sha256. :func:`write_tensor_file` writes the format itself: the 8-byte header length,
the JSON header with sorted keys (padded with spaces to 8 bytes), then the tensors' bytes, widest dtype
first (for alignment), by name. Every writer of the toolkit (models, checkpoints, dataset files,
``embed``) goes through it; the shard writer (:class:`~feda2v_toolkit.data.writer.DatasetWriter`), which
places rows as they come, takes its header and offsets from :func:`safetensors_header`, the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.runtime.atomic import atomic_path

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path`` (not atomically: for files inside a staging
    directory), deterministically. Tensors are moved to the CPU and made contiguous first."""
    out = Path(path)
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if sys.byteorder == "little" and all(t.dtype in _ST_DTYPES for t in flat.values()):
        _write_sorted(out, flat, metadata or {})
    else:  # pragma: no cover - big-endian hosts, exotic dtypes
        from safetensors.torch import save_file

        save_file(flat, str(out), metadata=dict(metadata or {}))
    return out


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None, *,
                      display: str | os.PathLike[str] | None = None) -> Path:
    """:func:`write_tensor_file` atomically (temp file, fsync, rename; a full disk is a one-line error
    naming ``path``, or ``display``, and leaves nothing)."""
    out = Path(path)
    with atomic_path(out, display=display) as tmp:
        write_tensor_file(tmp, tensors, metadata)
    return out


def _write_sorted(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    _write_streamed(path, {name: StreamedTensor(t.dtype, tuple(t.shape), lambda t=t: iter([t]))
                           for name, t in tensors.items()}, metadata)


class StreamedTensor:
    """A tensor of known ``dtype`` and ``shape`` whose rows arrive in chunks (``chunks()``: row blocks, in order)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], chunks: Any) -> None:
        self.dtype, self.shape, self.chunks = dtype, tuple(int(s) for s in shape), chunks

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_streamed_file(path: str | os.PathLike[str], tensors: Mapping[str, StreamedTensor],
                        metadata: Mapping[str, str] | None = None, *,
                        display: str | os.PathLike[str] | None = None) -> Path:
    """:func:`write_safetensors` for tensors that arrive in chunks (memory bounded by one chunk): the same
    bytes as writing the whole tensors. A chunk of the wrong dtype or a total of the wrong size raises."""
    out = Path(path)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        whole = {n: torch.cat([c.to("cpu") for c in t.chunks()]).reshape(t.shape) for n, t in tensors.items()}
        return write_safetensors(out, whole, metadata, display=display)
    with atomic_path(out, display=display) as tmp:
        _write_streamed(tmp, tensors, metadata or {})
    return out


_SAME_WIDTH_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def little_endian_bytes(t: Tensor) -> memoryview:
    """A CPU tensor's bytes in little-endian order, as the format stores them (no copy on little-endian hosts)."""
    flat = t.contiguous().reshape(-1)
    if sys.byteorder == "little":
        return memoryview(flat.view(torch.uint8).numpy())
    return memoryview(flat.view(_SAME_WIDTH_INTS[t.element_size()]).numpy().byteswap())  # pragma: no cover


def safetensors_header(tensors: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                       metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The bytes a safetensors file of these ``{name: (dtype, shape)}`` starts with (the 8-byte length and the
    padded JSON header, as :func:`write_tensor_file` writes them) and each tensor's ``[start, end)`` byte range
    in the file: for writers that place rows where they belong as they arrive."""
    sizes = {name: torch.empty((), dtype=dtype).element_size() for name, (dtype, _) in tensors.items()}
    order = sorted(tensors, key=lambda n: (-sizes[n], n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset, spans = 0, {}
    for name in order:
        dtype, shape = tensors[name]
        nbytes = sizes[name] * math.prod(int(s) for s in shape)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: (start + a, start + b) for name, (a, b) in spans.items()}


def _write_streamed(path: Path, tensors: Mapping[str, StreamedTensor], metadata: Mapping[str, str]) -> None:
    head, spans = safetensors_header({name: (t.dtype, t.shape) for name, t in tensors.items()}, metadata)
    order = sorted(tensors, key=lambda n: spans[n])
    with open(path, "wb") as fh:
        fh.write(head)
        for name in order:
            t, written = tensors[name], 0
            for chunk in t.chunks():
                chunk = chunk.detach().to("cpu").contiguous()
                if chunk.dtype != t.dtype:
                    raise ValueError(f"{name}: a chunk of dtype {chunk.dtype}, expected {t.dtype}")
                if chunk.numel():
                    data = little_endian_bytes(chunk)
                    fh.write(data)
                    written += data.nbytes
            if written != t.nbytes:
                raise ValueError(f"{name}: {written} bytes written, the shape {list(t.shape)} needs {t.nbytes}")


_ST_NAMES = {name: dtype for dtype, name in _ST_DTYPES.items()}


def pack_tensors(tensors: Mapping[str, Tensor]) -> Tensor:
    """The safetensors bytes of ``tensors`` (the bytes :func:`write_tensor_file` writes), in one ``uint8`` tensor
    written in place: no intermediate ``bytes`` object, so packing holds the tensors and their one copy."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    if sys.byteorder != "little" or any(t.dtype not in _ST_DTYPES for t in flat.values()):  # pragma: no cover
        from safetensors.torch import save

        return torch.frombuffer(bytearray(save(flat)), dtype=torch.uint8)
    head, spans = safetensors_header({name: (t.dtype, t.shape) for name, t in flat.items()})
    out = torch.empty(max([len(head), *(b for _, b in spans.values())]), dtype=torch.uint8)
    out[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    for name, t in flat.items():
        a, b = spans[name]
        if t.numel():
            out[a:b] = t.reshape(-1).view(torch.uint8)
    return out


def unpack_tensors(buf: Tensor) -> dict[str, Tensor]:
    """The tensors of safetensors bytes held in a ``uint8`` tensor (:func:`pack_tensors`), by name: views of
    ``buf`` where the data are aligned (as :func:`pack_tensors` places them), no copy; they keep ``buf`` alive.
    Offsets and sizes are checked against the buffer; nothing is unpickled."""
    total = buf.numel()
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        from safetensors.torch import load

        return load(bytes(buf.numpy().tobytes()))
    (size,) = struct.unpack("<Q", bytes(buf[:8].numpy().tobytes()).ljust(8, b"\xff"))
    if 8 + size > total:
        raise ValueError(f"a safetensors header of {size} bytes in {total} bytes")
    header = json.loads(bytes(buf[8:8 + size].numpy().tobytes()))
    start, out = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {info.get('dtype')!r} is not a safetensors dtype this reads")
        dtype, shape = _ST_NAMES[info["dtype"]], [int(s) for s in info["shape"]]
        lo, hi = (start + int(v) for v in info["data_offsets"])
        width = torch.empty((), dtype=dtype).element_size()
        if not start <= lo <= hi <= total or hi - lo != width * math.prod(shape):
            raise ValueError(f"tensor {name!r}: bytes {lo}-{hi} of {total} for shape {shape} of {dtype}")
        raw = buf[lo:hi]
        aligned = raw.storage_offset() % width == 0 and raw.data_ptr() % width == 0
        out[name] = (raw if aligned else raw.clone()).view(dtype).reshape(shape)
    return out
