"""`train` is `federate` with one site: the same pipeline writes the same bytes, and a federated run killed with
SIGKILL in the middle of a round resumes to exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from tests.commands.test_train_generate_cli import run

pytest.importorskip("flwr")

VAE = {"generator_type": "vae", "generator_training_sequence_length": 4, "generator_hidden_dim": 16,
       "generator_latent_dim": 4, "generator_batch_size": 8, "generator_training_epochs": 4,
       "generator_checkpoint_frequency": 3,  # train checkpoints every 3 epochs, federate every round of 2
       "federated_rounds": 2, "federated_local_epochs": 2}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("generator_type", ["gaussian", "vae"])
def test_federate_with_one_node_writes_the_bytes_of_train(generator_type, tiny_data, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({**VAE, "generator_type": generator_type}))
    run("train", "-c", "cfg.json", "-d", str(tiny_data), "-o", "train.safetensors", "--seed", "3", cwd=tmp_path)
    run("federate", "-c", "cfg.json", "--node", str(tiny_data), "-o", "fed.safetensors", "--seed", "3", cwd=tmp_path)
    assert sha256(tmp_path / "train.safetensors") == sha256(tmp_path / "fed.safetensors")


KILLED_IN_ROUND_THREE = """
import json, os, signal, sys
import feda2v_toolkit.training.site as site
from feda2v_toolkit.federated.engine import federate_local

real = site.train_epochs

def train_epochs(gen, optimizers, data, *, epochs, **kwargs):
    epochs = list(epochs)
    if 2 in epochs:  # round 3 (one local epoch per round): one step, then die without any cleanup
        kwargs["on_step"] = lambda _t, _n: os.kill(os.getpid(), signal.SIGKILL)
    return real(gen, optimizers, data, epochs=epochs, **kwargs)

site.train_epochs = train_epochs
cfg, nodes, out = json.loads(sys.argv[1])
federate_local(cfg, nodes, out=out, seed=0)
"""


def test_a_federated_run_killed_in_round_3_of_5_resumes_to_the_uninterrupted_bytes(two_nodes, tmp_path):
    from feda2v_toolkit.federated.engine import federate_local
    from feda2v_toolkit.training.checkpoint import load_checkpoint

    cfg = {**VAE, "federated_rounds": 5, "federated_local_epochs": 1, "generator_granularity": "per_class"}
    federate_local(cfg, two_nodes, out=tmp_path / "whole.safetensors", seed=0)

    out = tmp_path / "killed.safetensors"
    child = subprocess.run([sys.executable, "-c", KILLED_IN_ROUND_THREE,
                            json.dumps([cfg, [str(p) for p in two_nodes], str(out)])], timeout=300, check=False)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    checkpoint = tmp_path / "killed.checkpoints" / "generator.checkpoint.safetensors"
    state = load_checkpoint(checkpoint).state
    assert (state.round, state.epoch) == (2, 2)

    federate_local(cfg, two_nodes, out=out, seed=0, resume=True)
    assert sha256(out) == sha256(tmp_path / "whole.safetensors")
