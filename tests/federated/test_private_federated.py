"""Record-level DP over Flower's messages: the same private stages as ``train``, each site's release noised
before it leaves; the run's spend is the largest over the sites."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from feda2v_toolkit.federated.engine import federate_local  # noqa: E402


def test_a_private_federated_run_spends_at_most_its_target_at_every_site(tmp_path):
    from feda2v_toolkit.data.demo import write_demo_dataset
    from feda2v_toolkit.data.split import split_dataset

    data = write_demo_dataset(tmp_path / "d.safetensors", 60, seq_len=12, dim=8)
    nodes = [n["path"] for n in split_dataset(data, tmp_path / "nodes", 2, how="dirichlet", alpha=0.3,
                                               seed=0)["nodes"]]
    cfg = {"generator_type": "gaussian", "generator_training_sequence_length": 4, "generator_dp_epsilon": 8.0,
           "generator_dp_delta": 1e-3}
    model = federate_local(cfg, nodes, out=tmp_path / "fed.safetensors", seed=0)
    p = model.metrics["privacy"]
    assert set(p["sites"]) == {"node0.safetensors", "node1.safetensors"}
    assert all(s["epsilon"] <= 8.0 * (1 + 1e-9) for s in p["sites"].values())
    assert p["epsilon"] == pytest.approx(max(s["epsilon"] for s in p["sites"].values()))
    assert all(site["classes"] == {} for site in model.metrics["sites"])  # no exact counts per site
    assert model.sample(2, class_name=model.sampleable_classes[0]).isfinite().all()
