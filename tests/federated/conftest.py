"""Node datasets cut from the tiny demo dataset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def two_nodes(tiny_data, tmp_path_factory) -> list[Path]:
    """Node 0 holds engine + drum + half of whistle, node 1 the other half of whistle + bird (class names shared)."""
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import write_dataset

    ds = open_dataset(tiny_data)
    batch = ds.read(range(len(ds)))
    y = batch.labels
    whistle = (y == 2).nonzero().flatten()
    node0 = (y < 2).clone()
    node0[whistle[: whistle.numel() // 2]] = True
    out = tmp_path_factory.mktemp("nodes")
    paths = []
    for i, mask in enumerate([node0, ~node0]):
        paths.append(write_dataset(out / f"node{i}.safetensors", batch.embeddings[mask], y[mask],
                                   class_names=ds.class_names) or out / f"node{i}.safetensors")
    return [Path(p) for p in paths]
