"""Partitions into one dataset per node: what is written, and what is refused before any work."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import MAX_DIRICHLET_ALPHA, assign, split_dataset
from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.errors import UsageError


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "d.safetensors", torch.randn(8, 3, 2), torch.arange(8) % 4)


def test_every_clip_lands_on_exactly_one_node(data, tmp_path):
    result = split_dataset(data, tmp_path / "nodes", 2, how="dirichlet", alpha=1.0)
    assert sum(node["clips"] for node in result["nodes"]) == 8
    assert sum(len(open_dataset(tmp_path / "nodes" / f"node{i}.safetensors")) for i in range(2)) == 8


@pytest.mark.parametrize("nodes", [0, 9, 10**9])
def test_more_nodes_than_clips_is_refused_before_any_node_file_is_considered(data, tmp_path, nodes):
    with pytest.raises(UsageError, match=f"nodes must be between 1 and the 8 clips of the data, got {nodes}"):
        split_dataset(data, tmp_path / "nodes", nodes)
    assert not (tmp_path / "nodes").exists()


@pytest.mark.parametrize("alpha", [0.0, -1.0, MAX_DIRICHLET_ALPHA * 10, 1e308, float("inf"), float("nan")])
def test_a_dirichlet_alpha_outside_its_range_is_refused(data, tmp_path, alpha):
    with pytest.raises(UsageError, match="alpha must be in"):
        split_dataset(data, tmp_path / "nodes", 2, how="dirichlet", alpha=alpha)
    with pytest.raises(UsageError, match="alpha must be in"):
        assign(torch.arange(8) % 4, 4, 2, how="dirichlet", alpha=alpha)


def test_the_largest_alpha_deals_each_class_almost_evenly():
    labels = torch.zeros(1000, dtype=torch.long)
    counts = torch.bincount(assign(labels, 1, 4, how="dirichlet", alpha=MAX_DIRICHLET_ALPHA), minlength=4)
    assert counts.tolist() == [250, 250, 250, 250]
