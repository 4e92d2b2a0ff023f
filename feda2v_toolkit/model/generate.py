"""Generating synthetic datasets from a trained model, streamed to safetensors shards.

:func:`generate` is what ``feda2v-tk generate`` runs: for each class it draws samples in batches,
upsamples them to the output length and hands them to a :class:`~feda2v_toolkit.data.dataset.DatasetWriter`,
so memory stays bounded however many samples are asked for. Class ``c``'s samples depend only on the
seed and ``c`` (not on which other classes are generated), and the output is all-or-nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.data.dataset import DEFAULT_SHARD_BYTES
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import DatasetWriter, _resolve_dtype
from feda2v_toolkit.errors import InputError, UsageError, short_list, spelled
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.runtime.progress import Progress
from feda2v_toolkit.runtime.seeds import SEED_SCHEME, scheme_seed

#: samples drawn per model call; part of what determines the samples (see :func:`sample_class`)
DEFAULT_BATCH = 64
#: the share of the memory budget a batch's upsampled samples may take (the rest: the model, the runtime)
UPSAMPLE_BUDGET_SHARE = 2


def upsample_row_bytes(length: int, dim: int, itemsize: int) -> int:
    """Working set of one sample upsampled to ``[length, dim]`` and written at ``itemsize`` bytes a value: its
    float32 values and a working copy, the converted row and the previous row on its way to disk."""
    return length * dim * (8 + 2 * itemsize)


def output_bytes(samples: int, length: int, dim: int, itemsize: int, condition_dim: int = 0) -> int:
    """Bytes ``samples`` rows of ``[length, dim]`` take in dataset shards: embeddings at ``itemsize`` bytes a
    value, an int64 label and ``condition_dim`` float32 conditions each (the small headers aside)."""
    return samples * (length * dim * itemsize + 8 + 4 * condition_dim)


def upsample_rows(batch_size: int, length: int, dim: int, itemsize: int, budget: int) -> int:
    """How many samples of a drawn batch are upsampled at a time: all ``batch_size`` if their working set
    (float32 samples ``[n, length, dim]`` and a working copy, the converted rows at ``itemsize`` bytes and the
    previous rows on their way to disk) fits half of ``budget``, else as many as do (at least one).

    Upsampling is per sample, so the pieces are the rows the whole batch would give: on CPU, bit for bit for
    every built-in upsampler (tested), so the budget bounds memory without changing what is written. (On a
    GPU, or with a plugin upsampler that is per sample only up to rounding, a matrix product over fewer rows
    may round differently in the last bits.)"""
    per_row = upsample_row_bytes(length, dim, itemsize)
    return max(1, min(int(batch_size), (int(budget) // UPSAMPLE_BUDGET_SHARE) // max(1, per_row)))


class ClassAgnosticWarning(UserWarning):
    """The model's samples do not depend on the class (unified granularity, unconditioned)."""


class OutputLengthWarning(UserWarning):
    """Samples are asked for at a length longer than the training data's sequences."""


@dataclass
class GenerationReport:
    directory: Path
    samples: dict[str, int]
    length: int
    shards: int
    bytes_written: int
    seconds: float


def samples_per_class(model: GenerativeModel, requested: int | str | None, classes: Sequence[str]) -> dict[str, int]:
    """How many samples each class gets: a number, ``"auto"`` (the class's training count) or the config's."""
    value: Any = model.setting("synthetic_samples_per_class") if requested is None else requested
    if isinstance(value, str) and value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise UsageError(f"samples per class must be a positive integer or 'auto', got {value!r}") from None
    if value == "auto":
        unknown = [c for c in classes if not model.class_counts.get(c)]
        if unknown:
            raise UsageError(f"'auto' samples per class needs the training count of each class; the model has none "
                             f"for {', '.join(unknown)} (e.g. a converted model): pass a number")
        return {c: int(model.class_counts[c]) for c in classes}
    if int(value) < 1:
        raise UsageError(f"samples per class must be >= 1, got {value}")
    return {c: int(value) for c in classes}


def is_class_agnostic(model: GenerativeModel) -> bool:
    return model.granularity == "unified" and all(g.conditioning is None for g in model.generators.values())


def _conditions_by_class(path: str | os.PathLike[str], model: GenerativeModel) -> dict[str, Tensor]:
    ds = open_dataset(path)
    if ds.condition_dim == 0:
        raise InputError(f"{path}: holds no 'conditions' tensor")
    if ds.condition_dim != model.condition_dim:
        raise InputError(f"{path}: conditions are {ds.condition_dim} wide; the model expects {model.condition_dim}")
    conditions = ds.read_conditions(range(len(ds)))
    return {ds.class_names[c]: conditions[ds.labels == c] for c in torch.unique(ds.labels).tolist()}


def class_seed(seed: int, label: int, scheme: int | None = SEED_SCHEME) -> int:
    """The RNG seed of one class's sample stream (independent of the other classes): ``derive_seed(seed,
    "sample", label)``, or the arithmetic of model files written before seed schemes (``scheme`` None/1)."""
    return scheme_seed(scheme, seed, "sample", label)


def sample_class_reduced(model: GenerativeModel, class_name: str, n: int, *, seed: int,
                         batch_size: int = DEFAULT_BATCH,
                         conditions: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(samples [b, l, D] at the training length, conditions or None)`` batches, ``n`` in all.

    What is drawn depends only on the model, ``seed``, the class and ``batch_size`` -- this is the
    stream ``generate`` writes (after upsampling) and ``evaluate`` scores. ``conditions`` (the class's
    condition rows) are used in order and cycled.
    """
    label = model.class_index(class_name)
    g = torch.Generator(device=model.device).manual_seed(class_seed(seed, label, model.seed_scheme))
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        cond = None
        if conditions is not None and model.needs_condition(class_name):
            cond = conditions[torch.arange(done, done + b) % conditions.shape[0]]
        with torch.no_grad():
            reduced = model.sample_reduced(b, class_name=class_name, conditions=cond, generator=g)
        yield reduced, cond
        done += b


def sample_class(model: GenerativeModel, class_name: str, n: int, *, seed: int, length: int | None = None,
                 batch_size: int = DEFAULT_BATCH, conditions: Tensor | None = None,
                 dtype: torch.dtype | None = None,
                 rows: int | None = None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """:func:`sample_class_reduced` upsampled to ``length`` tokens (default: the model's default length), each
    drawn batch in pieces of at most ``rows`` samples (default: whole; the pieces do not change the samples,
    :func:`upsample_rows`)."""
    for reduced, cond in sample_class_reduced(model, class_name, n, seed=seed, batch_size=batch_size,
                                              conditions=conditions):
        step = rows or reduced.shape[0]
        for i in range(0, reduced.shape[0], step):
            with torch.no_grad():
                x = model.upsample(reduced[i:i + step], length, dtype=dtype)
            yield x, cond[i:i + step] if cond is not None else None


def generate(model: GenerativeModel, out: str | os.PathLike[str], *, samples: int | str | None = None,
             classes: Sequence[str] | None = None, length: int | None = None, dtype: str | torch.dtype | None = None,
             seed: int = 0, batch_size: int = DEFAULT_BATCH, conditions: str | os.PathLike[str] | None = None,
             shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None,
             log: Callable[[str], None] | None = None, overwrite: bool = False,
             memory_budget: int | None = None) -> GenerationReport:
    """Write synthetic samples of ``classes`` (default: all the model can sample) to shard directory ``out``.

    The output's class names are the generated classes (in the model's order), so it trains as it is.
    ``conditions`` is a dataset file whose ``conditions`` rows (per label) condition an
    embedding-conditioned model; they are used in order and cycled if more samples are asked for.
    Samples depend on the model, ``seed``, the class and ``batch_size`` (see :func:`sample_class`).
    ``length`` defaults to the model's output length (``generator_output_sequence_length``, else the
    training length); a length beyond the training data's warns (:class:`OutputLengthWarning`).
    ``dtype`` defaults to the training data's storage dtype (float32 for models that do not record it).
    An existing ``out`` is refused unless ``overwrite``, and then replaced only if it holds nothing but
    dataset shards, once the new ones are complete (the overwrite rule,
    :func:`~feda2v_toolkit.runtime.atomic.check_output`; checked before anything is sampled).
    ``progress``: a bar on a terminal, else a plain line every 15 s (``None``: on; ``False``: off).
    ``memory_budget`` (bytes; default :func:`~feda2v_toolkit.runtime.resources.memory_budget`): a drawn batch
    is upsampled and written in pieces whose working set fits half of it (:func:`upsample_rows`); the
    samples do not depend on it.
    """
    from feda2v_toolkit.runtime.threads import settle_vector_math

    settle_vector_math()  # the same bytes on every run (runtime.threads)
    from feda2v_toolkit.runtime.atomic import check_output

    check_output(out, inputs=[conditions] if conditions is not None else [], overwrite=overwrite, directory=True)
    import time

    say = log or (lambda _msg: None)
    names = list(classes) if classes else model.sampleable_classes
    if not names:  # a model file like this is refused when it is read
        raise UsageError("the model has no generator for any of its classes: nothing can be generated")
    if len(set(names)) != len(names):
        raise UsageError(f"classes named more than once: {short_list(sorted({c for c in names if names.count(c) > 1}))}")
    for c in names:
        model.class_index(c)  # one clear error for an unknown class
    names = [c for c in model.class_names if c in names]  # model order; the output's labels index these
    counts = samples_per_class(model, samples, names)
    out_len = model.default_length if length is None else int(length)
    if out_len < 1:
        raise UsageError(f"output length must be >= 1, got {out_len}")
    out_dtype = _resolve_dtype(dtype) or _resolve_dtype(model.data_dtype) or torch.float32
    from feda2v_toolkit.runtime.resources import format_bytes, require_disk_space, require_memory
    from feda2v_toolkit.runtime.resources import memory_budget as default_budget

    budget = default_budget() if memory_budget is None else int(memory_budget)
    piece = upsample_rows(batch_size, out_len, model.dim, out_dtype.itemsize, budget)
    # a piece upsampled (float32, plus a working copy) and converted, and the previous one on its way to disk
    require_memory(piece * upsample_row_bytes(out_len, model.dim, out_dtype.itemsize),
        f"generating samples of [{out_len}, {model.dim}]", hint=spelled("lower --output-length", "lower length"))
    total = sum(counts.values())
    # the counts may come from the model file (its training counts, its config): bounded before a byte is written
    asked = model.setting("synthetic_samples_per_class") if samples is None else samples
    source = (" (the model's training counts)" if asked == "auto" else
              " (the model's synthetic_samples_per_class)" if samples is None else "")
    cond_width = model.condition_dim if conditions is not None else 0
    require_disk_space(output_bytes(total, out_len, model.dim, out_dtype.itemsize, cond_width), out,
                       f"writing {total:,} samples{source} of [{out_len}, {model.dim}] "
                       f"{str(out_dtype).removeprefix('torch.')}",
                       hint=spelled("lower -k/--samples-per-class or --output-length", "lower samples or length"))
    largest = min(batch_size, max(counts.values()))  # the largest batch drawn
    if piece < largest:
        say(f"upsampling each drawn batch (up to {largest} samples) {piece} at a time (half the memory budget, "
            f"{format_bytes(budget)}; the same samples)")
    if out_len > model.full_length:
        warnings.warn(f"output length {out_len} is longer than the training data's sequences ({model.full_length} "
                      f"tokens): every token past {model.full_length} is extrapolated, not learned",
                      OutputLengthWarning, stacklevel=2)
    cond_by_class = _conditions_by_class(conditions, model) if conditions is not None else None
    needs = [c for c in names if model.needs_condition(c)]
    if needs and cond_by_class is None:
        raise UsageError(f"the model is conditioned on per-sample condition embeddings [{model.condition_dim}]; "
                         f"pass {spelled('--conditions FILE', 'conditions=FILE')} (a dataset file with "
                         "'conditions' and 'labels')")
    if cond_by_class is not None:
        missing = [c for c in needs if c not in cond_by_class]
        if missing:
            raise InputError(f"{conditions}: no conditions for class(es) {short_list(missing)}")
    if is_class_agnostic(model) and len(names) > 1:
        warnings.warn("this model is unified and unconditioned: its samples do not depend on the class, so the "
                      "per-class labels of the output carry no class information (train with "
                      "use_conditioned_vae or per_class granularity)", ClassAgnosticWarning, stacklevel=2)
    bar = Progress(total, 0, progress, unit="sample", desc="generate")
    t0 = time.perf_counter()
    meta = {"source_model_seed": str(seed), "output_length": str(out_len), "batch_size": str(batch_size)}
    # shards of whole batches where a batch fits in a shard (the layout generate has always written; the batch
    # size itself is part of what is drawn, so it is never changed here)
    row_bytes = out_len * model.dim * out_dtype.itemsize
    rows_per_shard = max(1, shard_bytes // row_bytes)
    if rows_per_shard >= batch_size:
        shard_bytes = (rows_per_shard // batch_size) * batch_size * row_bytes
    try:
        with DatasetWriter(out, class_names=names, dtype=out_dtype, shard_bytes=shard_bytes,
                           extra_metadata=meta, overwrite=overwrite, rows=total) as writer:
            for label, name in enumerate(names):
                pool = cond_by_class.get(name) if cond_by_class is not None else None
                for x, cond in sample_class(model, name, counts[name], seed=seed, length=out_len,
                                            batch_size=batch_size, conditions=pool, dtype=out_dtype, rows=piece):
                    writer.add(x, torch.full((x.shape[0],), label), cond, copy=False)  # fresh tensors
                    bar.update(x.shape[0])
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    say(f"wrote {total} samples [{out_len}, {model.dim}] to {writer.directory} "
        f"({len(writer.shards)} shard(s), {writer.bytes_written / 2**20:.1f} MiB, {seconds:.1f}s)")
    return GenerationReport(Path(writer.directory), counts, out_len, len(writer.shards), writer.bytes_written, seconds)
