"""Training as stages with one protocol: ``local(site data) -> part``, ``merge(parts) -> part``, ``finish(part)``.

Every ``local`` is a **release**: numbers derived from a site's clips that leave the code holding them. One
process trains with ``finish(merge([local(all data)]))``; federated sites (Flower) and data-parallel ranks each
compute ``local`` on their own data, an engine moves the parts, and the same ``merge``/``finish`` runs over
them. Each stage declares what it releases (:class:`Release`: tensor names, which records contribute, whether
the merge is exact) -- the one place where privacy mechanisms, secure aggregation or compression attach.
This module never imports an engine.

| stage | a site releases | parts combine by | exact? |
|---|---|---|---|
| :class:`ClassesStage` | class names, counts, shapes | union, sum | yes |
| :class:`FittedStatisticsStage` (``pca`` reducer, ``lstsq`` upsampler) | the component's ``fit_statistics`` sums | sum | yes |
| :class:`NormalizationStage` | per-position sums and sums of squares of the reduced training sequences | sum | yes |
| :class:`GeneratorStatisticsStage` (closed-form generators, ``gaussian``) | per generator key, its count and sum per class; then about the merged means, the type's ``fit_statistics`` | sum; the type's ``merge_statistics`` | yes (up to the rank's cut) |
| :class:`WeightsStage` (trained generators, trainable upsamplers without statistics) | local epochs from the current weights: weights and optimiser state | example-weighted average among the sites holding each key | no: rounds |

A fitted component federates exactly when it implements ``fit_statistics(stream) -> dict[str, Tensor]``
(sums over the data) and ``fit_from_statistics(stats)``, as ``pca`` and ``lstsq`` do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Part = dict[str, Tensor]


@dataclass(frozen=True)
class Release:
    """What one stage's ``local`` releases from a site: ``tensors`` (name -> shape), the ``records`` whose values
    enter it, whether it is ``data_dependent`` at all (a data-independent choice releases nothing) and whether
    merging parts is ``exact``."""

    stage: str
    tensors: dict[str, tuple[int, ...]]
    records: str
    data_dependent: bool = True
    exact: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "tensors": {k: list(v) for k, v in self.tensors.items()},
                "records": self.records, "data_dependent": self.data_dependent, "exact": self.exact}


def declare(stage: str, part: Mapping[str, Tensor], records: str, *, exact: bool = True) -> Release:
    """The declaration of a part as released (its tensor names and shapes)."""
    return Release(stage, {k: tuple(v.shape) for k, v in part.items()}, records, bool(part), exact)


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

    name = "classes"

    def local(self, ds: Any) -> DataSummary:
        return DataSummary(dict(ds.class_counts()), int(ds.seq_len), int(ds.dim), int(ds.condition_dim))

    def declare(self, summary: DataSummary) -> Release:
        return Release(self.name, {"class_counts": (len(summary.class_counts),)}, "every clip of the site")

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


def heldout_from_sums(upsampler: Any) -> bool:
    """Whether ``upsampler`` (class or instance) measures its held-out error from sums taken while the data are
    reduced (``heldout_sums`` / ``heldout_errors``, as ``lstsq``) instead of a second read of the held-out clips."""
    return all(callable(getattr(upsampler, name, None)) for name in ("heldout_sums", "heldout_errors"))


def fitted_while_reducing(upsampler: Any) -> bool:
    """Whether a site takes ``upsampler``'s (class or instance) statistics from the read that reduces its data
    (``training.site.Site.reduce``): a trainable upsampler with summable statistics, such as ``lstsq``."""
    return has_statistics(upsampler) and bool(getattr(upsampler, "trainable", False))


class FittedStatisticsStage:
    """A fitted reducer or upsampler: each site sums its statistics, the sums add, the component solves."""

    name = "fitted_statistics"

    def local(self, component: Any, stream: Callable[[], Iterable[Any]]) -> Part:
        return {k: v.to(torch.float64) for k, v in component.fit_statistics(stream).items()}

    def merge(self, parts: Sequence[Part]) -> Part:
        return sum_parts(parts)

    def finish(self, component: Any, part: Part) -> Any:
        return component.fit_from_statistics(part)


# -- normalisation ---------------------------------------------------------------------------------

class NormalizationStage:
    """Per position and feature mean and std ``[l, D]`` of reduced training sequences, from float64 sums."""

    name = "normalization"

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


def standardization(reduced: Tensor, indices: Tensor, rows: int = 4096) -> dict[str, Tensor]:
    """Per position and feature mean and std of ``reduced[indices]``: the single-site form of
    :class:`NormalizationStage`."""
    stage = NormalizationStage()
    return stage.finish(stage.merge([stage.local(reduced, indices, rows)]))


# -- closed-form generators ------------------------------------------------------------------------

#: while streaming, a pooled factor (statistics about merged means) is cut to this many times the generator's
#: rank (re-factored whenever half as many more rows are stacked under it: ``gaussian.REFACTOR``): on the
#: realistic corpus, cut many times at rank 8-32, its components' subspace overlaps the whole-data fit's by
#: 0.989-0.9994 (1: by 0.91-0.97) and the held-out likelihood is as good (``bench/bench_streamed_fit.py``,
#: docs/scale.md)
STREAM_KEEP = 2

class GeneratorStatisticsStage:
    """Closed-form generators (``fitted = True`` with ``fit_statistics``/``merge_statistics``/
    ``fit_from_statistics``): each site releases, per generator key it holds data for, the type's statistics
    of those training sequences; the type merges them exactly; the generator is fitted from the merge.

    A type that also has ``mean_statistics(x, labels=)`` (per mean row ``counts`` and ``sums``) and whose
    ``fit_statistics`` takes ``means=`` is fitted from two exchanges (:meth:`two_exchanges`): the sites' count
    and sum per class first, merged into the means (:meth:`means`); then the statistics about those means,
    which need no per-class scatter to merge (``gaussian``: one pooled factor whatever the number of classes,
    instead of one per class)."""

    name = "generator_statistics"

    @staticmethod
    def two_exchanges(gen: Any) -> bool:
        """Whether ``gen``'s type takes its statistics about merged means (``mean_statistics``, ``means=``)."""
        return callable(getattr(gen, "mean_statistics", None)) and \
            "means" in inspect.signature(gen.fit_statistics).parameters

    def means_local(self, gen: Any, x: Tensor, labels: Tensor) -> Part:
        """One block's per mean row ``counts`` and ``sums`` (float64; blocks and sites add up)."""
        return {k: v.to(torch.float64) for k, v in gen.mean_statistics(x, labels=labels).items()}

    @staticmethod
    def means(parts: Sequence[Part]) -> Tensor:
        """The means ``[C, F]`` of the summed ``counts`` / ``sums`` parts, in their order (zero for a row without
        data)."""
        if not parts:
            raise ValueError("no statistics to merge")
        counts = sum(p["counts"].to("cpu", torch.float64) for p in parts)
        sums = sum(p["sums"].to("cpu", torch.float64) for p in parts)
        return sums / counts.clamp(min=1).unsqueeze(1)

    def local(self, gen: Any, x: Tensor, labels: Tensor, conditions: Tensor | None,
              means: Tensor | None = None) -> Part:
        """The exact statistics of one block of a site's sequences (:meth:`accumulate` streams the blocks),
        about the merged ``means`` when the type takes them."""
        extra = {} if means is None else {"means": means}
        return dict(gen.fit_statistics(x, labels=labels, conditions=conditions, max_rank=None, **extra))

    @staticmethod
    def _streams(gen: Any) -> bool:
        return getattr(gen, "rank", None) is not None and \
            "max_rank" in inspect.signature(type(gen).merge_statistics).parameters

    def accumulate(self, gen: Any, acc: Part | None, part: Part) -> Part:
        """``acc`` and one more block's :meth:`local` part: a type whose ``merge_statistics`` takes ``max_rank``
        keeps its factors bounded while streaming, re-factored to ``max_rank`` directions -- the generator's
        rank per class (past twice that many rows), or :data:`STREAM_KEEP` times it for one pooled factor about
        merged means (see ``merge_statistics``); an empty part changes nothing."""
        if not part:
            return acc if acc is not None else {}
        if not acc:
            return part
        merge = type(gen).merge_statistics
        if not self._streams(gen):
            return dict(merge([acc, part]))
        return dict(merge([acc, part], max_rank=(STREAM_KEEP if "means" in part else 1) * gen.rank))

    def compact(self, gen: Any, acc: Part) -> Part:
        """The site's release from its accumulated blocks: factors cut to the generator's rank (per mean row, or
        pooled when taken about merged means): the model keeps no more, and no more leaves the site."""
        if acc and self._streams(gen):
            return dict(type(gen).merge_statistics([acc], max_rank=gen.rank, compact=True))
        return acc

    def merge(self, gen_cls: Any, parts: Sequence[Part]) -> Part:
        return dict(gen_cls.merge_statistics(list(parts)))

    def finish(self, gen: Any, part: Part) -> dict[str, float]:
        return {k: float(v) for k, v in gen.fit_from_statistics(part).items()}


# -- weights trained by rounds ---------------------------------------------------------------------

@dataclass
class WeightsPart:
    """One site's reply in a round: per key (e.g. generator key) its weights and how many examples trained them;
    ``optimizers``: per key, the flattened optimiser state (tensors), averaged like the weights."""

    weights: dict[str, dict[str, Tensor]]
    examples: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Tensor]] = field(default_factory=dict)


class WeightsStage:
    """Weighted federated averaging per key, **among the sites that hold that key** only.

    A unified generator is one key every site holds; per-class (per-group) generators are keyed by class
    (group) and averaged only over the sites that own that class, never across classes. Floating tensors are
    averaged with weights ``examples``; integer tensors (counters) take the first holder's value. With one
    site the merge returns its weights unchanged (bit for bit).
    """

    name = "weights"

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
        optimizers: dict[str, dict[str, Tensor]] = {}
        examples: dict[str, int] = {}
        for key in keys:
            holders = [p for p in parts if key in p.weights and p.examples.get(key, 0) > 0]
            if not holders:
                continue
            counts = [p.examples[key] for p in holders]
            merged[key] = average_state([p.weights[key] for p in holders], counts)
            states = [p.optimizers[key] for p in holders if key in p.optimizers]
            if len(states) == len(holders) and states:
                optimizers[key] = average_state(states, counts)
            examples[key] = sum(counts)
        total: dict[str, float] = {}
        weight_sum = 0.0
        for p in parts:  # metrics: example-weighted over sites
            w = float(sum(p.examples.values()))
            weight_sum += w
            for k, v in p.metrics.items():
                total[k] = total.get(k, 0.0) + w * float(v)
        metrics = {k: v / weight_sum for k, v in total.items()} if weight_sum else {}
        return WeightsPart(merged, examples, metrics, optimizers)

    def finish(self, part: WeightsPart) -> dict[str, dict[str, Tensor]]:
        return part.weights


def average_state(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of state dicts with identical keys and shapes (float64 accumulation); a single state
    is returned as it is."""
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"state {i} has other keys than state 0")
    if len(states) == 1:
        return dict(states[0])
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
