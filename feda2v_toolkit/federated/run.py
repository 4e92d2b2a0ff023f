"""``federate``: the training pipeline over federated sites, whatever engine moves the messages."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.training.checkpoint import load_checkpoint
from feda2v_toolkit.training.pipeline import (
    Transport,
    check_outputs,
    checkpoint_path,
    default_checkpoint_dir,
    run_pipeline,
)
from feda2v_toolkit.training.spec import RunSpec


def federate(config: Any, transport: Transport, *, out: str | os.PathLike[str] | None = None, seed: int | None = None,
             overrides: Mapping[str, Any] | None = None, engine: str = "inprocess", resume: bool = False,
             checkpoint_dir: str | os.PathLike[str] | None = None, metrics_path: str | os.PathLike[str] | None = None,
             progress: bool | None = None, log: Callable[[str], None] | None = None, overwrite: bool = False,
             inputs: list[Any] | None = None, keep_checkpoints: bool = False) -> GenerativeModel:
    """Train one model over ``transport``'s sites: ``federated_rounds`` rounds of ``federated_local_epochs``
    (closed-form generators: one exchange of statistics), checkpointed beside ``out`` after every round.
    ``inputs``: the sites' dataset paths where known here (outputs may not be or hold them); ``overwrite``:
    replace an existing ``out`` and metrics file."""
    from feda2v_toolkit.plugins import get_registry

    say = log or (lambda _m: None)

    def where(spec: RunSpec) -> Path | None:
        if checkpoint_dir is not None:
            return checkpoint_path(spec, checkpoint_dir)
        if out is not None and spec.checkpoint_dir == "checkpoints":
            return checkpoint_path(spec, default_checkpoint_dir(out))
        return None

    def checkpoint_seed() -> int | None:
        path = where(RunSpec.resolve(config, overrides=overrides, seed=0))
        if resume and path is not None and path.exists():
            return load_checkpoint(path).state.fingerprint.get("seed")
        return None

    spec = RunSpec.resolve(config, overrides=overrides, seed=seed, fallback_seed=checkpoint_seed)
    check_outputs(out, metrics_path, where(spec) if spec.save_checkpoints else None, inputs=list(inputs or []),
                  overwrite=overwrite, resume=resume, config=config)
    if spec.seed_drawn:
        say(f"seed: {spec.seed} (drawn at random; pass --seed to reproduce)")
    merger = None
    gen_cls = get_registry().load("generator", spec.generator_type)
    fitted = bool(getattr(gen_cls, "fitted", False))
    if fitted and any(k in (overrides or {}) for k in ("federated_rounds", "federated_local_epochs")):
        import warnings

        warnings.warn(f"--rounds and --local-epochs have no effect: the {spec.generator_type} generator is fitted in "
                      f"closed form, in one exchange of statistics", UserWarning, stacklevel=2)
    if spec.node_dp_noise > 0:
        if fitted:
            raise UsageError(f"node-level differential privacy protects generator weight updates; the "
                             f"{spec.generator_type} generator is fitted from statistics, which it does not cover: "
                             f"set federated_dp_noise_multiplier to 0 (use --dp-epsilon for record-level DP) or use "
                             f"a trained generator type")
        from feda2v_toolkit.federated.node_dp import NodeLevelDP

        merger = NodeLevelDP(spec.node_dp_noise, spec.node_dp_clip, spec.node_dp_delta, len(transport.sites()),
                             spec.rounds)
    model = run_pipeline(spec, transport, schedule=spec.federated_schedule(), engine=engine, out=out,
                         checkpoint=where(spec), resume=resume, metrics_path=metrics_path, progress=progress,
                         log=say, merger=merger, keep_checkpoints=keep_checkpoints)
    node = (model.metrics.get("privacy") or {}).get("node_level") or {}
    if node.get("epsilon") is not None:
        say(f"node-level differential privacy (a whole site is the unit): epsilon {node['epsilon']:.3g} at delta "
            f"{node['delta']:g}")
    return model
