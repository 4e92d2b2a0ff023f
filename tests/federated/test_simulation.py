"""Flower's Simulation Engine (Ray): many virtual sites sharing one dataset run the same pipeline."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def test_virtual_sites_fit_the_gaussian_of_the_whole_data(tiny_data, tiny_config, tmp_path):
    from feda2v_toolkit.federated.simulation import federate_simulation
    from feda2v_toolkit.model.file import load_model
    from feda2v_toolkit.training.pipeline import train

    cfg = {**tiny_config, "generator_type": "gaussian", "generator_validation_split": 0,
           "generator_save_checkpoint": False, "generator_latent_dim": 64}
    out = tmp_path / "sim.safetensors"
    model = federate_simulation(cfg, tiny_data, sites=3, how="dirichlet", alpha=0.5, out=out, seed=0)
    assert len(model.metrics["sites"]) == 3 and model.metrics["run"]["engine"] == "simulation"
    central = train(cfg, tiny_data, seed=0)
    got, want = load_model(out).generators["all"].state_dict(), central.generators["all"].state_dict()
    for k in ("means", "counts", "shrinkage", "scale"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
