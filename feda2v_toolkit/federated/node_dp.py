"""Node-level differential privacy for trained generators (Flower's clipping mod and RDP accountant).

What it is: each node clips its whole round update (every generator it trained, jointly) to a norm ``C``
with Flower's ``fixedclipping_mod``; the server averages the owners' weights of each generator and adds
Gaussian noise of standard deviation ``z C / m`` (Flower's ``compute_stdv``) to every float tensor; Flower's RDP
accountant composes the rounds. The unit it protects is a **whole node** (all of a site's clips at once), it
assumes a trusted server that sees every node's clipped update, and it covers only the generator weight
updates -- not class counts, normalisation, reducer or upsampler statistics. With a handful of nodes it
protects nobody's clip; record-level DP (``--dp-epsilon``, :mod:`feda2v_toolkit.privacy`) is what protects
clips. The noise comes from a secret source, never from the run's seed (which the model file records).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.training.pipeline import SiteError
from feda2v_toolkit.training.stages import WeightsPart, WeightsStage

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
        raise SiteError(DP_MISSING) from None


def dp_epsilon(noise_multiplier: float, rounds: int, delta: float, nodes: int = 2) -> float:
    """Epsilon spent at ``delta`` by ``rounds`` releases with ``noise_multiplier`` (Flower's RdpAccountant)."""
    from flwr.serverapp import GaussianPrivacyEvent

    if noise_multiplier <= 0:
        return math.inf
    accountant = dp_accountant(nodes, delta)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, nodes, nodes), count=rounds)
    return float(accountant.get_privacy_spent(delta).epsilon)


def update_norm(base: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, Mapping[str, Tensor]]) -> float:
    """L2 norm of a node's whole update (every generator it sent, jointly; float tensors)."""
    total = 0.0
    for key, state in weights.items():
        for k, v in state.items():
            if v.is_floating_point():
                total += float((v.double() - base[key][k].double()).square().sum())
    return math.sqrt(total)


def dp_merge(base: Mapping[str, Tensor], parts: list[Mapping[str, Tensor]], clip: float, noise: float,
             generator: torch.Generator) -> dict[str, Tensor]:
    """One generator's release: the uniform mean of its owners' weights (their updates already clipped at the
    nodes by Flower's ``fixedclipping_mod``) plus Gaussian noise of Flower's ``compute_stdv(noise, clip, n)``
    on every float tensor."""
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


class NodeLevelDP:
    """A :class:`~feda2v_toolkit.training.pipeline.WeightsMerger`: noisy uniform averaging of clipped node updates
    (module docstring). Optimiser state does not travel (it would enter the clipped update): every round starts
    the nodes' optimisers afresh."""

    sends_optimizers = False

    def __init__(self, noise: float, clip: float, delta: float, nodes: int, rounds: int) -> None:
        self.noise, self.clip, self.delta, self.nodes, self.rounds = noise, clip, delta, nodes, rounds
        self.accountant = dp_accountant(nodes, delta)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.releases = 0

    def round_meta(self) -> dict[str, Any]:
        return {"dp_clipping_norm": self.clip}

    def resumed(self, rounds_done: int) -> None:
        """A run resumed after ``rounds_done`` rounds: those releases were made and stay spent."""
        from flwr.serverapp import GaussianPrivacyEvent

        for _ in range(max(0, int(rounds_done)) - self.releases):
            self.accountant.compose(GaussianPrivacyEvent(self.noise, self.nodes, self.nodes))
            self.releases += 1

    def merge(self, base: Mapping[str, Mapping[str, Tensor]], parts: list[WeightsPart], names: list[str]) -> WeightsPart:
        from flwr.serverapp import GaussianPrivacyEvent

        for name, part in zip(names, parts, strict=True):
            norm = update_norm(base, part.weights)
            if norm > self.clip * (1 + 1e-3) + 1e-6:
                raise SiteError(f"{name} sent an update of norm {norm:.4g} > the clipping norm {self.clip:g}: it did "
                                f"not clip (fixedclipping_mod)")
        merged = WeightsStage().merge(parts)  # metrics and example counts; weights replaced below
        for key in merged.weights:
            owners = [p.weights[key] for p in parts if p.examples.get(key, 0) > 0]
            merged.weights[key] = dp_merge(base[key], owners, self.clip, self.noise, self.generator)
        merged.optimizers = {}
        self.accountant.compose(GaussianPrivacyEvent(self.noise, self.nodes, self.nodes))
        self.releases += 1
        return merged

    def report(self) -> dict[str, Any]:
        spent = self.accountant.get_privacy_spent(self.delta)
        return {"mechanism": "node-level: central Gaussian, client-side fixed clipping (Flower fixedclipping_mod), "
                             "per-generator noise among its owners",
                "unit": "a whole node (site)", "noise_multiplier": self.noise, "clipping_norm": self.clip,
                "rounds": self.releases, "delta": self.delta, "epsilon": float(spent.epsilon),
                "accountant": f"Flower {spent.accounting_method}", "releases": int(spent.num_releases),
                "protects": "generator weight updates only (not class counts, normalisation, reducer or "
                            "upsampler statistics), against the other nodes and the model's users; the server "
                            "sees every clipped update"}
