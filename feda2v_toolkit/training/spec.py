"""The resolved run: a config validated once and turned into typed settings (:class:`RunSpec`).

``RunSpec.resolve(config, overrides=..., seed=...)`` reads the config through the config layer (migrated in
memory, validated against the schema, every default filled in from the schema), fixes the seed (drawn at
random and recorded when neither the config nor the caller gives one) and exposes every setting the
pipeline needs as a typed attribute. Nothing downstream re-reads or re-casts config values; components
still receive the resolved section (``spec.config``) because their ``from_config`` reads their own keys.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from feda2v_toolkit.model.bundle import UNIFIED_KEY

OTHER_GROUP = "other"


@dataclass(frozen=True)
class Schedule:
    """How trained generators are trained: ``epochs`` in all, merged (and checkpointed) every ``per_round``.

    ``train`` runs ``generator_training_epochs`` in rounds of ``generator_checkpoint_frequency`` epochs (one
    site: a merge changes nothing, a round only marks a checkpoint); ``federate`` runs ``federated_rounds``
    rounds of ``federated_local_epochs``. An epoch's batches depend only on the run seed, the site, the
    generator and the epoch's index, and optimiser state travels with the weights, so the round length
    never changes what one site learns.
    """

    epochs: int
    per_round: int

    @property
    def rounds(self) -> int:
        return max(1, math.ceil(self.epochs / self.per_round))

    def round_epochs(self, r: int) -> range:
        return range(r * self.per_round, min((r + 1) * self.per_round, self.epochs))


@dataclass(frozen=True)
class RunSpec:
    """Every setting of a training run, typed (module docstring)."""

    config: dict[str, Any]
    seed: int
    seed_drawn: bool
    generator_type: str
    granularity: str
    training_length: int
    output_length: int | None
    reducer: str
    upsampler: str
    normalize: bool
    validation_split: float
    batch_size: int
    validation_frequency: int
    autocast: str
    save_checkpoints: bool
    checkpoint_frequency: int
    checkpoint_dir: str
    checkpoint_base_name: str
    load_checkpoint: bool
    epochs: int
    rounds: int
    local_epochs: int
    upsampler_rounds: int
    round_timeout: float
    classes: list[str] | None
    node_dp_noise: float
    node_dp_clip: float
    node_dp_delta: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(cls, config: Any, *, overrides: Mapping[str, Any] | None = None, seed: int | None = None,
                fallback_seed: Callable[[], int | None] | None = None) -> RunSpec:
        """Load ``config`` (path, JSON text, mapping) with ``overrides``; ``seed`` overrides ``generator_seed``;
        ``fallback_seed`` (e.g. a checkpoint's seed) is asked before a seed is drawn at random."""
        from feda2v_toolkit.config import load_config

        cfg = dict(load_config(config, overrides=overrides))
        return cls.from_section(cfg, seed=seed, fallback_seed=fallback_seed)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *, seed: int | None = None,
                     fallback_seed: Callable[[], int | None] | None = None) -> RunSpec:
        """From a generator section that is already resolved (validated, every default filled in), e.g. the
        config a site receives from the pipeline."""
        from feda2v_toolkit.config import configured_upsampler

        cfg = dict(section)
        drawn = False
        if seed is None:
            seed = cfg.get("generator_seed")
        if seed is None and fallback_seed is not None:
            seed = fallback_seed()
        if seed is None:
            seed, drawn = secrets.randbits(31), True
        cfg["generator_seed"] = int(seed)
        return cls(
            config=cfg, seed=int(seed), seed_drawn=drawn,
            generator_type=cfg["generator_type"], granularity=cfg["generator_granularity"],
            training_length=cfg["generator_training_sequence_length"],
            output_length=cfg["generator_output_sequence_length"], reducer=cfg["generator_reducer"],
            upsampler=configured_upsampler(cfg), normalize=cfg["generator_normalize"],
            validation_split=float(cfg["generator_validation_split"]), batch_size=cfg["generator_batch_size"],
            validation_frequency=cfg["generator_validation_frequency"], autocast=cfg["generator_autocast"],
            save_checkpoints=cfg["generator_save_checkpoint"],
            checkpoint_frequency=cfg["generator_checkpoint_frequency"],
            checkpoint_dir=cfg["generator_checkpoint_dir"], checkpoint_base_name=cfg["generator_checkpoint_base_name"],
            load_checkpoint=cfg["generator_load_checkpoint"], epochs=cfg["generator_training_epochs"],
            rounds=cfg["federated_rounds"], local_epochs=cfg["federated_local_epochs"],
            upsampler_rounds=cfg["federated_upsampler_rounds"], round_timeout=float(cfg["federated_round_timeout"]),
            classes=list(cfg["generator_classes"]) if cfg.get("generator_classes") else None,
            node_dp_noise=float(cfg["federated_dp_noise_multiplier"]),
            node_dp_clip=float(cfg["federated_dp_clipping_norm"]), node_dp_delta=float(cfg["federated_dp_delta"]))

    # -- derived -----------------------------------------------------------------------------------
    @property
    def autocast_dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.autocast == "bfloat16" else None

    def single_site_schedule(self) -> Schedule:
        """``train``: all epochs, in rounds of the checkpoint frequency."""
        return Schedule(self.epochs, self.checkpoint_frequency)

    def federated_schedule(self) -> Schedule:
        """``federate``: ``federated_rounds`` rounds of ``federated_local_epochs``."""
        return Schedule(self.rounds * self.local_epochs, self.local_epochs)

    def generator_groups(self, class_names: list[str], present: list[str]) -> dict[str, list[str]]:
        """Generator key -> the classes it serves (:func:`generator_groups`)."""
        return generator_groups(self.config, class_names, present)


def generator_groups(cfg: Mapping[str, Any], class_names: list[str], present: list[str]) -> dict[str, list[str]]:
    """Generator key -> the classes it serves, for the configured granularity (``present``: classes with data)."""
    from feda2v_toolkit.errors import InputError

    granularity = cfg["generator_granularity"]
    if granularity == "unified":
        return {UNIFIED_KEY: list(present)}
    if granularity == "per_class":
        return {c: [c] for c in present}
    groups = cfg.get("generator_class_groups") or {}
    if not groups:
        raise InputError("generator_granularity is 'per_group' but generator_class_groups is empty")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for group, members in groups.items():
        for c in members:
            if c not in class_names:
                raise InputError(f"generator_class_groups[{group!r}] names class {c!r}, which is not in the data "
                                 f"(classes: {', '.join(class_names)})")
            if c in seen:
                raise InputError(f"class {c!r} is in groups {seen[c]!r} and {group!r}")
            seen[c] = group
        out[group] = [c for c in members if c in present]
    rest = [c for c in present if c not in seen]
    if rest:  # as the original code did: ungrouped classes share one more generator
        if OTHER_GROUP in out:
            raise InputError(f"classes {rest} are in no group and the group name {OTHER_GROUP!r} is taken")
        out[OTHER_GROUP] = rest
    return {g: members for g, members in out.items() if members}
