"""Training as stages with mergeable state: ``local(data) -> part``, ``merge(parts) -> part``, ``finish(part)``.

One process trains with ``finish(local(all_data))``; several sites (federated nodes, later data-parallel
processes) each compute ``local`` on their own data, the parts are merged, and ``finish`` turns the merged
part into state. Parts are dicts of tensors (and, for :class:`ClassesStage`, JSON values), so any engine
can move them; this module never imports an engine (the Flower adaptation is in
:mod:`feda2v_toolkit.federated`).

| stage | a site computes | parts combine by | exact? |
|---|---|---|---|
| :class:`ClassesStage` | class names, counts, shapes | union, sum | yes |
| :class:`FittedStatisticsStage` (reducer, upsampler) | the component's ``fit_statistics`` sums | sum | yes |
| :class:`NormalizationStage` | per-position sums and sums of squares | sum | yes |
| closed-form generators (``gaussian``; driven by :mod:`feda2v_toolkit.training.federation`) | the generator's ``fit_statistics`` (class sums, moments, low-rank scatter factors) | the type's ``merge_statistics`` (parallel-axis corrections, not plain sums) | yes |
| :class:`WeightsStage` (generators, trainable upsamplers) | local epochs from the current weights | weighted average among the sites holding each key | no: rounds |

A fitted component federates exactly when it implements ``fit_statistics(stream) -> dict[str, Tensor]``
(sums over the data) and ``fit_from_statistics(stats)``, as ``pca`` and ``lstsq`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Part = dict[str, Tensor]


def sum_parts(parts: Sequence[Mapping[str, Tensor]]) -> Part:
    """Key-wise float64 sum of parts that all carry the same keys and shapes."""
    if not parts:
        raise ValueError("no parts to merge")
    keys = set(parts[0])
    for i, p in enumerate(parts[1:], start=1):
        if set(p) != keys:
            raise ValueError(f"part {i} has keys {sorted(p)}, part 0 has {sorted(keys)}")
    out: Part = {}
    for k in parts[0]:
        shapes = {tuple(p[k].shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"parts disagree on the shape of {k!r}: {sorted(shapes)}")
        out[k] = torch.stack([p[k].to(torch.float64) for p in parts]).sum(0)
    return out


# -- classes ---------------------------------------------------------------------------------------

@dataclass
class DataSummary:
    """What a site says about its data: class names and counts, and the sequence shape."""

    class_counts: dict[str, int]
    seq_len: int
    dim: int
    condition_dim: int = 0
    sites: list[str] = field(default_factory=list)  # which sites were merged (names given by the caller)

    @property
    def class_names(self) -> list[str]:
        return list(self.class_counts)

    def to_json(self) -> dict[str, Any]:
        return {"class_counts": self.class_counts, "seq_len": self.seq_len, "dim": self.dim,
                "condition_dim": self.condition_dim}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DataSummary:
        return cls({str(k): int(v) for k, v in doc["class_counts"].items()}, int(doc["seq_len"]), int(doc["dim"]),
                   int(doc.get("condition_dim", 0)))


class ClassesStage:
    """Union of class names (in order of first appearance over the sites), sum of counts; shapes must agree."""

    def local(self, ds: Any) -> DataSummary:
        return DataSummary(dict(ds.class_counts()), int(ds.seq_len), int(ds.dim), int(ds.condition_dim))

    def merge(self, parts: Sequence[DataSummary], names: Sequence[str] | None = None) -> DataSummary:
        """``names`` label the sites in error messages. Raises ``ValueError`` on mismatched shapes."""
        names = list(names) if names is not None else [f"site {i}" for i in range(len(parts))]
        if not parts:
            raise ValueError("no sites to merge")
        first = parts[0]
        counts: dict[str, int] = {}
        for name, p in zip(names, parts, strict=True):
            if (p.seq_len, p.dim) != (first.seq_len, first.dim):
                raise ValueError(f"{name} has sequences [{p.seq_len}, {p.dim}], {names[0]} has "
                                 f"[{first.seq_len}, {first.dim}]: every site must hold the same [S, D]")
            if p.condition_dim != first.condition_dim:
                raise ValueError(f"{name} has condition width {p.condition_dim}, {names[0]} has "
                                 f"{first.condition_dim}")
            for c, n in p.class_counts.items():
                counts[c] = counts.get(c, 0) + int(n)
        return DataSummary(counts, first.seq_len, first.dim, first.condition_dim, sites=names)

    def finish(self, part: DataSummary) -> DataSummary:
        return part


# -- fitted components with exact sufficient statistics --------------------------------------------

def has_statistics(component: Any) -> bool:
    """Whether ``component`` fits from summable statistics (``fit_statistics``/``fit_from_statistics``)."""
    return callable(getattr(component, "fit_statistics", None)) and \
        callable(getattr(component, "fit_from_statistics", None))


class FittedStatisticsStage:
    """A fitted reducer or upsampler: each site sums its statistics, the sums add, the component solves."""

    def local(self, component: Any, stream: Callable[[], Iterable[Any]]) -> Part:
        return {k: v.to(torch.float64) for k, v in component.fit_statistics(stream).items()}

    def merge(self, parts: Sequence[Part]) -> Part:
        return sum_parts(parts)

    def finish(self, component: Any, part: Part) -> Any:
        return component.fit_from_statistics(part)


# -- normalisation ---------------------------------------------------------------------------------

class NormalizationStage:
    """Per position and feature mean and std ``[l, D]`` of reduced training sequences, from float64 sums."""

    def local(self, reduced: Tensor, indices: Tensor, rows: int = 4096) -> Part:
        total = torch.zeros(reduced.shape[1:], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for s in range(0, indices.numel(), rows):
            chunk = reduced[indices[s:s + rows]].double()
            total += chunk.sum(dim=0)
            total_sq += chunk.pow(2).sum(dim=0)
        return {"sum": total, "sum_sq": total_sq, "count": torch.tensor(float(indices.numel()), dtype=torch.float64)}

    def merge(self, parts: Sequence[Part]) -> Part:
        return sum_parts(parts)

    def finish(self, part: Mapping[str, Tensor]) -> dict[str, Tensor]:
        n = max(float(part["count"]), 1.0)
        mean = part["sum"] / n
        std = (part["sum_sq"] / n - mean.pow(2)).clamp_min(0).sqrt()
        std = std.clamp_min(max(float(std.mean()) * 1e-3, 1e-8))
        return {"mean": mean.float(), "std": std.float()}


# -- weights trained by rounds ---------------------------------------------------------------------

@dataclass
class WeightsPart:
    """One site's reply in a round: per key (e.g. generator key) its weights and how many examples trained them."""

    weights: dict[str, dict[str, Tensor]]
    examples: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)


class WeightsStage:
    """Weighted federated averaging per key, **among the sites that hold that key** only.

    A unified generator is one key every site holds; per-class (per-group) generators are keyed by class
    (group) and averaged only over the sites that own that class, never across classes. Floating tensors are
    averaged with weights ``examples``; integer tensors (counters) take the first holder's value.
    """

    def local(self, weights: Mapping[str, Mapping[str, Tensor]],
              train: Callable[[str, Mapping[str, Tensor]], tuple[dict[str, Tensor], int, dict[str, float]]],
              keys: Iterable[str]) -> WeightsPart:
        """Run ``train(key, weights) -> (new weights, examples, metrics)`` for each key this site holds."""
        out: dict[str, dict[str, Tensor]] = {}
        examples: dict[str, int] = {}
        totals: dict[str, float] = {}
        for key in keys:
            state, n, metrics = train(key, weights[key])
            if n <= 0:
                continue
            out[key], examples[key] = state, n
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + n * float(v)
        seen = sum(examples.values())
        return WeightsPart(out, examples, {k: v / seen for k, v in totals.items()} if seen else {})

    def merge(self, parts: Sequence[WeightsPart]) -> WeightsPart:
        keys: list[str] = []
        for p in parts:
            keys += [k for k in p.weights if k not in keys]
        merged: dict[str, dict[str, Tensor]] = {}
        examples: dict[str, int] = {}
        for key in keys:
            holders = [p for p in parts if key in p.weights and p.examples.get(key, 0) > 0]
            if not holders:
                continue
            merged[key] = average_state([p.weights[key] for p in holders], [p.examples[key] for p in holders])
            examples[key] = sum(p.examples[key] for p in holders)
        total: dict[str, float] = {}
        weight_sum = 0.0
        for p in parts:  # metrics: example-weighted over sites
            w = float(sum(p.examples.values()))
            weight_sum += w
            for k, v in p.metrics.items():
                total[k] = total.get(k, 0.0) + w * float(v)
        metrics = {k: v / weight_sum for k, v in total.items()} if weight_sum else {}
        return WeightsPart(merged, examples, metrics)

    def finish(self, part: WeightsPart) -> dict[str, dict[str, Tensor]]:
        return part.weights


def average_state(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of state dicts with identical keys and shapes (float64 accumulation)."""
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"state {i} has other keys than state 0")
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if not (ref.is_floating_point() or ref.is_complex()):
            out[k] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            if tuple(s[k].shape) != tuple(ref.shape):
                raise ValueError(f"{k}: shapes {tuple(s[k].shape)} and {tuple(ref.shape)} differ")
            acc += s[k].detach().to("cpu", torch.float64) * (float(w) / total)
        out[k] = acc.to(ref.dtype)
    return out
