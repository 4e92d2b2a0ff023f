"""``convert-data``: stream any dataset :func:`~feda2v_toolkit.data.open.open_dataset` reads (the original
code's caches included) into a shard directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: bytes of clips read at a time by default (a read and the previous one, on its way to disk, are held)
READ_BYTES = 32 * 2**20


def convert_dataset(source: str | Path, out: str | Path, *, dtype: str | None = None, batch_size: int | None = None,
                    overwrite: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Stream any dataset :func:`~feda2v_toolkit.data.open_dataset` reads into a shard directory ``out``
    (all or nothing). ``out`` may not be, contain or lie inside ``source``; an existing ``out`` is replaced
    only with ``overwrite`` and only if it holds nothing but dataset shards (the overwrite rule,
    :func:`~feda2v_toolkit.runtime.atomic.check_output`). ``batch_size``: clips per read (default: as many
    as fit :data:`READ_BYTES`; memory holds about two reads). Returns a small report."""
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import DatasetWriter
    from feda2v_toolkit.runtime.atomic import check_output
    from feda2v_toolkit.runtime.progress import Progress

    out = check_output(out, inputs=[source], overwrite=overwrite, directory=True, role="source dataset")
    ds = open_dataset(source)
    if batch_size is None:
        batch_size = max(1, READ_BYTES // max(1, ds.seq_len * ds.dim * ds.storage_dtype.itemsize))
    bar = Progress(len(ds), 0, progress, unit="clip", desc="convert-data")
    try:
        with DatasetWriter(out, class_names=ds.class_names, dtype=dtype or ds.storage_dtype,
                           overwrite=overwrite, rows=len(ds)) as writer:
            for batch in ds.batches(batch_size, dtype=ds.storage_dtype):
                writer.add(batch.embeddings, batch.labels, batch.conditions, copy=False)
                bar.update(int(batch.labels.shape[0]))
    finally:
        bar.close()
    return {"source": str(source), "out": str(out), "clips": len(ds), "seq_len": ds.seq_len, "dim": ds.dim,
            "dtype": str(writer.dtype).removeprefix("torch."), "class_names": ds.class_names,
            "shards": len(writer.shards)}
