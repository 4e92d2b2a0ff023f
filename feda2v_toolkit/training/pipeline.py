"""Training: reduce once, normalise, train generators per granularity, fit the upsampler, export.

:func:`train` is what ``feda2v-tk train`` runs. The steps:

1. read the config through the config layer (migrated in memory, validated, defaults from the schema);
2. open the dataset lazily and split off a stratified held-out set (``generator_validation_split``);
3. fit the reducer if it is a fitted one, then reduce every sequence **once**, streaming, into an
   ``[N, l, D]`` cache (the full sequences are never all in memory);
4. standardise the reduced sequences per position and feature (statistics go into the model file);
5. fit the upsampler on (reduced, full) training pairs if it is trainable, and measure it next to
   linear interpolation on the held-out set;
6. train one generator per granularity key, epoch by epoch, with validation, progress, JSON-lines
   metrics, and atomic checkpoints every ``generator_checkpoint_frequency`` epochs;
7. write the model file atomically.

Same seed, same data, same config -> the same weights on the same machine, and ``resume=True``
continues from the last checkpoint to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, Reducer, TrainContext, Upsampler
from feda2v_toolkit.config import configured_upsampler
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.errors import InputError, UsageError, short_list
from feda2v_toolkit.model.bundle import UNIFIED_KEY, GenerativeModel
from feda2v_toolkit.model.file import unprefixed
from feda2v_toolkit.runtime.atomic import check_output_path, check_writable
from feda2v_toolkit.runtime.progress import Progress
from feda2v_toolkit.training.checkpoint import (
    TrainingState,
    checkpoint_epoch,
    load_checkpoint,
    save_checkpoint,
)
from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

#: rows of full-length sequences read per chunk while reducing (bounded memory)
READ_CHUNK_BYTES = 32 * 2**20
OTHER_GROUP = "other"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a usage error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def chunk_rows(seq_len: int, dim: int) -> int:
    """Full sequences ``[seq_len, dim]`` (float32) per read chunk of :data:`READ_CHUNK_BYTES`."""
    return max(1, READ_CHUNK_BYTES // (seq_len * dim * 4))


def read_chunk_rows(ds: Dataset) -> int:
    return chunk_rows(ds.seq_len, ds.dim)


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Held-out indices: ``round(fraction * n_c)`` per class (none for classes with < 2 samples)."""
    g = torch.Generator().manual_seed(seed + 17)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = min(int(round(fraction * idx.numel())), idx.numel() - 1) if idx.numel() > 1 else 0
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def generator_groups(cfg: Mapping[str, Any], class_names: list[str], present: list[str]) -> dict[str, list[str]]:
    """Generator key -> the classes it serves, for the configured granularity."""
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


def _fingerprint(cfg: Mapping[str, Any], ds: Dataset, seed: int, reduced: Tensor) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the training-relevant config (epochs included), the
    data (its reduced cache, bit for bit, and its labels) and the seed."""
    relevant = {k: v for k, v in sorted(cfg.items()) if k not in _RESUME_IGNORED}
    data = hashlib.sha256(ds.labels.numpy().tobytes())
    data.update(memoryview(reduced.contiguous().numpy()).cast("B"))
    return {"config": hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "data": f"{_data_shape(ds)}:{data.hexdigest()[:16]}", "seed": seed,
            "epochs": int(cfg["generator_training_epochs"])}


#: config keys a resumed run may change (where checkpoints go, what is generated afterwards, ...)
_RESUME_IGNORED = frozenset({
    "generator_checkpoint_dir", "generator_checkpoint_base_name", "generator_save_checkpoint",
    "generator_load_checkpoint", "generator_checkpoint_frequency", "synthetic_samples_per_class",
    "generator_output_sequence_length", "pretrained_generator_path", "generator_seed", "generator_training_epochs"})


def _config_changes(saved: Any, cfg: Mapping[str, Any]) -> str:
    """``key old -> new`` for the training-relevant keys that differ from a checkpoint's config."""
    if not isinstance(saved, dict):
        return ""
    keys = sorted(k for k in set(saved) | set(cfg) if k not in _RESUME_IGNORED and saved.get(k) != cfg.get(k))
    return short_list((f"{k} {json.dumps(saved.get(k), default=str)} -> {json.dumps(cfg.get(k), default=str)}"
                       for k in keys), 3, sep="; ")


def _data_shape(ds: Dataset) -> str:
    return f"{len(ds)}x{ds.seq_len}x{ds.dim}"


_FINGERPRINT_WORDS = {"config": "config", "data": "dataset", "seed": "seed", "epochs": "epoch count"}


def _refuse_resume(ckpt_path: Path, differ: list[str], changes: str = "") -> UsageError:
    detail = f" ({changes})" if changes else ""
    return UsageError(f"{ckpt_path}: checkpoint was made with another {' and '.join(differ)}{detail} "
                      f"(cannot resume it exactly); remove it, or set another generator_checkpoint_dir")


def _check_resumable_early(ckpt_path: Path, loaded: Any, cfg: Mapping[str, Any], ds: Dataset, seed: int) -> None:
    """What can be compared before the data is reduced (config, data shape, seed, epochs): refuse a
    checkpoint of another run before its fitted reducer is loaded into a reducer of another shape,
    naming the config keys that differ."""
    saved = loaded.state.fingerprint
    now = _fingerprint(cfg, ds, seed, torch.empty(0))
    differ = [_FINGERPRINT_WORDS[k] for k in ("config", "seed", "epochs") if saved.get(k) != now[k]]
    saved_shape = str(saved.get("data", "")).split(":", 1)[0]
    if saved_shape != _data_shape(ds):
        differ.insert(1 if "config" in differ else 0, "dataset")
    if differ:
        changes = []
        if "config" in differ:
            changes.append(_config_changes(loaded.doc.get("model", {}).get("config"), cfg))
        if "dataset" in differ:
            changes.append(f"data {saved_shape.replace('x', ' x ')} -> {_data_shape(ds).replace('x', ' x ')}")
        raise _refuse_resume(ckpt_path, differ, "; ".join(c for c in changes if c))


_DEFAULT_CHECKPOINT_DIR = "checkpoints"


def default_checkpoint_dir(out: str | os.PathLike[str]) -> Path:
    """Where a run writing model ``out`` keeps its checkpoints when no directory is configured:
    ``<out without suffix>.checkpoints`` beside it (each model its own, so runs never collide)."""
    o = Path(out)
    return o.with_name(f"{o.stem}.checkpoints")


def checkpoint_path(cfg: Mapping[str, Any], checkpoint_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where training checkpoints of this config go."""
    return Path(checkpoint_dir or cfg["generator_checkpoint_dir"]) / \
        f"{cfg['generator_checkpoint_base_name']}.checkpoint.safetensors"


@dataclass
class _Run:
    """Everything a training run holds while it goes."""

    cfg: dict[str, Any]
    ds: Dataset
    device: torch.device
    seed: int
    train_idx: Tensor
    val_idx: Tensor
    reduced: Tensor  # [N, l, D] on CPU: raw until the upsampler is fitted, then standardised in place
    model: GenerativeModel
    optimizers: dict[str, dict[str, torch.optim.Optimizer]]
    members: dict[str, Tensor]  # generator key -> label values it serves


def reduce_dataset(ds: Dataset, reducer: Reducer, indices: Tensor | None = None, *,
                   device: torch.device | str = "cpu") -> Tensor:
    """Reduce every (or the given) sequence once, streaming: ``[n, l, D]`` float32 on CPU."""
    idx = torch.arange(len(ds)) if indices is None else indices
    out = torch.empty(idx.numel(), reducer.length, ds.dim)
    pos = 0
    with torch.no_grad():
        for batch in ds.batches(read_chunk_rows(ds), idx):
            r = reducer(batch.embeddings.to(device))
            out[pos:pos + r.shape[0]] = r.to("cpu", torch.float32)
            pos += r.shape[0]
    return out


def standardization(reduced: Tensor, indices: Tensor, rows: int = 4096) -> dict[str, Tensor]:
    """Per position and feature mean and std ``[l, D]`` over ``reduced[indices]``, in chunks (float64 sums).

    The single-site form of :class:`feda2v_toolkit.training.stages.NormalizationStage` (federated runs merge the sums).
    """
    from feda2v_toolkit.training.stages import NormalizationStage

    stage = NormalizationStage()
    return stage.finish(stage.local(reduced, indices, rows))


def full_batches(ds: Dataset, indices: Tensor, rows: int | None = None) -> Callable[[], Iterator[Tensor]]:
    """A re-iterable stream of full-length float32 batches ``[B, L, D]`` over ``indices``."""
    rows = rows or read_chunk_rows(ds)

    def batches() -> Iterator[Tensor]:
        for batch in ds.batches(rows, indices):
            yield batch.embeddings

    return batches


def upsampler_pairs(ds: Dataset, indices: Tensor, reduced: Tensor, rows: int,
                    seed: int) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
    """(reduced, full) float32 pairs over ``indices`` in chunks, chunk order reshuffled per call.

    ``reduced`` holds the (un-normalised) reduced sequences of the whole dataset, by global index.
    """
    calls = [0]

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed * 7919 + calls[0])
        calls[0] += 1
        starts = torch.arange(0, indices.numel(), rows)
        for s in starts[torch.randperm(starts.numel(), generator=g)].tolist():
            chunk = indices[s:s + rows]
            yield reduced[chunk], ds.read(chunk).embeddings

    return pairs


def heldout_upsampling_error(ds: Dataset, indices: Tensor, reduced: Tensor, upsampler: Upsampler,
                             device: torch.device) -> dict[str, float]:
    """MSE and R^2 of reconstructing held-out full sequences: the upsampler vs linear interpolation.

    ``reduced`` holds the un-normalised reduced sequences by global index. R^2 is about the held-out
    set's per-position mean (:class:`~feda2v_toolkit.analysis.metrics.ReconstructionStats`).
    """
    from feda2v_toolkit.analysis.metrics import ReconstructionStats

    up_stats, lin_stats = ReconstructionStats(), ReconstructionStats()
    rows = read_chunk_rows(ds)
    upsampler.eval()
    with torch.no_grad():
        for s in range(0, indices.numel(), rows):
            chunk = indices[s:s + rows]
            full = ds.read(chunk).embeddings.to(device)
            red = reduced[chunk].to(device)
            up_stats.add(full, upsampler(red, ds.seq_len), sst=0.0)
            lin_stats.add(full, interpolate_sequence(red, ds.seq_len, "linear"), sst=0.0)
    if up_stats.count == 0:
        return {}
    elements = up_stats.count * ds.seq_len * ds.dim
    return {"heldout_mse": up_stats.sse / elements, "heldout_mse_linear": lin_stats.sse / elements,
            "heldout_r2": up_stats.r2, "heldout_r2_linear": lin_stats.r2}


def _mean_terms(rows: list[dict[str, float]], weights: list[int]) -> dict[str, float]:
    total = sum(weights)
    keys = list(rows[0]) if rows else []
    return {k: sum(r[k] * w for r, w in zip(rows, weights, strict=True)) / total for k in keys}


def train(config: Any, data: str | os.PathLike[str] | Dataset, *, out: str | os.PathLike[str] | None = None,
          overrides: Mapping[str, Any] | None = None, seed: int | None = None, device: str | torch.device = "cpu",
          resume: bool = False, checkpoint_dir: str | os.PathLike[str] | None = None,
          metrics_path: str | os.PathLike[str] | None = None, progress: bool | None = None,
          log: Callable[[str], None] | None = None) -> GenerativeModel:
    """Train a generator model on ``data`` as ``config`` says; write it to ``out`` if given.

    Args:
        config: a config file path, a full experiment config or a generator section (mapping); read
            through :func:`feda2v_toolkit.config.load_config` (migrated, validated, defaults filled).
        data: a dataset path (file, shard directory, legacy ``.pt``) or an open :class:`Dataset`.
        overrides: generator-section keys that take precedence over the config (CLI options).
        seed: overrides ``generator_seed``; if both are unset a random seed is drawn and recorded.
        device: ``cpu``, ``cuda`` or ``auto``.
        resume: continue from the checkpoint in the checkpoint directory, if there is one (also
            when the config sets ``generator_load_checkpoint``).
        checkpoint_dir: overrides ``generator_checkpoint_dir``.
        metrics_path: append one JSON line per epoch here.
        progress: show a progress bar (default: only when stderr is a terminal).
        log: called with one-line status messages (default: silent).
    """
    from feda2v_toolkit.config import load_config
    from feda2v_toolkit.plugins import get_registry

    say = log or (lambda _msg: None)
    cfg = dict(load_config(config, overrides=overrides))
    dev = resolve_device(device)
    data_paths = [] if isinstance(data, Dataset) else [data]
    if checkpoint_dir is None and out is not None and cfg["generator_checkpoint_dir"] == _DEFAULT_CHECKPOINT_DIR:
        checkpoint_dir = default_checkpoint_dir(out)  # beside the model, not a shared ./checkpoints
    ckpt_path = checkpoint_path(cfg, checkpoint_dir)
    for target in (out, metrics_path, ckpt_path if cfg["generator_save_checkpoint"] else None):
        if target is not None:
            check_output_path(target, data_paths, role="input dataset")
            check_writable(target)  # before training, not after it
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    length = int(cfg["generator_training_sequence_length"])
    if ds.seq_len < length:
        raise InputError(f"{ds.path}: sequences have {ds.seq_len} tokens, fewer than "
                         f"generator_training_sequence_length = {length}")
    counts = ds.class_counts()
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise InputError(f"{ds.path}: class(es) {short_list(map(repr, empty))} have no samples; "
                         f"remove them from the class names or add samples")
    registry = get_registry()
    loaded = None
    if resume or cfg.get("generator_load_checkpoint"):
        if ckpt_path.exists():
            loaded = load_checkpoint(ckpt_path)
        else:
            say(f"no checkpoint at {ckpt_path}; starting from scratch")
    if seed is None:
        seed = cfg.get("generator_seed")
    if seed is None and loaded is not None:
        seed = loaded.state.fingerprint.get("seed")  # a run that drew its seed resumes with it
    if seed is None:
        seed = secrets.randbits(31)
        say(f"seed: {seed} (drawn at random; pass --seed to reproduce)")
    cfg["generator_seed"] = seed
    torch.manual_seed(seed)

    train_idx, val_idx = stratified_split(ds.labels, float(cfg["generator_validation_split"]), seed)
    say(f"data: {len(ds)} sequences [{ds.seq_len}, {ds.dim}] {str(ds.storage_dtype).replace('torch.', '')}, "
        f"{ds.num_classes} classes; {train_idx.numel()} train / {val_idx.numel()} held out")
    if cfg["generator_save_checkpoint"]:
        say(f"checkpoints: {ckpt_path.parent}/ (--checkpoint-dir to change)")

    # -- reducer: fit (if needed) and reduce every sequence once ---------------------------------
    reducer_name = cfg["generator_reducer"]
    reducer = registry.load("reducer", reducer_name).from_config(cfg, length=length, full_length=ds.seq_len,
                                                                 dim=ds.dim).to(dev)
    if loaded is not None:
        _check_resumable_early(ckpt_path, loaded, cfg, ds, seed)
        try:
            reducer.load_state_dict(unprefixed(loaded.tensors, "reducer"))
        except RuntimeError:
            raise _refuse_resume(ckpt_path, ["reducer state"]) from None
    elif type(reducer).fitted:
        say(f"fitting reducer {reducer_name} on {train_idx.numel()} sequences")
        reducer.fit(full_batches(ds, train_idx))
    reducer.eval()
    t0 = time.perf_counter()
    reduced_raw = reduce_dataset(ds, reducer, device=dev)
    say(f"reduced {len(ds)} sequences to {length} tokens in {time.perf_counter() - t0:.1f}s")
    fingerprint = _fingerprint(cfg, ds, seed, reduced_raw)
    if loaded is not None:
        differ = [_FINGERPRINT_WORDS[k] for k in fingerprint if loaded.state.fingerprint.get(k) != fingerprint[k]]
        if differ:
            raise _refuse_resume(ckpt_path, differ)
        say(f"resuming from {ckpt_path} after epoch {loaded.state.epoch}")

    normalization = standardization(reduced_raw, train_idx) if cfg["generator_normalize"] else {}

    # -- generators --------------------------------------------------------------------------
    groups = generator_groups(cfg, ds.class_names, ds.class_names)  # every class has samples (checked above)
    gen_cls = registry.load("generator", cfg["generator_type"])
    _require_training_memory(gen_cls, cfg, length, ds, len(groups))
    generators: dict[str, Generator] = {}
    for key in groups:
        generators[key] = gen_cls.from_config(cfg, seq_len=length, dim=ds.dim, num_classes=ds.num_classes,
                                              condition_dim=ds.condition_dim).to(dev)
    class_to_generator = {c: key for key, members in groups.items() for c in members}

    # -- upsampler ---------------------------------------------------------------------------
    upsampler_name = configured_upsampler(cfg)
    upsampler = registry.load("upsampler", upsampler_name).from_config(
        cfg, reduced_length=length, full_length=ds.seq_len, dim=ds.dim).to(dev)

    model = GenerativeModel(
        generator_type=cfg["generator_type"], generators=generators, granularity=cfg["generator_granularity"],
        class_names=list(ds.class_names), class_to_generator=class_to_generator, reducer=reducer,
        reducer_name=reducer_name, upsampler=upsampler, upsampler_name=upsampler_name, full_length=ds.seq_len,
        training_length=length, output_length=cfg["generator_output_sequence_length"], dim=ds.dim,
        normalization=normalization, condition_dim=ds.condition_dim, class_counts=counts, config=cfg, seed=seed,
        data_dtype=str(ds.storage_dtype).replace("torch.", ""))
    optimizers = {key: gen.configure_optimizers(cfg) for key, gen in generators.items()}
    state = TrainingState(epoch=0, step=0, fingerprint=fingerprint)
    if loaded is not None:
        for i, gen in enumerate(generators.values()):
            gen.load_state_dict(unprefixed(loaded.tensors, f"generators.{i}"))
        upsampler.load_state_dict(unprefixed(loaded.tensors, "upsampler"))
        loaded.restore_optimizers(model, optimizers)
        state = loaded.state

    run = _Run(cfg, ds, dev, seed, train_idx, val_idx, reduced_raw, model, optimizers,
               {key: torch.tensor([ds.class_names.index(c) for c in members]) for key, members in groups.items()})

    if state.upsampler_metrics is None:
        state.upsampler_metrics = _fit_upsampler(run, say)
        if loaded is None:
            torch.manual_seed(seed)  # generator training starts from the same RNG state either way
    if normalization:  # from here on the cache holds standardised sequences (no second copy)
        reduced_raw.sub_(normalization["mean"]).div_(normalization["std"])
    if loaded is not None:
        loaded.restore_rng()

    try:
        _train_generators(run, state, ckpt_path, metrics_path, progress, say)
    except KeyboardInterrupt:
        if cfg["generator_save_checkpoint"] and ckpt_path.exists():
            say(f"interrupted; the last checkpoint ({ckpt_path}, epoch {checkpoint_epoch(ckpt_path)}) "
                f"is intact: run the same command with --resume to continue")
        else:
            say("interrupted before the first checkpoint; nothing to resume")
        raise

    model.metrics = _final_metrics(state)
    if out is not None:
        from feda2v_toolkit.model.file import save_model

        save_model(model.to("cpu"), out)
        say(f"wrote {out}")
    return model


def _fit_upsampler(run: _Run, say: Callable[[str], None]) -> dict[str, Any]:
    """Fit a trainable upsampler on (reduced, full) training pairs; score it on the held-out split.

    Runs while ``run.reduced`` still holds the raw (un-standardised) reduced sequences.
    """
    ups = run.model.upsampler
    metrics: dict[str, Any] = {"name": run.model.upsampler_name}
    if type(ups).trainable:
        t0 = time.perf_counter()
        say(f"training upsampler {run.model.upsampler_name} on {run.train_idx.numel()} (reduced, full) pairs")
        rows = max(1, min(run.cfg["generator_batch_size"], read_chunk_rows(run.ds)))
        pairs = upsampler_pairs(run.ds, run.train_idx, run.reduced, rows, run.seed)
        ups.train()
        fit_metrics = ups.fit(pairs, config=run.cfg)
        ups.eval()
        metrics["fit"] = fit_metrics
        metrics["fit_seconds"] = time.perf_counter() - t0
    if run.val_idx.numel() and run.ds.seq_len != run.model.training_length:
        metrics.update(heldout_upsampling_error(run.ds, run.val_idx, run.reduced, ups, run.device))
        if "heldout_mse" in metrics:
            say(f"upsampler {run.model.upsampler_name}: held-out MSE {metrics['heldout_mse']:.5g} "
                f"(linear interpolation {metrics['heldout_mse_linear']:.5g})")
    return metrics


def _batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def _train_generators(run: _Run, state: TrainingState, ckpt_path: Path, metrics_path: Any,
                      progress: bool | None, say: Callable[[str], None]) -> None:
    cfg, model, ds = run.cfg, run.model, run.ds
    trained = {key: gen for key, gen in model.generators.items() if not type(gen).fitted}
    # closed-form generators are fitted once; a model of only those runs one pass (for validation)
    epochs = int(cfg["generator_training_epochs"]) if trained else 1
    batch_size = int(cfg["generator_batch_size"])
    autocast_dtype = torch.bfloat16 if cfg.get("generator_autocast") == "bfloat16" else None
    labels_all = ds.labels
    conditions_all = ds.read_conditions(range(len(ds))) if ds.condition_dim else None
    train_sets = {key: run.train_idx[torch.isin(labels_all[run.train_idx], m)] for key, m in run.members.items()}
    val_sets = {key: run.val_idx[torch.isin(labels_all[run.val_idx], m)] for key, m in run.members.items()}
    fit_metrics = _fit_generators(run, train_sets, conditions_all, say) if state.epoch == 0 else {}
    steps_per_epoch = sum(_batches_per_epoch(idx.numel(), batch_size) for key, idx in train_sets.items()
                          if idx.numel() and key in trained)
    bar = Progress(epochs * steps_per_epoch, state.epoch * steps_per_epoch, progress)
    metrics_file = _open_metrics(metrics_path, state.epoch) if metrics_path else nullcontext()
    val_every = int(cfg["generator_validation_frequency"])
    save_every = int(cfg["generator_checkpoint_frequency"]) if cfg["generator_save_checkpoint"] else 0
    try:
        with metrics_file as mf:
            for epoch in range(state.epoch, epochs):
                t0 = time.perf_counter()
                epoch_terms, weights, seen = [], [], 0
                for gi, (key, gen) in enumerate(model.generators.items()):
                    idx = train_sets[key]
                    if idx.numel() == 0 or key not in trained:
                        continue
                    g = torch.Generator().manual_seed(run.seed * 1_000_003 + epoch * 1009 + gi)
                    perm = idx[torch.randperm(idx.numel(), generator=g)]
                    nb = _batches_per_epoch(perm.numel(), batch_size)
                    gen.train()
                    for b in range(nb):
                        rows = perm[b * batch_size:(b + 1) * batch_size]
                        x = run.reduced[rows].to(run.device, non_blocking=True)
                        labels = labels_all[rows].to(run.device)
                        cond = conditions_all[rows].to(run.device) if conditions_all is not None else None
                        ctx = TrainContext(epoch=epoch, total_epochs=epochs, step=state.step,
                                           progress=(epoch + b / nb) / epochs, config=cfg,
                                           autocast_dtype=autocast_dtype, device=run.device)
                        terms = gen.training_step(x, labels=labels, conditions=cond,
                                                  optimizers=run.optimizers[key], ctx=ctx)
                        _check_finite_terms(terms, epoch, key)
                        epoch_terms.append(terms)
                        weights.append(int(rows.numel()))
                        seen += int(rows.numel())
                        state.step += 1
                        bar.update()
                elapsed = time.perf_counter() - t0
                record: dict[str, Any] = {"epoch": epoch + 1, "epochs": epochs, "step": state.step,
                                          "train": _mean_terms(epoch_terms, weights),
                                          "samples_per_s": seen / elapsed if elapsed > 0 else None,
                                          "seconds": elapsed}
                if fit_metrics and epoch == 0:
                    record["fit"] = fit_metrics
                if run.val_idx.numel() and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs):
                    record["val"] = _validate(run, val_sets, epoch, epochs, autocast_dtype, conditions_all)
                state.history.append(record)
                state.epoch = epoch + 1
                bar.postfix(epoch=f"{epoch + 1}/{epochs}", **record["train"],
                            **({"val_loss": record["val"]["loss"]} if "val" in record else {}),
                            samples_s=record["samples_per_s"] or 0.0)
                if mf is not None:
                    mf.write(json.dumps(record) + "\n")
                    mf.flush()
                if save_every and ((epoch + 1) % save_every == 0 or epoch + 1 == epochs):
                    save_checkpoint(ckpt_path, model, run.optimizers, state)
    finally:
        bar.close()


def _require_training_memory(gen_cls: type, cfg: Mapping[str, Any], length: int, ds: Dataset, count: int) -> None:
    """Refuse generators that cannot fit (e.g. ``--hidden-dim 1000000000``) before building them: count
    their parameters on the meta device; weights, gradients and two Adam moments take 4 floats each."""
    try:
        with torch.device("meta"):
            probe = gen_cls.from_config(cfg, seq_len=length, dim=ds.dim, num_classes=ds.num_classes,
                                        condition_dim=ds.condition_dim)
        params = sum(p.numel() for p in probe.parameters())
    except Exception:  # a generator that cannot be built on meta: no estimate
        return
    from feda2v_toolkit.runtime.resources import require_memory

    require_memory(params * 4 * 4 * count, f"training {count} {cfg['generator_type']} generator(s) of "
                   f"{params:,} parameters", hint="lower generator_hidden_dim / --hidden-dim (see feda2v-tk plan)")


def _open_metrics(path: str | os.PathLike[str], done_epochs: int) -> Any:
    """Open the metrics file for appending the epochs after ``done_epochs``: a fresh run starts it anew
    (separate runs never run together), a resumed one keeps only the lines of the epochs its checkpoint
    holds (no duplicate epochs after kill + resume)."""
    from feda2v_toolkit.runtime.atomic import atomic_write_text

    p = Path(path)
    kept: list[str] = []
    if done_epochs and p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                epoch = json.loads(line).get("epoch")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line torn by a kill
            if isinstance(epoch, int) and epoch <= done_epochs:
                kept.append(line + "\n")
    atomic_write_text(p, "".join(kept))
    return open(p, "a", encoding="utf-8")  # noqa: SIM115 - closed by the caller's with


def _fit_generators(run: _Run, train_sets: Mapping[str, Tensor], conditions_all: Tensor | None,
                    say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Fit every closed-form generator (``fitted = True``) once on all of its training sequences."""
    out: dict[str, dict[str, float]] = {}
    for gi, (key, gen) in enumerate(run.model.generators.items()):
        idx = train_sets[key]
        if not type(gen).fitted or idx.numel() == 0:
            continue
        t0 = time.perf_counter()
        cond = conditions_all[idx].to(run.device) if conditions_all is not None else None
        metrics = gen.fit(run.reduced[idx].to(run.device), labels=run.ds.labels[idx].to(run.device),
                          conditions=cond, seed=run.seed * 1_000_003 + gi)
        _check_finite_terms({k: float(v) for k, v in metrics.items()}, 0, key)
        out[key] = {k: float(v) for k, v in metrics.items()}
        say(f"fitted generator {key!r} on {idx.numel()} sequences in {time.perf_counter() - t0:.2f}s")
    return out


def _check_finite_terms(terms: Mapping[str, float], epoch: int, key: str) -> None:
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise InputError(f"training diverged at epoch {epoch + 1} (generator {key!r}): "
                         f"{', '.join(bad)} became NaN/inf; lower generator_learning_rate")


def _validate(run: _Run, val_sets: Mapping[str, Tensor], epoch: int, epochs: int,
              autocast_dtype: torch.dtype | None, conditions_all: Tensor | None) -> dict[str, float]:
    rows_out, weights = [], []
    batch_size = int(run.cfg["generator_batch_size"])
    for key, gen in run.model.generators.items():
        idx = val_sets[key]
        if idx.numel() == 0:
            continue
        gen.eval()
        with torch.no_grad():
            for s in range(0, idx.numel(), batch_size):
                rows = idx[s:s + batch_size]
                ctx = TrainContext(epoch=epoch, total_epochs=epochs, step=0, progress=(epoch + 1) / epochs,
                                   config=run.cfg, autocast_dtype=autocast_dtype, device=run.device)
                terms = gen.loss_terms(run.reduced[rows].to(run.device), labels=run.ds.labels[rows].to(run.device),
                                       conditions=conditions_all[rows].to(run.device)
                                       if conditions_all is not None else None, ctx=ctx)
                rows_out.append(terms)
                weights.append(int(rows.numel()))
        gen.train()
    return _mean_terms(rows_out, weights) if rows_out else {}


def _final_metrics(state: TrainingState) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    last_val = next((r["val"] for r in reversed(state.history) if "val" in r), None)
    total_seconds = sum(r.get("seconds", 0.0) for r in state.history)
    samples = [r["samples_per_s"] for r in state.history if r.get("samples_per_s")]
    fitted = next((r["fit"] for r in state.history if "fit" in r), None)
    return {"epochs": state.epoch, "steps": state.step, "train": last.get("train", {}), "val": last_val,
            **({"generator_fit": fitted} if fitted else {}),
            "train_seconds": total_seconds, "samples_per_s": sum(samples) / len(samples) if samples else None,
            "upsampler": state.upsampler_metrics}
