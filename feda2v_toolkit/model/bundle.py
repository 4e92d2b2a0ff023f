"""The in-memory trained model: generators + reducer + upsampler + everything needed to sample.

Training (:mod:`feda2v_toolkit.training.pipeline`) produces a :class:`GenerativeModel`;
:mod:`feda2v_toolkit.model.file` writes it to one safetensors file and reads it back without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, Reducer, Upsampler
from feda2v_toolkit.errors import UsageError, short_list

UNIFIED_KEY = "all"
GRANULARITIES = ("unified", "per_class", "per_group")


@dataclass
class GenerativeModel:
    """A trained generator bundle.

    Attributes:
        generator_type: registry name of the generator type (e.g. ``"vae"``), as the config named it.
        generators: generator key -> generator. ``"all"`` for ``unified`` granularity, the class name
            for ``per_class``, the group name for ``per_group``.
        granularity: ``unified``, ``per_class`` or ``per_group``.
        class_names: every class, in label order (label ``i`` is ``class_names[i]``).
        class_to_generator: class name -> generator key serving it (classes without one cannot be sampled).
        reducer / upsampler: the fitted components; ``reducer_name`` / ``upsampler_name`` are their
            registry names.
        full_length: length ``L`` of the training data; ``training_length``: reduced length ``l``.
        output_length: default length of generated samples (``None`` = training length).
        dim: embedding width ``D``.
        normalization: ``{"mean": [l, D], "std": [l, D]}`` applied to reduced training sequences;
            samples are de-normalised before upsampling. Empty = no normalisation.
        condition_dim: width of per-sample condition embeddings (0 if none).
        class_counts: training samples per class (``synthetic_samples_per_class: "auto"`` uses them).
        config: the full migrated generator config section used for training.
        seed: the training seed; metrics: final metrics (JSON-serialisable).
        data_dtype: storage dtype of the training data (``"float16"`` ...); ``generate`` writes it by
            default. ``None`` for models that do not record it (float32 then).
        seed_scheme: how the model's random streams derive from its seed
            (:mod:`feda2v_toolkit.runtime.seeds`); ``None`` for files written before the scheme was recorded.
    """

    generator_type: str
    generators: dict[str, Generator]
    granularity: str
    class_names: list[str]
    class_to_generator: dict[str, str]
    reducer: Reducer
    reducer_name: str
    upsampler: Upsampler
    upsampler_name: str
    full_length: int
    training_length: int
    output_length: int | None
    dim: int
    normalization: dict[str, Tensor] = field(default_factory=dict)
    condition_dim: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_dtype: str | None = None
    seed_scheme: int | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        unknown = set(self.class_to_generator.values()) - set(self.generators)
        if unknown:
            raise ValueError(f"class_to_generator refers to missing generators: {sorted(unknown)}")

    def __repr__(self) -> str:
        """A few lines: type and granularity, classes, lengths, components (not the weights)."""
        from feda2v_toolkit.errors import short_list

        params = sum(p.numel() for g in self.generators.values() for p in g.parameters())
        params += sum(b.numel() for g in self.generators.values() if getattr(type(g), "fitted", False)
                      for b in g.buffers())
        conditions = f", conditions [{self.condition_dim}]" if self.condition_dim else ""
        return (f"GenerativeModel({self.generator_type}, {self.granularity}, {len(self.generators)} generator(s), "
                f"{params:,} parameters\n"
                f"  classes: {short_list(self.class_names, 8)}\n"
                f"  lengths: {self.full_length} -> {self.training_length} (training) -> {self.default_length} "
                f"(output), D = {self.dim}{conditions}\n"
                f"  reducer: {self.reducer_name}, upsampler: {self.upsampler_name}, "
                f"{'normalised' if self.normalization else 'not normalised'}, seed {self.seed})")

    @property
    def default_length(self) -> int:
        """Length of samples when none is asked for: the output length, else the training length."""
        return self.output_length or self.training_length

    def setting(self, key: str) -> Any:
        """A config key as trained, else its schema default (a converted model's config holds only what
        the original file said)."""
        value = self.config.get(key)
        if value is None:
            from feda2v_toolkit.config import schema_defaults

            value = schema_defaults()[key]
        return value

    @property
    def sampleable_classes(self) -> list[str]:
        return [c for c in self.class_names if c in self.class_to_generator]

    def needs_condition(self, class_name: str) -> bool:
        """True if sampling ``class_name`` requires per-sample condition embeddings."""
        return self.generators[self.class_to_generator[class_name]].needs_condition

    def class_index(self, class_name: str) -> int:
        if class_name not in self.class_names:
            raise UsageError(f"unknown class {class_name!r}; the model knows: {short_list(self.class_names, 10)}")
        if class_name not in self.class_to_generator:
            raise UsageError(f"class {class_name!r} had no generator trained for it "
                             f"(sampleable: {', '.join(self.sampleable_classes)})")
        return self.class_names.index(class_name)

    def to(self, device: torch.device | str) -> GenerativeModel:
        for gen in self.generators.values():
            gen.to(device)
        self.reducer.to(device)
        self.upsampler.to(device)
        self.normalization = {k: v.to(device) for k, v in self.normalization.items()}
        return self

    @property
    def device(self) -> torch.device:
        for gen in self.generators.values():
            for p in gen.parameters():
                return p.device
        return torch.device("cpu")

    def normalize(self, reduced: Tensor) -> Tensor:
        """Map reduced sequences ``[B, l, D]`` into the space the generators were trained in."""
        if not self.normalization:
            return reduced
        return (reduced - self.normalization["mean"].to(reduced)) / self.normalization["std"].to(reduced)

    def denormalize(self, x: Tensor) -> Tensor:
        if not self.normalization:
            return x
        return x * self.normalization["std"].to(x) + self.normalization["mean"].to(x)

    @torch.no_grad()
    def sample_reduced(self, n: int, *, class_name: str, conditions: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples of ``class_name`` at the training length, de-normalised: ``[n, l, D]``."""
        label = self.class_index(class_name)
        gen = self.generators[self.class_to_generator[class_name]]
        if gen.needs_condition and conditions is None:
            raise UsageError(f"this {self.generator_type} model is conditioned on per-sample condition "
                             f"embeddings; pass conditions of shape [{n}, {self.condition_dim}]")
        if conditions is not None:
            if gen.conditioning != "embedding":
                raise UsageError("this model does not take condition embeddings")
            if tuple(conditions.shape) != (n, self.condition_dim):
                raise UsageError(f"conditions must have shape [{n}, {self.condition_dim}], "
                                 f"got {list(conditions.shape)}")
            conditions = conditions.to(self.device, torch.float32)
        gen.eval()
        labels = torch.full((n,), label, dtype=torch.long, device=self.device)
        x = gen.sample(n, labels=labels, conditions=conditions, generator=generator)
        return self.denormalize(x)

    @torch.no_grad()
    def upsample(self, reduced: Tensor, length: int | None = None, *, dtype: torch.dtype | None = None) -> Tensor:
        """Upsample de-normalised ``[n, l, D]`` samples to ``length`` tokens (default :attr:`default_length`)."""
        out_len = self.default_length if length is None else int(length)
        if out_len < 1:
            raise UsageError(f"output length must be >= 1, got {out_len}")
        self.upsampler.eval()
        x = self.upsampler(reduced, out_len)
        return x.to(dtype) if dtype is not None else x

    @torch.no_grad()
    def sample(self, n: int, *, class_name: str, length: int | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``n`` samples of ``class_name`` upsampled to ``length`` tokens: ``[n, length, D]``.

        ``length`` defaults to :attr:`default_length`. A model trained with per-sample conditions
        needs ``conditions`` ``[n, condition_dim]``. Randomness comes only from ``generator``.
        """
        if length is not None and int(length) < 1:
            raise UsageError(f"output length must be >= 1, got {int(length)}")
        x = self.sample_reduced(n, class_name=class_name, conditions=conditions, generator=generator)
        return self.upsample(x, length, dtype=dtype)
