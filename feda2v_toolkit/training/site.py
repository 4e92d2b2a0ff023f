"""What a federated node does with its own data, stage by stage (no engine here: the Flower app calls it).

A :class:`Site` holds one node's dataset, its stratified train/held-out split, the reduced cache and the
generators it trains. Every request names a stage and carries tensors (``arrays``) and JSON (``meta``);
:func:`handle` answers it with the node's part. Only weights and sums leave the node.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, TrainContext
from feda2v_toolkit.config import configured_upsampler
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.errors import InputError
from feda2v_toolkit.training.stages import (
    ClassesStage,
    FittedStatisticsStage,
    NormalizationStage,
    WeightsStage,
    has_statistics,
)

Arrays = dict[str, Tensor]
Meta = dict[str, Any]

#: stage names of the protocol between the server and the nodes
STAGES = ("describe", "reducer", "normalization", "upsampler", "upsampler_round", "generators",
          "generator_statistics")


def pack(prefix: str, state: Mapping[str, Tensor]) -> Arrays:
    return {f"{prefix}{k}": v.detach().to("cpu") for k, v in state.items()}


def unpack(prefix: str, arrays: Mapping[str, Tensor]) -> Arrays:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


class Site:
    """One node's data and training state. ``cfg`` is the resolved generator config (seed included)."""

    def __init__(self, data: str | os.PathLike[str] | Dataset, cfg: Mapping[str, Any]) -> None:
        from feda2v_toolkit.training.pipeline import stratified_split

        self.ds = data if isinstance(data, Dataset) else open_dataset(data)
        self.cfg = dict(cfg)
        self.seed = int(cfg["generator_seed"])
        self.length = int(cfg["generator_training_sequence_length"])
        self.train_idx, self.val_idx = stratified_split(self.ds.labels, float(cfg["generator_validation_split"]),
                                                        self.seed)
        self.reduced: Tensor | None = None  # raw reduced cache, standardised in place by set_normalization
        self.normalized = False
        self.generators: dict[str, Generator] = {}
        self.optimizers: dict[str, Any] = {}
        self.store: Arrays = {}  # what must survive the site being rebuilt (reducer state, normalisation)
        self.step = 0

    @property
    def name(self) -> str:
        return Path(self.ds.path).name

    # -- components built from the shared config ---------------------------------------------------
    def _reducer(self) -> Any:
        from feda2v_toolkit.plugins import get_registry

        return get_registry().load("reducer", self.cfg["generator_reducer"]).from_config(
            self.cfg, length=self.length, full_length=self.ds.seq_len, dim=self.ds.dim)

    def _upsampler(self) -> Any:
        from feda2v_toolkit.plugins import get_registry

        return get_registry().load("upsampler", configured_upsampler(self.cfg)).from_config(
            self.cfg, reduced_length=self.length, full_length=self.ds.seq_len, dim=self.ds.dim)

    # -- stages --------------------------------------------------------------------------------------
    def describe(self) -> Meta:
        return {"summary": ClassesStage().local(self.ds).to_json(), "name": self.name,
                "train": int(self.train_idx.numel()), "heldout": int(self.val_idx.numel())}

    def reducer_statistics(self) -> Arrays:
        from feda2v_toolkit.training.pipeline import full_batches

        reducer = self._reducer()
        if not has_statistics(reducer):
            raise InputError(f"reducer {self.cfg['generator_reducer']!r} cannot be fitted federatedly "
                             f"(it has no fit_statistics/fit_from_statistics)")
        return FittedStatisticsStage().local(reducer, full_batches(self.ds, self.train_idx))

    def set_reducer(self, state: Mapping[str, Tensor]) -> None:
        """Load the merged reducer and reduce every local sequence once (raw cache)."""
        from feda2v_toolkit.training.pipeline import reduce_dataset

        reducer = self._reducer()
        reducer.load_state_dict(dict(state))
        reducer.eval()
        self.reduced = reduce_dataset(self.ds, reducer)
        self.normalized = False
        self.store.update(pack("reducer.", state))
        self.store["reduced"] = torch.ones(())  # marks a reducer as set (a reducer may have no state at all)

    def normalization_part(self) -> Arrays:
        assert self.reduced is not None
        return NormalizationStage().local(self.reduced, self.train_idx)

    def upsampler_statistics(self) -> Arrays:
        return FittedStatisticsStage().local(self._upsampler(), self._pairs())

    def upsampler_round(self, state: Mapping[str, Tensor]) -> tuple[Arrays, int, Meta]:
        ups = self._upsampler()
        ups.load_state_dict(dict(state))
        ups.train()
        metrics = ups.fit(self._pairs(), config=self.cfg) or {}
        return ups.state_dict(), int(self.train_idx.numel()), metrics

    def _pairs(self) -> Any:
        from feda2v_toolkit.training.pipeline import read_chunk_rows, upsampler_pairs

        assert self.reduced is not None and not self.normalized
        rows = max(1, min(int(self.cfg["generator_batch_size"]), read_chunk_rows(self.ds)))
        return upsampler_pairs(self.ds, self.train_idx, self.reduced, rows, self.seed)

    def set_normalization(self, norm: Mapping[str, Tensor]) -> None:
        assert self.reduced is not None
        if norm and not self.normalized:
            self.reduced.sub_(norm["mean"]).div_(norm["std"])
            self.normalized = True
            self.store.update(pack("norm.", norm))

    def restore(self, store: Mapping[str, Tensor]) -> None:
        """Rebuild the reduced (and standardised) cache from what an earlier message left in ``store``."""
        if "reduced" in store and self.reduced is None:
            self.set_reducer(unpack("reducer.", store))
            norm = unpack("norm.", store)
            if norm:
                self.set_normalization(norm)

    def _global_labels(self, class_names: list[str]) -> tuple[Tensor, Tensor | None]:
        to_global = torch.tensor([class_names.index(c) for c in self.ds.class_names], dtype=torch.long)
        conditions = self.ds.read_conditions(range(len(self.ds))) if self.ds.condition_dim else None
        return to_global[self.ds.labels], conditions

    def generator_statistics(self, keys: list[str], groups: Mapping[str, list[str]],
                             class_names: list[str]) -> tuple[Arrays, Meta]:
        """Closed-form generators (``fitted = True``): each held key's ``fit_statistics`` on this node's
        training sequences of its classes, as ``g{i}.``-prefixed arrays; the meta says which directions of the
        within-class scatter were left out (each class's factor keeps at most the generator's rank)."""
        from feda2v_toolkit.plugins import get_registry

        assert self.reduced is not None
        gen_cls = get_registry().load("generator", self.cfg["generator_type"])
        labels, conditions = self._global_labels(class_names)
        out: Arrays = {}
        examples: dict[str, int] = {}
        truncated: dict[str, dict[str, float]] = {}
        for i, key in enumerate(keys):
            members = torch.tensor([class_names.index(c) for c in groups[key]], dtype=torch.long)
            idx = self.train_idx[torch.isin(labels[self.train_idx], members)]
            if idx.numel() == 0:
                continue
            gen = gen_cls.from_config(self.cfg, seq_len=self.length, dim=self.ds.dim, num_classes=len(class_names),
                                      condition_dim=self.ds.condition_dim)
            rank = getattr(gen, "rank", None)
            stats = gen.fit_statistics(self.reduced[idx], labels=labels[idx],
                                       conditions=conditions[idx] if conditions is not None else None,
                                       max_rank=rank)
            counts, rows = stats["counts"], stats["factor_rows"]
            short = (rows < (counts - 1).clamp(min=0)).nonzero().flatten().tolist()
            if short:  # a class with more sequences than the rank: its factor keeps the top `rank` directions
                kept = float(stats["factors"].square().sum())
                truncated[key] = {"classes": [class_names[c] if gen.conditioning == "label" else key for c in short],
                                  "variance_left_out": 1.0 - kept / max(float(stats["square"].sum()), 1e-300)}
            out.update(pack(f"g{i}.", stats))
            examples[key] = int(idx.numel())
        return out, {"examples": examples, "truncated": truncated}

    def train_generators(self, states: Mapping[str, Mapping[str, Tensor]], groups: Mapping[str, list[str]],
                         class_names: list[str], round_index: int, rounds: int) -> Any:
        """Local epochs of every generator this node holds data for, from ``states``; a :class:`WeightsPart`."""
        from feda2v_toolkit.plugins import get_registry

        assert self.reduced is not None
        cfg = self.cfg
        epochs = int(cfg["federated_local_epochs"])
        gen_cls = get_registry().load("generator", cfg["generator_type"])
        labels, conditions = self._global_labels(class_names)
        batch_size = int(cfg["generator_batch_size"])
        autocast = torch.bfloat16 if cfg.get("generator_autocast") == "bfloat16" else None
        total_epochs = rounds * epochs
        salt = int.from_bytes(self.name.encode()[:6].ljust(6, b"\0"), "little") % 100_003

        def train(key: str, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int, dict[str, float]]:
            members = torch.tensor([class_names.index(c) for c in groups[key]], dtype=torch.long)
            idx = self.train_idx[torch.isin(labels[self.train_idx], members)]
            if idx.numel() == 0:
                return {}, 0, {}
            gen = self.generators.get(key)
            if gen is None:
                gen = self.generators[key] = gen_cls.from_config(
                    cfg, seq_len=self.length, dim=self.ds.dim, num_classes=len(class_names),
                    condition_dim=self.ds.condition_dim)
                self.optimizers[key] = gen.configure_optimizers(cfg)
            gen.load_state_dict(dict(state))
            gen.train()
            losses: list[float] = []
            nb = max(1, math.ceil(idx.numel() / batch_size))
            for e in range(epochs):
                epoch = round_index * epochs + e
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + salt + len(key))
                perm = idx[torch.randperm(idx.numel(), generator=g)]
                for b in range(nb):
                    rows = perm[b * batch_size:(b + 1) * batch_size]
                    ctx = TrainContext(epoch=epoch, total_epochs=total_epochs, step=self.step,
                                       progress=(epoch + b / nb) / total_epochs, config=cfg, autocast_dtype=autocast)
                    terms = gen.training_step(self.reduced[rows], labels=labels[rows],
                                              conditions=conditions[rows] if conditions is not None else None,
                                              optimizers=self.optimizers[key], ctx=ctx)
                    if not all(math.isfinite(v) for v in terms.values()):
                        raise InputError(f"{self.name}: training diverged in round {round_index + 1} (generator "
                                         f"{key!r}); lower generator_learning_rate")
                    losses.append(float(terms["loss"]))
                    self.step += 1
            metrics = {"loss": sum(losses) / len(losses)}
            val = self.val_idx[torch.isin(labels[self.val_idx], members)]
            if val.numel():
                gen.eval()
                with torch.no_grad():
                    ctx = TrainContext(epoch=total_epochs - 1, total_epochs=total_epochs, step=0,
                                       progress=(round_index + 1) / rounds, config=cfg, autocast_dtype=autocast)
                    terms = gen.loss_terms(self.reduced[val], labels=labels[val],
                                           conditions=conditions[val] if conditions is not None else None, ctx=ctx)
                metrics["val_loss"] = float(terms["loss"])
            return {k: v.detach().clone() for k, v in gen.state_dict().items()}, int(idx.numel()), metrics

        return WeightsStage().local(states, train, [k for k in groups if k in states])


def handle(site: Site, stage: str, arrays: Mapping[str, Tensor], meta: Mapping[str, Any]) -> tuple[Arrays, Meta]:
    """Answer one request of the server: the node's part of ``stage``."""
    if stage == "describe":
        return {}, site.describe()
    site.restore(site.store)
    if stage == "reducer":
        return site.reducer_statistics(), {}
    if stage == "normalization":
        site.set_reducer(unpack("reducer.", arrays))
        return site.normalization_part(), {}
    if stage == "upsampler":
        return site.upsampler_statistics(), {}
    if stage == "upsampler_round":
        state, n, metrics = site.upsampler_round(unpack("upsampler.", arrays))
        return pack("upsampler.", state), {"examples": n, "metrics": _jsonable(metrics)}
    if stage in ("generators", "generator_statistics"):
        norm = unpack("norm.", arrays)
        if norm:
            site.set_normalization(norm)
    if stage == "generator_statistics":
        t0 = time.perf_counter()
        out, info = site.generator_statistics(list(meta["keys"]), meta["groups"], list(meta["class_names"]))
        return out, {**info, "seconds": time.perf_counter() - t0}
    if stage == "generators":
        keys = list(meta["keys"])
        states = {key: unpack(f"g{i}.", arrays) for i, key in enumerate(keys)}
        states = {k: v for k, v in states.items() if v}
        t0 = time.perf_counter()
        part = site.train_generators(states, meta["groups"], list(meta["class_names"]), int(meta["round"]),
                                     int(meta["rounds"]))
        seconds = time.perf_counter() - t0
        # the reply carries every array of the request, in its order (what it did not train unchanged), as
        # Flower's fixedclipping_mod requires: the update it clips is reply minus request
        out: Arrays = {k: v for k, v in arrays.items()}
        for i, key in enumerate(keys):
            if key in part.weights:
                out.update(pack(f"g{i}.", part.weights[key]))
        return out, {"examples": part.examples, "metrics": part.metrics, "seconds": seconds}
    raise ValueError(f"unknown stage {stage!r}")


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))
