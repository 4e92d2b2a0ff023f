"""The in-memory trained model: generators + reducer + upsampler + everything needed to sample.

Training (:mod:`feda2v_toolkit.training`) produces a :class:`GenerativeModel`;
:mod:`feda2v_toolkit.modelfile` writes it to one safetensors file and reads it back without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, Reducer, Upsampler
from feda2v_toolkit.errors import UsageError

UNIFIED_KEY = "all"


@dataclass
class GenerativeModel:
    """A trained generator bundle.

    Attributes:
        generator_type: registry name of the generator type (e.g. ``"vae"``).
        generators: generator key -> generator. ``"all"`` for ``unified`` granularity, the class name
            for ``per_class``, the group name for ``per_group``.
        class_names: every class, in label order (label ``i`` is ``class_names[i]``).
        class_to_generator: class name -> generator key serving it.
        reducer / upsampler: the fitted components; ``reducer_name`` / ``upsampler_name`` are their
            registry names.
        input_length: full length ``L`` of the training data; ``training_length``: reduced length ``l``.
        output_length: default length of generated samples (``None`` = training length).
        dim: embedding width ``D``.
        normalization: ``{"mean": [l, D], "std": [l, D]}`` applied to reduced training sequences;
            samples are de-normalised before upsampling. Empty = no normalisation.
        condition_dim: width of per-sample condition embeddings (0 if none).
        config: the full migrated generator config section used for training.
        seed: the training seed; metrics: final training metrics (JSON-serialisable).
    """

    generator_type: str
    generators: dict[str, Generator]
    class_names: list[str]
    class_to_generator: dict[str, str]
    reducer: Reducer
    reducer_name: str
    upsampler: Upsampler
    upsampler_name: str
    input_length: int
    training_length: int
    output_length: int | None
    dim: int
    normalization: dict[str, Tensor] = field(default_factory=dict)
    condition_dim: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        if set(self.generators) == {UNIFIED_KEY}:
            return "unified"
        if all(key in self.class_names for key in self.generators) and len(self.generators) == len(
                set(self.class_to_generator.values())) and all(
                self.class_to_generator[c] == c for c in self.class_to_generator):
            return "per_class"
        return "per_group"

    @property
    def needs_condition(self) -> bool:
        return any(g.needs_condition for g in self.generators.values()) and self.condition_dim > 0

    def class_index(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise UsageError(f"unknown class {class_name!r}; the model knows: {', '.join(self.class_names)}") from None

    def parameter_counts(self) -> dict[str, int]:
        counts = {f"generator[{k}]": sum(p.numel() for p in g.parameters()) for k, g in self.generators.items()}
        counts["reducer"] = sum(p.numel() for p in self.reducer.parameters())
        counts["upsampler"] = sum(p.numel() for p in self.upsampler.parameters())
        return counts

    @torch.no_grad()
    def sample(self, n: int, *, class_name: str, length: int | None = None,
               conditions: Tensor | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``n`` samples of ``class_name`` upsampled to ``length`` tokens: ``[n, length, dim]``.

        ``length`` defaults to ``output_length`` (or the training length). A model trained with
        per-sample conditions needs ``conditions`` ``[n, condition_dim]``.
        """
        label = self.class_index(class_name)
        gen = self.generators[self.class_to_generator[class_name]]
        if gen.needs_condition and self.condition_dim > 0 and conditions is None:
            raise UsageError(f"this {self.generator_type} model is conditioned on per-sample condition "
                             f"embeddings; pass conditions of shape [{n}, {self.condition_dim}]")
        if conditions is not None and tuple(conditions.shape) != (n, self.condition_dim):
            raise UsageError(f"conditions must have shape [{n}, {self.condition_dim}], got {list(conditions.shape)}")
        gen.eval()
        self.upsampler.eval()
        device = next(iter(gen.parameters()), torch.empty(0)).device
        labels = torch.full((n,), label, dtype=torch.long, device=device)
        x = gen.sample(n, labels=labels, conditions=conditions, generator=generator)
        if self.normalization:
            x = x * self.normalization["std"].to(x) + self.normalization["mean"].to(x)
        out_len = length or self.output_length or self.training_length
        x = self.upsampler(x, out_len)
        return x.to(dtype) if dtype is not None else x
