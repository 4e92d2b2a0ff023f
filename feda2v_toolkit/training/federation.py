"""The server side of federated training, engine-agnostic: drive the stages, merge the parts, write the model.

:func:`run_federation` talks to the nodes only through ``exchange(stage, requests) -> replies`` (node id ->
``(arrays, meta)``); the Flower ServerApp supplies an ``exchange`` over its Grid, tests can supply one that
calls :func:`feda2v_toolkit.training.site.handle` directly. Any node failing or not answering fails the
run; the model file is written (atomically) only after the last round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError
from feda2v_toolkit.training.site import Arrays, Meta, pack, unpack
from feda2v_toolkit.training.stages import (
    ClassesStage,
    DataSummary,
    FittedStatisticsStage,
    NormalizationStage,
    WeightsPart,
    WeightsStage,
    average_state,
    has_statistics,
)

Exchange = Callable[[str, Mapping[int, tuple[Arrays, Meta]]], dict[int, tuple[Arrays, Meta]]]


class FederationError(InputError):
    """A node failed, did not answer in time, or disagrees with the others."""


def nbytes(arrays: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


def nbytes_round(requests: Mapping[int, tuple[Arrays, Meta]], replies: Mapping[int, tuple[Arrays, Meta]]) -> int:
    """Tensor bytes sent to and received from the nodes in one exchange."""
    return sum(nbytes(a) for a, _ in requests.values()) + sum(nbytes(a) for a, _ in replies.values())


class Traffic:
    """Bytes sent to and received from the nodes, per stage and per round (for the benchmark)."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.stages: dict[str, dict[str, float]] = {}

    def add(self, stage: str, sent: int, received: int, seconds: float) -> None:
        s = self.stages.setdefault(stage, {"sent": 0, "received": 0, "seconds": 0.0})
        s["sent"] += sent
        s["received"] += received
        s["seconds"] += seconds


DP_MISSING = 'differential privacy accounting needs dp-accounting: pip install "flwr[dp]>=1.42,<1.43"'


def dp_accountant(nodes: int, delta: float) -> Any:
    """Flower's RDP accountant for node-level DP: add or remove one node, every node in every round
    (no sampling amplification)."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

    try:
        from flwr.serverapp import RdpAccountant

        return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=nodes,
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError:
        raise FederationError(DP_MISSING) from None


def dp_epsilon(noise_multiplier: float, rounds: int, delta: float, nodes: int = 2) -> float:
    """Epsilon spent at ``delta`` by ``rounds`` releases with ``noise_multiplier`` (Flower's RdpAccountant)."""
    from flwr.serverapp import GaussianPrivacyEvent

    if noise_multiplier <= 0:
        return math.inf
    accountant = dp_accountant(nodes, delta)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, nodes, nodes), count=rounds)
    return float(accountant.get_privacy_spent(delta).epsilon)


def dp_merge(base: Mapping[str, Tensor], parts: list[Mapping[str, Tensor]], clip: float, noise: float,
             generator: torch.Generator) -> dict[str, Tensor]:
    """One generator's release: the uniform mean of its owners' weights (their updates already clipped at the
    nodes by Flower's ``fixedclipping_mod``) plus Gaussian noise of Flower's ``compute_stdv(noise, clip, n)``
    on every float tensor (seeded: the same run gives the same weights)."""
    from flwr.supercore.differential_privacy import compute_stdv

    n = len(parts)
    std = compute_stdv(noise, clip, n)
    out: dict[str, Tensor] = {}
    for k, ref in base.items():
        if not ref.is_floating_point():
            out[k] = parts[0][k].clone()
            continue
        mean = sum(p[k].double() for p in parts) / n
        out[k] = (mean + torch.randn(ref.shape, generator=generator, dtype=torch.float64) * std).to(ref.dtype)
    return out


def update_norm(base: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, Mapping[str, Tensor]]) -> float:
    """L2 norm of a node's whole update (every generator it sent, jointly; float tensors)."""
    total = 0.0
    for key, state in weights.items():
        for k, v in state.items():
            if v.is_floating_point():
                total += float((v.double() - base[key][k].double()).square().sum())
    return math.sqrt(total)


def run_federation(exchange: Exchange, nodes: list[int], config: Any, *, out: str | Path | None = None,
                   seed: int | None = None, overrides: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = None, engine: str = "local") -> Any:
    """Train one model over ``nodes`` and (if ``out``) write it; returns the :class:`GenerativeModel`."""
    from feda2v_toolkit.config import configured_upsampler, load_config
    from feda2v_toolkit.model.bundle import GenerativeModel
    from feda2v_toolkit.plugins import get_registry
    from feda2v_toolkit.training.pipeline import generator_groups

    say = log or (lambda _m: None)
    cfg = dict(load_config(config, overrides=overrides))
    if seed is None:
        seed = cfg.get("generator_seed")
    if seed is None:
        import secrets

        seed = secrets.randbits(31)
        say(f"seed: {seed} (drawn at random; pass --seed to reproduce)")
    cfg["generator_seed"] = int(seed)
    if not nodes:
        raise FederationError("no nodes to train on")
    traffic = Traffic()
    common: Meta = {"config": cfg}

    def ask(stage: str, requests: Mapping[int, tuple[Arrays, Meta]]) -> dict[int, tuple[Arrays, Meta]]:
        t0 = time.perf_counter()
        full = {n: (a, {**common, **m}) for n, (a, m) in requests.items()}
        replies = exchange(stage, full)
        traffic.add(stage, sum(nbytes(a) for a, _ in requests.values()),
                    sum(nbytes(a) for a, _ in replies.values()), time.perf_counter() - t0)
        return replies

    def everyone(arrays: Arrays | None = None, meta: Meta | None = None) -> dict[int, tuple[Arrays, Meta]]:
        return {n: (arrays or {}, meta or {}) for n in nodes}

    # -- classes and shapes ----------------------------------------------------------------------
    described = ask("describe", everyone())
    names = {n: described[n][1]["name"] for n in nodes}
    summaries = {n: DataSummary.from_json(described[n][1]["summary"]) for n in nodes}
    try:
        summary = ClassesStage().merge([summaries[n] for n in nodes], [f"node {names[n]}" for n in nodes])
    except ValueError as e:
        raise FederationError(str(e)) from None
    length = int(cfg["generator_training_sequence_length"])
    if summary.seq_len < length:
        raise FederationError(f"the nodes' sequences have {summary.seq_len} tokens, fewer than "
                              f"generator_training_sequence_length = {length}")
    class_names = summary.class_names
    empty = [c for c, k in summary.class_counts.items() if k == 0]
    if empty:
        raise FederationError(f"class(es) {', '.join(map(repr, empty))} have no samples on any node; remove them "
                              f"from the class names or add samples")
    say(f"{len(nodes)} nodes ({', '.join(names[n] for n in nodes)}): {sum(summary.class_counts.values())} "
        f"sequences [{summary.seq_len}, {summary.dim}], {len(class_names)} classes")

    registry = get_registry()
    # -- reducer (exact sums) --------------------------------------------------------------------
    reducer_name = cfg["generator_reducer"]
    reducer = registry.load("reducer", reducer_name).from_config(cfg, length=length, full_length=summary.seq_len,
                                                                 dim=summary.dim)
    if type(reducer).fitted:
        if not has_statistics(reducer):
            raise FederationError(f"reducer {reducer_name!r} cannot be fitted federatedly (no fit_statistics)")
        parts = ask("reducer", everyone())
        stage = FittedStatisticsStage()
        stage.finish(reducer, stage.merge([parts[n][0] for n in nodes]))
        say(f"fitted reducer {reducer_name} from the nodes' statistics (exact)")
    reducer.eval()

    # -- normalisation (exact sums); the nodes reduce their data here ---------------------------
    parts = ask("normalization", everyone(pack("reducer.", reducer.state_dict())))
    normalization: dict[str, Tensor] = {}
    if cfg["generator_normalize"]:
        stage_n = NormalizationStage()
        normalization = stage_n.finish(stage_n.merge([parts[n][0] for n in nodes]))

    # -- upsampler --------------------------------------------------------------------------------
    upsampler_name = configured_upsampler(cfg)
    upsampler = registry.load("upsampler", upsampler_name).from_config(
        cfg, reduced_length=length, full_length=summary.seq_len, dim=summary.dim)
    upsampler_metrics: dict[str, Any] = {"name": upsampler_name}
    if type(upsampler).trainable:
        if has_statistics(upsampler):
            parts = ask("upsampler", everyone())
            stage_f = FittedStatisticsStage()
            upsampler_metrics["fit"] = stage_f.finish(upsampler, stage_f.merge([parts[n][0] for n in nodes]))
            say(f"fitted upsampler {upsampler_name} from the nodes' statistics (exact)")
        else:
            for r in range(int(cfg["federated_upsampler_rounds"])):
                replies = ask("upsampler_round", everyone(pack("upsampler.", upsampler.state_dict())))
                states = [unpack("upsampler.", replies[n][0]) for n in nodes]
                weights = [int(replies[n][1]["examples"]) for n in nodes]
                upsampler.load_state_dict(average_state(states, weights))
                say(f"upsampler round {r + 1}/{cfg['federated_upsampler_rounds']}: averaged {len(nodes)} fits")
    upsampler.eval()

    # -- generators: rounds of local epochs, averaged per key among its holders -------------------
    groups = generator_groups(cfg, class_names, class_names)
    keys = list(groups)
    gen_cls = registry.load("generator", cfg["generator_type"])
    torch.manual_seed(cfg["generator_seed"])
    generators = {key: gen_cls.from_config(cfg, seq_len=length, dim=summary.dim, num_classes=len(class_names),
                                           condition_dim=summary.condition_dim) for key in keys}
    held = {n: {c for c, k in summaries[n].class_counts.items() if k > 0} for n in nodes}
    holders = {n: [k for k in keys if set(groups[k]) & held[n]] for n in nodes}
    rounds = int(cfg["federated_rounds"])
    noise = float(cfg["federated_dp_noise_multiplier"])
    clip = float(cfg["federated_dp_clipping_norm"])
    dp_gen = torch.Generator().manual_seed(int(cfg["generator_seed"]) + 4242)
    if noise > 0 and not getattr(gen_cls, "fitted", False):
        from flwr.serverapp import GaussianPrivacyEvent

        accountant = dp_accountant(len(nodes), float(cfg["federated_dp_delta"]))
    history: list[dict[str, Any]] = []
    norm_arrays = pack("norm.", normalization)
    fitted = bool(getattr(gen_cls, "fitted", False))
    if fitted:
        if noise > 0:
            raise FederationError(f"differential privacy protects generator weight updates; the {cfg['generator_type']} "
                                  f"generator is fitted from statistics, which it does not cover: set "
                                  f"federated_dp_noise_multiplier to 0 or use a trained generator type")
        probe = generators[keys[0]]
        if not (has_statistics(probe) and callable(getattr(gen_cls, "merge_statistics", None))):
            raise FederationError(f"generator type {cfg['generator_type']!r} is fitted in closed form but has no "
                                  f"fit_statistics/merge_statistics/fit_from_statistics: it cannot be federated")
        if probe.conditioning == "embedding":
            raise FederationError(f"a {cfg['generator_type']} generator conditioned on condition embeddings cannot "
                                  f"be federated (no mergeable statistics); set gaussian_conditioned to false or "
                                  f"drop the embeddings")
        history.append(_fit_generators(ask, nodes, generators, gen_cls, holders, keys, groups, class_names,
                                       norm_arrays, names, say))
        rounds = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        requests = {}
        for n in nodes:
            arrays = dict(norm_arrays)
            for i, key in enumerate(keys):
                if key in holders[n]:
                    arrays.update(pack(f"g{i}.", generators[key].state_dict()))
            requests[n] = (arrays, {"keys": keys, "groups": groups, "class_names": class_names, "round": r,
                                    "rounds": rounds, **({"dp_clipping_norm": clip} if noise > 0 else {})})
        replies = ask("generators", requests)
        node_parts = []
        for n in nodes:
            arrays, meta = replies[n]
            weights = {key: unpack(f"g{i}.", arrays) for i, key in enumerate(keys)}
            node_parts.append(WeightsPart({k: v for k, v in weights.items() if v},
                                          {k: int(v) for k, v in meta["examples"].items()},
                                          dict(meta.get("metrics", {}))))
        if noise > 0:
            base = {key: generators[key].state_dict() for key in keys}
            for n, part in zip(nodes, node_parts, strict=True):
                norm = update_norm(base, part.weights)
                if norm > clip * (1 + 1e-3) + 1e-6:
                    raise FederationError(f"{names[n]} sent an update of norm {norm:.4g} > the clipping norm "
                                          f"{clip:g}: it did not clip (fixedclipping_mod)")
            merged = WeightsStage().merge(node_parts)  # metrics and example counts; weights replaced below
            for key in merged.weights:
                owners = [p.weights[key] for p in node_parts if p.examples.get(key, 0) > 0]
                merged.weights[key] = dp_merge(base[key], owners, clip, noise, dp_gen)
            accountant.compose(GaussianPrivacyEvent(noise, len(nodes), len(nodes)))
        else:
            merged = WeightsStage().merge(node_parts)
        for key, state in merged.weights.items():
            generators[key].load_state_dict(state)
        seconds = time.perf_counter() - t0
        record = {"round": r + 1, "rounds": rounds, "train": merged.metrics, "seconds": seconds,
                  "local_seconds": sum(float(replies[n][1].get("seconds", 0.0)) for n in nodes),
                  "bytes": nbytes_round(requests, replies), "examples": sum(merged.examples.values())}
        history.append(record)
        loss = merged.metrics.get("loss", float("nan"))
        val = merged.metrics.get("val_loss")
        say(f"round {r + 1}/{rounds}: {len(nodes)} nodes, loss {loss:.5g}"
            + (f", held-out loss {val:.5g}" if val is not None else "") + f", {seconds:.1f}s")

    privacy: dict[str, Any] = {"mechanism": None}
    if fitted:
        privacy["note"] = "none: closed-form generators are fitted from the nodes' statistics"
    if noise > 0:
        delta = float(cfg["federated_dp_delta"])
        spent = accountant.get_privacy_spent(delta)
        privacy = {"mechanism": "central Gaussian, client-side fixed clipping (Flower fixedclipping_mod), "
                                "node-level, per-generator noise among its owners",
                   "noise_multiplier": noise, "clipping_norm": clip, "rounds": rounds, "delta": delta,
                   "epsilon": float(spent.epsilon), "accountant": f"Flower {spent.accounting_method}",
                   "releases": int(spent.num_releases),
                   "protects": "generator weight updates only (not class counts, normalisation, reducer or "
                               "upsampler statistics)"}
        say(f"differential privacy: epsilon {privacy['epsilon']:.3g} at delta {delta:g}")

    class_to_generator = {c: key for key, members in groups.items() for c in members}
    model = GenerativeModel(
        generator_type=cfg["generator_type"], generators=generators, granularity=cfg["generator_granularity"],
        class_names=class_names, class_to_generator=class_to_generator, reducer=reducer,
        reducer_name=reducer_name, upsampler=upsampler, upsampler_name=upsampler_name,
        full_length=summary.seq_len, training_length=length, output_length=cfg["generator_output_sequence_length"],
        dim=summary.dim, normalization=normalization, condition_dim=summary.condition_dim,
        class_counts=dict(summary.class_counts), config=cfg, seed=int(cfg["generator_seed"]))
    last = history[-1] if history else {}
    model.metrics = {
        "epochs": rounds * int(cfg["federated_local_epochs"]) if not fitted else 1, "steps": None,
        "train": {"loss": last["train"]["loss"]} if last.get("train", {}).get("loss") is not None else {},
        "val": {"loss": last["train"]["val_loss"]} if last and "val_loss" in last.get("train", {}) else None,
        "train_seconds": sum(h["seconds"] for h in history), "samples_per_s": None,
        "upsampler": upsampler_metrics,
        **({"generator_fit": history[0]["fit"]} if fitted and history else {}),
        "federated": {"engine": engine, "nodes": [{"name": names[n], "classes": {c: k for c, k in summaries[n].class_counts.items()
                                                                         if k > 0},
                                                   "generators": holders[n]} for n in nodes],
                      "rounds": rounds, "local_epochs": int(cfg["federated_local_epochs"]),
                      "generators_fitted": "from merged statistics (exact)" if fitted else None,
                      "privacy": privacy, "history": history, "traffic": traffic.stages},
    }
    if out is not None:
        from feda2v_toolkit.model.file import save_model

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out)
        say(f"wrote {out}")
    return model


def _fit_generators(ask: Callable[..., dict[int, tuple[Arrays, Meta]]], nodes: list[int], generators: dict[str, Any],
                    gen_cls: Any, holders: Mapping[int, list[str]], keys: list[str], groups: Mapping[str, list[str]],
                    class_names: list[str], norm_arrays: Arrays, names: Mapping[int, str],
                    say: Callable[[str], None]) -> dict[str, Any]:
    """Closed-form generators: one exchange of sufficient statistics, merged per key among its holders."""
    t0 = time.perf_counter()
    meta = {"keys": keys, "groups": groups, "class_names": class_names}
    requests = {n: (dict(norm_arrays), meta) for n in nodes}
    replies = ask("generator_statistics", requests)
    fit: dict[str, dict[str, float]] = {}
    truncated: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(keys):
        parts = [unpack(f"g{i}.", replies[n][0]) for n in nodes if key in holders[n]]
        parts = [p for p in parts if p]
        if not parts:
            continue
        try:
            fit[key] = generators[key].fit_from_statistics(gen_cls.merge_statistics(parts))
        except ValueError as e:
            raise FederationError(f"generator {key!r}: {e}") from None
    for n in nodes:
        for key, info in replies[n][1].get("truncated", {}).items():
            truncated.setdefault(key, {})[names[n]] = info
            say(f"{names[n]}: generator {key!r}: classes {', '.join(map(str, info['classes']))} have more sequences "
                f"than the rank; sent their top directions ({100 * info['variance_left_out']:.2g}% of the variance "
                f"left out of the factors, kept in the totals)")
    seconds = time.perf_counter() - t0
    examples = {k: sum(int(replies[n][1]["examples"].get(k, 0)) for n in nodes) for k in keys}
    say(f"fitted {len(fit)} {'generator' if len(fit) == 1 else 'generators'} from {len(nodes)} nodes' statistics "
        f"(exact), {seconds:.1f}s")
    return {"round": 1, "rounds": 1, "fit": fit, "train": {}, "seconds": seconds, "truncated": truncated,
            "local_seconds": sum(float(replies[n][1].get("seconds", 0.0)) for n in nodes),
            "bytes": nbytes_round(requests, replies), "examples": sum(examples.values())}
