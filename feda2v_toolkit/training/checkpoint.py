"""Training checkpoints: the model so far, optimiser and RNG state, in one safetensors file.

A checkpoint is a model file (see :mod:`feda2v_toolkit.model.file`) of kind ``checkpoint`` with extra
tensors ``optim.<generator index>.<optimiser name>.<param id>.<state key>`` and ``rng.torch``
(``rng.cuda`` on GPU), and a ``checkpoint`` metadata document holding the model document, the epoch
reached, the global step, the optimisers' non-tensor state, the metric history and fingerprints of
the config and data it was made from. Written atomically, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.file import (
    file_metadata,
    model_tensors_and_metadata,
    read_safetensors,
    unprefixed,
    write_safetensors,
)

CHECKPOINT_FORMAT = "checkpoint"


@dataclass
class TrainingState:
    """Where training stands; everything :func:`save_checkpoint` records besides the model."""

    epoch: int  # epochs completed
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    upsampler_metrics: dict[str, Any] | None = None  # set once the upsampler is fitted


def flatten_optimizer(prefix: str, state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (named under ``prefix``) and a JSON document."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars,
                     "tensor_params": sorted({str(pid) for pid in state["state"]})}


def unflatten_optimizer(prefix: str, tensors: Mapping[str, Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in unprefixed(tensors, prefix).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in doc.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": doc["param_groups"]}


def save_checkpoint(path: str | os.PathLike[str], model: GenerativeModel,
                    optimizers: Mapping[str, Mapping[str, torch.optim.Optimizer]], state: TrainingState) -> Path:
    """Write a checkpoint atomically. ``optimizers`` maps generator key -> named optimisers."""
    tensors, model_doc = model_tensors_and_metadata(model)
    optim_docs: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(model.generators):
        for name, opt in optimizers.get(key, {}).items():
            t, doc = flatten_optimizer(f"optim.{i}.{name}", opt.state_dict())
            tensors.update(t)
            optim_docs[f"{i}.{name}"] = doc
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    doc = {"model": model_doc, "epoch": state.epoch, "step": state.step, "history": state.history,
           "fingerprint": state.fingerprint, "upsampler_metrics": state.upsampler_metrics,
           "optimizers": optim_docs}
    return write_safetensors(path, tensors, file_metadata(CHECKPOINT_FORMAT, doc))


@dataclass
class LoadedCheckpoint:
    tensors: dict[str, Tensor]
    doc: dict[str, Any]
    state: TrainingState

    def restore_optimizers(self, model: GenerativeModel,
                           optimizers: Mapping[str, Mapping[str, torch.optim.Optimizer]]) -> None:
        for i, key in enumerate(model.generators):
            for name, opt in optimizers.get(key, {}).items():
                doc = self.doc["optimizers"].get(f"{i}.{name}")
                if doc is not None:
                    opt.load_state_dict(unflatten_optimizer(f"optim.{i}.{name}", self.tensors, doc))

    def restore_rng(self) -> None:
        torch.set_rng_state(self.tensors["rng.torch"])
        if "rng.cuda" in self.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.tensors["rng.cuda"])


def checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """The last completed epoch a checkpoint holds, from its header alone (no tensor is read)."""
    _shapes, meta = read_safetensors(path, expect=CHECKPOINT_FORMAT, shapes_only=True)
    return int(meta[CHECKPOINT_FORMAT]["epoch"])


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    tensors, meta = read_safetensors(path, expect=CHECKPOINT_FORMAT)
    doc = meta[CHECKPOINT_FORMAT]
    state = TrainingState(epoch=int(doc["epoch"]), step=int(doc["step"]), history=list(doc["history"]),
                          fingerprint=dict(doc["fingerprint"]), upsampler_metrics=doc.get("upsampler_metrics"))
    return LoadedCheckpoint(tensors, doc, state)
