"""Shared fixtures: tiny AST-like datasets and configs (unit tests never use real AST shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: tiny shapes: 50 tokens of width 16, 4 classes
TINY = {"seq_len": 50, "dim": 16}


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Each test sees a freshly loaded plugin registry (no state leaks between tests)."""
    from feda2v_toolkit.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture(autouse=True)
def _default_memory_budget():
    """Each test starts and ends with the default memory budget (a test may set the process-wide one)."""
    from feda2v_toolkit.runtime.resources import set_memory_budget

    set_memory_budget(None)
    yield
    set_memory_budget(None)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A demo dataset file: 4 classes x 10 clips of [50, 16] float16."""
    from feda2v_toolkit.data.demo import write_demo_dataset

    path = tmp_path_factory.mktemp("data") / "tiny.safetensors"
    return write_demo_dataset(path, 10, **TINY)


@pytest.fixture
def tiny_config(tmp_path) -> dict:
    """A generator section for an epoch-trained type (the label-conditioned VAE) with tiny network sizes;
    checkpoints go to the test's tmp dir."""
    return {
        "generator_type": "vae",
        "generator_upsampler": "linear",
        "generator_training_sequence_length": 4,
        "generator_hidden_dim": 32,
        "generator_latent_dim": 8,
        "generator_training_epochs": 4,
        "generator_batch_size": 8,
        "generator_checkpoint_dir": str(tmp_path / "checkpoints"),
        "generator_checkpoint_frequency": 2,
        "use_conditioned_vae": True,
        "generator_seed": 0,
    }
