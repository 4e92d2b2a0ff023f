"""`feda2v-tk split` and `feda2v-tk federate` through the installed executable."""

from __future__ import annotations

import json

import pytest

from .test_train_generate_cli import run

pytest.importorskip("flwr")

CONFIG = {"generator_type": "vae", "generator_training_sequence_length": 4, "generator_hidden_dim": 16, "generator_latent_dim": 4,
          "generator_batch_size": 8, "generator_save_checkpoint": False, "federated_rounds": 2}


def test_split_then_federate_then_inspect_generate_evaluate(tiny_data, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    split = run("split", str(tiny_data), "-o", "nodes", "--nodes", "2", "--by", "class", "--seed", "0", "--json",
                cwd=tmp_path)
    nodes = json.loads(split.stdout)["nodes"]
    assert [sorted(n["classes"]) for n in nodes] and sum(n["clips"] for n in nodes) == 40
    assert not set(nodes[0]["classes"]) & set(nodes[1]["classes"])  # class ownership
    fed = run("federate", "-c", "cfg.json", "--node", "nodes/node0.safetensors", "--node", "nodes/node1.safetensors",
              "-o", "fed.safetensors", "--granularity", "per_class", "--seed", "0", "--json", cwd=tmp_path)
    assert "round 1/2" in fed.stderr and "round 2/2" in fed.stderr
    summary = json.loads(fed.stdout)
    assert len(summary["metrics"]["run"]["rounds"]) == 2 and len(summary["metrics"]["sites"]) == 2
    info = run("inspect", "fed.safetensors", cwd=tmp_path).stdout
    assert "federated:   2 sites (node0.safetensors, node1.safetensors), 2 rounds x 1 local epochs" in info
    run("generate", "fed.safetensors", "-o", "syn", "--samples-per-class", "2", cwd=tmp_path)
    run("evaluate", "fed.safetensors", "--data", str(tiny_data), cwd=tmp_path)
    again = run("federate", "-c", "cfg.json", "--node", "nodes/node0.safetensors", "-o", "fed.safetensors",
                cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_split_by_dirichlet_deals_every_class_over_the_nodes(tiny_data, tmp_path):
    out = run("split", str(tiny_data), "-o", "nodes", "--nodes", "3", "--by", "dirichlet", "--alpha", "0.5",
              "--seed", "1", "--json", cwd=tmp_path)
    nodes = json.loads(out.stdout)["nodes"]
    assert len(nodes) == 3 and sum(n["clips"] for n in nodes) == 40
    again = run("split", str(tiny_data), "-o", "nodes", "--nodes", "3", "--by", "dirichlet", "--alpha", "0.5",
                "--seed", "1", "--json", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_federate_with_a_missing_node_dataset_is_one_line(tmp_path):
    out = run("federate", "--node", "nope.safetensors", "-o", "m.safetensors", cwd=tmp_path, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["feda2v-tk: error: nope.safetensors: no such dataset"]


def test_a_closed_form_generator_federates_without_rounds_and_inspect_says_so(tiny_data, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({**CONFIG, "generator_latent_dim": 32}))  # no site cuts
    run("split", str(tiny_data), "-o", "nodes", "--nodes", "2", "--by", "dirichlet", "--seed", "0", cwd=tmp_path)
    fed = run("federate", "-c", "cfg.json", "--node", "nodes/node0.safetensors", "--node", "nodes/node1.safetensors",
              "-o", "fed.safetensors", "--generator-type", "gaussian", "--seed", "0", cwd=tmp_path)
    assert "statistics (exact)" in fed.stderr and "round 1/" not in fed.stderr
    info = run("inspect", "fed.safetensors", cwd=tmp_path).stdout
    assert "generators fitted from merged statistics" in info and "no differential privacy" in info
