"""Shared fixtures for generator tests: resolved configs with tiny dims, contexts, toy data."""

from __future__ import annotations

from typing import Any

import torch

from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.config import schema_defaults

L, D, H, Z = 4, 8, 16, 4


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """Schema defaults with tiny network dims (and no dropout unless asked)."""
    return schema_defaults() | {"generator_training_sequence_length": L, "generator_hidden_dim": H,
                                "generator_latent_dim": Z, "generator_dropout": 0.0} | overrides


def ctx(config: dict[str, Any], progress: float = 1.0, step: int = 0) -> TrainContext:
    return TrainContext(epoch=0, total_epochs=1, step=step, progress=progress, config=config)


def two_class_data(n_per_class: int = 32, seed: int = 0,
                   sep: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two well-separated classes ``(x [2n, L, D], labels [2n], means [2, L, D])``: class means
    ``+/- sep * pattern`` (a random sign pattern) plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(L, D, generator=g).sign()
    labels = torch.arange(2).repeat_interleave(n_per_class)
    means = torch.stack([sep * pattern, -sep * pattern])
    x = means[labels] + 0.3 * torch.randn(2 * n_per_class, L, D, generator=g)
    return x, labels, means
