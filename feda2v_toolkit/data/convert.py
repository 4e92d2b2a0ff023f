"""``convert-data``: stream any dataset :func:`~feda2v_toolkit.data.open.open_dataset` reads (the original
code's caches included) into a shard directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert_dataset(source: str | Path, out: str | Path, *, dtype: str | None = None, batch_size: int = 256,
                    overwrite: bool = False) -> dict[str, Any]:
    """Stream any dataset :func:`~feda2v_toolkit.data.open_dataset` reads into a shard directory ``out``
    (all or nothing; ``overwrite`` replaces an existing one). Returns a small report."""
    import os
    import shutil

    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import DatasetWriter
    from feda2v_toolkit.errors import UsageError

    out = Path(out)
    src = Path(source)
    if out.exists() and src.exists() and (out.resolve() == src.resolve() or src.resolve() in out.resolve().parents):
        raise UsageError(f"{out}: is the source or inside it; write to another path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: output directory exists and is not empty; use --overwrite to replace it")
    ds = open_dataset(source)
    target = out.parent / f".{out.name}.convert-new" if out.exists() else out
    if target != out:
        shutil.rmtree(target, ignore_errors=True)
    writer = DatasetWriter(target, class_names=ds.class_names, dtype=dtype or ds.storage_dtype)
    with writer:
        for batch in ds.batches(batch_size, dtype=ds.storage_dtype):
            writer.add(batch.embeddings, batch.labels, batch.conditions, copy=False)
    if target != out:
        trash = out.parent / f".{out.name}.replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(target, out)
        shutil.rmtree(trash, ignore_errors=True)
    return {"source": str(source), "out": str(out), "rows": len(ds), "seq_len": ds.seq_len, "dim": ds.dim,
            "dtype": str(writer.dtype).removeprefix("torch."), "class_names": ds.class_names,
            "shards": len(writer.shards)}
