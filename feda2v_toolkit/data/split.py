"""Splitting datasets: a site's stratified train / held-out split, and partitions into one dataset per node (class
ownership or Dirichlet label skew; no Flower needed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from feda2v_toolkit.errors import InputError, UsageError, short_list, spelled

#: the largest Dirichlet concentration: at 10^6 every node's share of a class is already within a fraction of a
#: percent of 1 / nodes, and larger values overflow the float32 Gamma draws
MAX_DIRICHLET_ALPHA = 1e6
#: ``split`` copies a node's clips in reads of about this many bytes (float32): memory flat in N
SPLIT_CHUNK_BYTES = 64 * 2**20


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held-out)`` indices: ``round(fraction * n_c)`` of each class held out (at least one clip of a class
    is always trained on; none is held out of a class with one clip), drawn with ``seed`` (a derived seed:
    :func:`feda2v_toolkit.runtime.seeds.derive_seed` ``(run seed, "split", site)``)."""
    g = torch.Generator().manual_seed(int(seed))
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = min(int(round(fraction * idx.numel())), idx.numel() - 1) if idx.numel() > 1 else 0
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    if not train_parts:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def check_partition(clips: int, nodes: int, *, how: str, alpha: float, option: str = "--nodes") -> None:
    """Refuse (one-line :class:`UsageError`) more nodes than clips (every node needs one; this also bounds the work
    per node before it starts) and a Dirichlet ``alpha`` outside ``(0, MAX_DIRICHLET_ALPHA]``; ``option`` is the
    command-line option that gave ``nodes``."""
    if not 1 <= nodes <= clips:
        raise UsageError(f"{spelled(option, 'nodes')} must be between 1 and the {clips} clips of the data, "
                         f"got {nodes}")
    if how == "dirichlet" and not 0 < alpha <= MAX_DIRICHLET_ALPHA:
        raise UsageError(f"{spelled('--alpha', 'alpha')} must be in (0, {MAX_DIRICHLET_ALPHA:g}], got {alpha:g}")


def assign(labels: torch.Tensor, num_classes: int, nodes: int, *, how: str, alpha: float = 0.3,
           seed: int = 0, option: str = "--nodes") -> torch.Tensor:
    """Node index per sequence. ``class``: class ``c`` goes to node ``c mod nodes`` (every node gets a class
    when there are at least as many classes as nodes); ``dirichlet``: each class's sequences are dealt to
    nodes in Dirichlet(``alpha``) proportions, the whole deal drawn again (from the same generator) while a node
    would get no sequence at all -- as NIID-Bench does -- up to :data:`DIRICHLET_TRIES` times."""
    check_partition(labels.numel(), nodes, how=how, alpha=alpha, option=option)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(labels.numel(), dtype=torch.long)
    if how == "class":
        if num_classes < nodes:
            raise UsageError(f"--by class needs at least as many classes ({num_classes}) as nodes ({nodes})")
        order = torch.randperm(num_classes, generator=g)
        owner = torch.empty(num_classes, dtype=torch.long)
        owner[order] = torch.arange(num_classes) % nodes
        return owner[labels]
    if how != "dirichlet":
        raise UsageError(f"unknown split {how!r}; use class or dirichlet")
    conc = torch.full((nodes,), float(alpha))
    for _ in range(DIRICHLET_TRIES):
        _deal(labels, num_classes, nodes, conc, g, out)
        if len(labels) < nodes or bool((torch.bincount(out, minlength=nodes) > 0).all()):
            break
    return out


#: how many Dirichlet deals :func:`assign` draws before it accepts one that leaves a node empty
DIRICHLET_TRIES = 1000


def _deal(labels: torch.Tensor, num_classes: int, nodes: int, conc: torch.Tensor, g: torch.Generator,
          out: torch.Tensor) -> None:
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        # Dirichlet draw from Gamma draws with our generator (torch.distributions has no generator argument)
        gam = torch._standard_gamma(conc.expand(1, nodes).contiguous(), generator=g).flatten()
        p = gam / gam.sum() if float(gam.sum()) > 0 else torch.full((nodes,), 1.0 / nodes)
        cuts = torch.round(torch.cumsum(p, 0) * idx.numel()).long()
        start = 0
        for node, end in enumerate(cuts.tolist()):
            out[idx[start:end]] = node
            start = end


def split_dataset(data: str | os.PathLike[str], out_dir: str | os.PathLike[str], nodes: int, *, how: str = "class",
                  alpha: float = 0.3, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write ``out_dir/node<i>.safetensors`` for every node; returns per-node paths and class counts.

    Every node file keeps the full class-name list (so labels mean the same everywhere); a node may hold
    no clips of some classes. A node that would get no clips at all is an error. The overwrite rule
    (:func:`~feda2v_toolkit.runtime.atomic.check_output`): ``out_dir`` is not, nor inside, nor holding the
    data; existing node files are replaced only with ``overwrite`` (other files in ``out_dir`` are left
    alone). All node files are written to a hidden staging directory first and moved into place together:
    a failure (a full disk) leaves nothing, not even a new empty ``out_dir``.
    """
    import shutil
    import tempfile

    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import dataset_metadata
    from feda2v_toolkit.errors import write_error
    from feda2v_toolkit.runtime.atomic import (
        check_inputs,
        check_output,
        make_parents,
        remove_created,
        remove_stale_temporaries,
        temp_prefix,
    )
    from feda2v_toolkit.runtime.tensorfile import StreamedTensor, write_streamed_file

    out = check_inputs(out_dir, [data], role="input dataset")
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory; split writes node files into a directory")
    ds = open_dataset(data)
    check_partition(len(ds), nodes, how=how, alpha=alpha)
    paths = [out / f"node{i}.safetensors" for i in range(nodes)]
    for path in paths:
        check_output(path, overwrite=overwrite)
    node_of = assign(ds.labels, ds.num_classes, nodes, how=how, alpha=alpha, seed=seed)
    empty = [i for i in range(nodes) if not bool((node_of == i).any())]
    if empty:
        raise InputError(f"{ds.path}: node(s) {short_list(empty, 10)} would get no clips "
                         f"({len(ds)} clips over {nodes} nodes); use fewer nodes or a larger alpha")
    result: dict[str, Any] = {"source": str(ds.path), "by": how, "seed": seed, "nodes": []}
    if how == "dirichlet":
        result["alpha"] = alpha
    created = make_parents(out / "node0.safetensors")
    staging: Path | None = None
    try:
        if not out.is_dir():
            out.mkdir()
            created.append(out)
        remove_stale_temporaries(out, ".partial")
        staging = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".partial", dir=out.parent))
        rows = max(1, SPLIT_CHUNK_BYTES // (ds.seq_len * ds.dim * 4))
        for i, path in enumerate(paths):
            idx = (node_of == i).nonzero().flatten()
            labels = ds.labels[idx].to(torch.long)

            def chunks(idx: torch.Tensor = idx) -> Iterator[torch.Tensor]:  # memory: a few chunks, not the node
                for batch in ds.batches(rows, idx, dtype=ds.storage_dtype):  # read ahead (data.readahead)
                    yield batch.embeddings

            tensors = {"embeddings": StreamedTensor(ds.storage_dtype, (idx.numel(), ds.seq_len, ds.dim), chunks),
                       "labels": StreamedTensor(torch.long, (idx.numel(),), lambda labels=labels: iter([labels]))}
            if ds.condition_dim:
                cond = ds.read_conditions(idx).to(torch.float32)
                tensors["conditions"] = StreamedTensor(torch.float32, tuple(cond.shape), lambda cond=cond: iter([cond]))
            write_streamed_file(staging / path.name, tensors, dataset_metadata(ds.class_names), display=path)
            counts = torch.bincount(labels, minlength=ds.num_classes).tolist()
            result["nodes"].append({"path": str(path), "clips": int(idx.numel()),
                                    "classes": {c: n for c, n in zip(ds.class_names, counts, strict=True) if n}})
        for path in paths:
            os.replace(staging / path.name, path)
        staging.rmdir()
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        handled = write_error(out, exc) if isinstance(exc, Exception) else None
        if handled is not None:
            raise handled from None
        raise
    return result
