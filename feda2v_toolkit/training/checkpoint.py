"""Training checkpoints: the model so far and the merged optimiser state, in one safetensors file.

The pipeline writes one after every round (``train``: every ``generator_checkpoint_frequency`` epochs;
``federate``: every round), on the side that merges: the state of the run is the merged state. A
checkpoint is a model file (see :mod:`feda2v_toolkit.model.file`) of kind ``checkpoint`` with extra tensors
``optim.<generator index>.<optimiser name>.<param id>.<state key>``, and a ``checkpoint`` metadata document
holding the model document, the epochs and rounds completed, the global step, the optimisers' non-tensor
state, the metric history and fingerprints of the config and data it was made from. No RNG state is
needed: every epoch seeds its own streams (:mod:`feda2v_toolkit.runtime.seeds`). Written atomically, so a
kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    round: int = 0  # rounds completed (merges of trained generators)
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
                    optimizers: Mapping[str, tuple[Mapping[str, Tensor], Mapping[str, Any]]], state: TrainingState) -> Path:
    """Write a checkpoint atomically. ``optimizers`` maps generator key -> the merged optimiser state as
    flattened tensors and their JSON documents (:func:`feda2v_toolkit.training.site.flatten_optimizers`)."""
    tensors, model_doc = model_tensors_and_metadata(model)
    optim_docs: dict[str, Any] = {}
    for i, key in enumerate(model.generators):
        if key in optimizers:
            flat, docs = optimizers[key]
            tensors.update({f"optim.{i}.{k}": v for k, v in flat.items()})
            optim_docs[str(i)] = dict(docs)
    doc = {"model": model_doc, "epoch": state.epoch, "round": state.round, "step": state.step,
           "history": state.history, "fingerprint": state.fingerprint, "upsampler_metrics": state.upsampler_metrics,
           "optimizers": optim_docs}
    return write_safetensors(path, tensors, file_metadata(CHECKPOINT_FORMAT, doc))


@dataclass
class LoadedCheckpoint:
    tensors: dict[str, Tensor]
    doc: dict[str, Any]
    state: TrainingState

    def optimizer_state(self, index: int) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The flattened optimiser state of the ``index``-th generator, if the checkpoint holds one."""
        docs = self.doc.get("optimizers", {}).get(str(index))
        if docs is None:
            return None
        return unprefixed(self.tensors, f"optim.{index}"), docs


def checkpoint_epoch(path: str | os.PathLike[str]) -> int:
    """The last completed epoch a checkpoint holds, from its header alone (no tensor is read)."""
    _shapes, meta = read_safetensors(path, expect=CHECKPOINT_FORMAT, shapes_only=True)
    return int(meta[CHECKPOINT_FORMAT]["epoch"])


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    tensors, meta = read_safetensors(path, expect=CHECKPOINT_FORMAT)
    doc = meta[CHECKPOINT_FORMAT]
    state = TrainingState(epoch=int(doc["epoch"]), step=int(doc["step"]), round=int(doc.get("round", 0)),
                          history=list(doc["history"]), fingerprint=dict(doc["fingerprint"]),
                          upsampler_metrics=doc.get("upsampler_metrics"))
    return LoadedCheckpoint(tensors, doc, state)
