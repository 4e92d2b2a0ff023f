"""The one training pipeline: stages whose site releases merge, over one in-memory site or many.

:func:`run_pipeline` is the side that merges. It talks to the sites only through a :class:`Transport`
(``exchange(stage, requests) -> replies``): :class:`LocalTransport` calls :func:`~.site.handle` of sites in
this process (``train`` is the pipeline over one of them); the Flower app (:mod:`feda2v_toolkit.federated`)
moves the same requests as Flower messages (``federate``). The stages, in order:

1. ``describe``: class names and counts, sequence shape (:class:`~.stages.ClassesStage`);
2. the reducer: fitted from merged statistics (``pca``), fitted at the one site (a fitted reducer without
   statistics), or nothing to fit (``adaptive_avg``);
3. ``reduce``: every site reduces each of its sequences once and releases its normalisation sums;
4. the upsampler: merged statistics (``lstsq``) or rounds of local fits (``learned``), then its held-out
   reconstruction error next to linear interpolation;
5. the generators: closed-form types from merged statistics in one exchange (``gaussian``), trained types
   in rounds of local epochs merged per generator among the sites holding its classes, with a checkpoint
   after every round;
6. the model file, written atomically once everything is done.

Same seed, data and config -> the same model file, byte for byte, on any engine: every random stream is
derived from the run seed and what it serves (:mod:`feda2v_toolkit.runtime.seeds`), optimiser state travels
with the weights, and merging one site's part returns it unchanged. ``resume=True`` continues from the last
checkpoint to exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.errors import InputError, UsageError, short_list
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.privacy.spec import dp_requested
from feda2v_toolkit.runtime.atomic import check_inputs, check_output, check_output_path, check_writable
from feda2v_toolkit.runtime.launch import rank_device
from feda2v_toolkit.runtime.malloc import release_freed_memory
from feda2v_toolkit.runtime.progress import Progress
from feda2v_toolkit.runtime.ranks import Ranks, agree, init_from_environment
from feda2v_toolkit.runtime.seeds import SEED_SCHEME, derive_seed
from feda2v_toolkit.training.checkpoint import (
    TrainingState,
    checkpoint_epoch,
    load_checkpoint,
    save_checkpoint,
)
from feda2v_toolkit.training.loop import check_finite, mean_terms
from feda2v_toolkit.training.site import (
    Arrays,
    Meta,
    Site,
    handle,
    merge_epoch_records,
    pack,
    refuse_multi_site,
    unpack,
)
from feda2v_toolkit.training.spec import RunSpec, Schedule
from feda2v_toolkit.training.stages import (
    ClassesStage,
    DataSummary,
    FittedStatisticsStage,
    GeneratorStatisticsStage,
    NormalizationStage,
    WeightsPart,
    WeightsStage,
    average_state,
    has_statistics,
    sum_parts,
)
from feda2v_toolkit.training.streams import reconstruction_metrics

Requests = Mapping[int, tuple[Arrays, Meta]]
Replies = dict[int, tuple[Arrays, Meta]]


class SiteError(InputError):
    """A site failed, did not answer in time, or disagrees with the others."""


class Transport(Protocol):
    """How the pipeline reaches its sites: their ids, and one exchange of requests and replies per stage."""

    def sites(self) -> list[int]: ...

    def exchange(self, stage: str, requests: Requests) -> Replies: ...


class LocalTransport:
    """Sites in this process, answered by direct calls (no copies, no serialisation)."""

    streams_steps = True

    def __init__(self, sites: list[Site]) -> None:
        self._sites = {i: s for i, s in enumerate(sites)}

    def sites(self) -> list[int]:
        return list(self._sites)

    def set_progress(self, on_step: Callable[[int], None] | None) -> None:
        for site in self._sites.values():
            site.on_step = on_step

    def exchange(self, stage: str, requests: Requests) -> Replies:
        return {i: handle(self._sites[i], stage, arrays, meta) for i, (arrays, meta) in requests.items()}


class WeightsMerger(Protocol):
    """How a round's weights merge (default: :class:`~.stages.WeightsStage`); node-level DP replaces it."""

    sends_optimizers: bool

    def round_meta(self) -> Meta: ...

    def merge(self, base: Mapping[str, Mapping[str, Tensor]], parts: list[WeightsPart], names: list[str]) -> WeightsPart: ...

    def report(self) -> dict[str, Any]: ...


class PlainAveraging:
    """Example-weighted averaging among the holders of each generator; optimiser state averaged alike."""

    sends_optimizers = True

    def round_meta(self) -> Meta:
        return {}

    def merge(self, base: Mapping[str, Mapping[str, Tensor]], parts: list[WeightsPart], names: list[str]) -> WeightsPart:
        return WeightsStage().merge(parts)

    def report(self) -> dict[str, Any]:
        return {}


@dataclass
class RunReport:
    """What a run did besides the model: per-stage traffic and time, per-round records (not in the model file)."""

    engine: str
    sites: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    truncated: dict[str, dict[str, Any]] = field(default_factory=dict)  # closed-form factors cut at the rank

    def add(self, stage: str, sent: int, received: int, seconds: float) -> None:
        s = self.stages.setdefault(stage, {"sent": 0, "received": 0, "seconds": 0.0, "exchanges": 0})
        s["sent"] += sent
        s["received"] += received
        s["seconds"] += seconds
        s["exchanges"] += 1

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "sites": self.sites, "stages": self.stages, "rounds": self.rounds,
                "truncated": self.truncated}


def nbytes(arrays: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in arrays.values())


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a usage error. Under torchrun, one GPU
    per rank or the CPU for every rank (:func:`feda2v_toolkit.runtime.launch.rank_device`)."""
    return torch.device(rank_device(str(device)))


# -- checkpoints and resume ----------------------------------------------------------------------------

_DEFAULT_CHECKPOINT_DIR = "checkpoints"
#: config keys a resumed run may change (where checkpoints go, what is generated afterwards, ...)
_RESUME_IGNORED = frozenset({
    "generator_checkpoint_dir", "generator_checkpoint_base_name", "generator_save_checkpoint",
    "generator_load_checkpoint", "generator_checkpoint_frequency", "synthetic_samples_per_class",
    "generator_output_sequence_length", "pretrained_generator_path", "generator_seed", "generator_training_epochs",
    "federated_rounds", "federated_round_timeout"})
_FINGERPRINT_WORDS = {"config": "config", "data": "dataset", "seed": "seed", "epochs": "epoch count"}


def default_checkpoint_dir(out: str | os.PathLike[str]) -> Path:
    """Where a run writing model ``out`` keeps its checkpoints when no directory is configured:
    ``<out without suffix>.checkpoints`` beside it (each model its own, so runs never collide)."""
    o = Path(out)
    return o.with_name(f"{o.stem}.checkpoints")


def checkpoint_path(spec: RunSpec, checkpoint_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where training checkpoints of this run go."""
    return Path(checkpoint_dir or spec.checkpoint_dir) / f"{spec.checkpoint_base_name}.checkpoint.safetensors"


def _config_hash(cfg: Mapping[str, Any]) -> str:
    relevant = {k: v for k, v in sorted(cfg.items()) if k not in _RESUME_IGNORED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config_changes(saved: Any, cfg: Mapping[str, Any]) -> str:
    """``key old -> new`` for the training-relevant keys that differ from a checkpoint's config."""
    if not isinstance(saved, dict):
        return ""
    keys = sorted(k for k in set(saved) | set(cfg) if k not in _RESUME_IGNORED and saved.get(k) != cfg.get(k))
    return short_list((f"{k} {json.dumps(saved.get(k), default=str)} -> {json.dumps(cfg.get(k), default=str)}"
                       for k in keys), 3, sep="; ")


def _refuse_resume(ckpt_path: Path, differ: list[str], changes: str = "") -> UsageError:
    detail = f" ({changes})" if changes else ""
    return UsageError(f"{ckpt_path}: checkpoint was made with another {' and '.join(differ)}{detail} "
                      f"(cannot resume it exactly); remove it, or set another generator_checkpoint_dir")


# -- the pipeline ------------------------------------------------------------------------------------------

@dataclass
class _Run:
    spec: RunSpec
    transport: Transport
    sites: list[int]
    say: Callable[[str], None]
    report: RunReport
    names: dict[int, str] = field(default_factory=dict)
    described: dict[int, Meta] = field(default_factory=dict)
    ordered: bool = False  # sites are in their final order (by name) once described

    def ask(self, stage: str, requests: Requests) -> Replies:
        t0 = time.perf_counter()
        full = {n: (a, {"config": self.spec.config, "site": self.sites.index(n) if self.ordered else -1, **m})
                for n, (a, m) in requests.items()}
        replies = self.transport.exchange(stage, full)
        missing = [n for n in requests if n not in replies]
        if missing:
            raise SiteError(f"no reply from {', '.join(self.names.get(n, f'site {n}') for n in missing)} "
                            f"in stage {stage!r}")
        self.report.add(stage, sum(nbytes(a) for a, _ in requests.values()),
                        sum(nbytes(a) for a, _ in replies.values()), time.perf_counter() - t0)
        return replies

    def everyone(self, arrays: Arrays | None = None, meta: Meta | None = None) -> dict[int, tuple[Arrays, Meta]]:
        return {n: (arrays or {}, meta or {}) for n in self.sites}

    def parts(self, replies: Replies) -> list[Arrays]:
        return [replies[n][0] for n in self.sites]


def run_pipeline(spec: RunSpec, transport: Transport, *, schedule: Schedule, engine: str = "local",
                 out: str | os.PathLike[str] | None = None, checkpoint: Path | None = None, resume: bool = False,
                 metrics_path: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = None, merger: WeightsMerger | None = None,
                 keep_checkpoints: bool = False) -> GenerativeModel:
    """Train one model over ``transport``'s sites (module docstring); write it to ``out`` if given.

    ``checkpoint``: the checkpoint file (written after every round when ``spec.save_checkpoints``, read when
    ``resume``; removed once the model file is written, unless ``keep_checkpoints``). ``merger`` replaces the plain averaging of trained weights (node-level DP). Returns the
    :class:`GenerativeModel`; ``model.metrics["run"]`` holds the :class:`RunReport` (not written to the file).
    """
    from feda2v_toolkit.runtime.threads import settle_vector_math

    settle_vector_math()  # the same bytes on every run (runtime.threads)
    from feda2v_toolkit.plugins import get_registry

    say = log or (lambda _m: None)
    merger = merger or PlainAveraging()
    settings = None
    if dp_requested(spec.config):  # record-level DP (training.private); bad settings are refused before any work
        from feda2v_toolkit.training.private import settings_of

        settings = settings_of(spec)
    private = settings is not None
    if private and checkpoint is not None and (resume or spec.load_checkpoint) and checkpoint.exists():
        from feda2v_toolkit.training.private import refuse_resume

        raise refuse_resume()
    sites = sorted(transport.sites())
    if not sites:
        raise SiteError("no sites to train on")
    run = _Run(spec, transport, sites, say, RunReport(engine))

    # -- classes and shapes ----------------------------------------------------------------------
    described = run.ask("describe", run.everyone())
    run.names = {n: str(described[n][1]["name"]) for n in sites}
    sites = run.sites = sorted(sites, key=lambda n: (run.names[n], n))  # positions do not depend on engine ids
    run.ordered = True
    run.described = {n: described[n][1] for n in sites}
    summaries = [DataSummary.from_json(described[n][1]["summary"]) for n in sites]
    try:
        summary = ClassesStage().merge(summaries, [run.names[n] for n in sites])
    except ValueError as e:
        raise SiteError(str(e)) from None
    length = spec.training_length
    where = run.names[sites[0]] if len(sites) == 1 else "the sites"
    if summary.seq_len < length:
        raise InputError(f"{where}: sequences have {summary.seq_len} tokens, fewer than "
                         f"generator_training_sequence_length = {length}")
    class_names = summary.class_names
    empty = [c for c, k in summary.class_counts.items() if k == 0]
    if empty and not private:
        raise InputError(f"{where}: class(es) {short_list(map(repr, empty))} have no samples"
                         + (" on any site" if len(sites) > 1 else "") + "; train on the others with "
                         "generator_classes (--classes) or add samples")
    dtypes = {str(described[n][1].get("dtype")) for n in sites}
    data_dtype = dtypes.pop() if len(dtypes) == 1 else None  # what generate writes by default
    site_word = f"{len(sites)} sites ({', '.join(run.names[n] for n in sites)}): " if len(sites) > 1 else ""
    dp = None
    if private:
        dp = _private_pipeline(run, spec, settings, summary, class_names, schedule)
        counts = dp.counts_step()
        summary.class_counts = {c: int(counts.kept[i]) for i, c in enumerate(class_names)}
        say(f"privacy: record-level DP, target epsilon {settings.epsilon:g} at delta {settings.delta:g} "
            f"({dp.plan.plan.accountant.upper()} accountant); every release below is clipped and noised at "
            f"{'each site' if len(sites) > 1 else 'the site'}; noisy class counts: {counts.kept.sum():.0f} clips")
    say(f"data: {site_word}{'~' if private else ''}{sum(summary.class_counts.values())} sequences "
        f"[{summary.seq_len}, {summary.dim}]" + (f" {data_dtype}" if data_dtype else "") + f", {len(class_names)} classes")

    loaded = None
    if checkpoint is not None and (resume or spec.load_checkpoint):
        if checkpoint.exists():
            loaded = load_checkpoint(checkpoint)
            _check_resumable_early(checkpoint, loaded, spec, summaries, schedule)
        else:
            say(f"no checkpoint at {checkpoint}; starting from scratch")
    registry = get_registry()
    trained = not getattr(registry.load("generator", spec.generator_type), "fitted", False)
    if checkpoint is not None and spec.save_checkpoints and trained:
        say(f"checkpoints: {checkpoint.parent}/ (--checkpoint-dir to change; removed when the model is written"
            f"{'' if keep_checkpoints else ', --keep-checkpoints keeps them'})")

    # -- reducer ------------------------------------------------------------------------------------
    reducer = registry.load("reducer", spec.reducer).from_config(spec.config, length=length,
                                                                 full_length=summary.seq_len, dim=summary.dim)
    if loaded is not None:
        try:
            reducer.load_state_dict(unpack("reducer.", loaded.tensors))
        except RuntimeError:
            raise _refuse_resume(checkpoint, ["reducer state"]) from None  # type: ignore[arg-type]
    elif type(reducer).fitted:
        say(f"fitting reducer {spec.reducer} on the training sequences")
        if dp is not None:
            dp.fit_reducer(reducer)
        elif has_statistics(reducer):
            stage = FittedStatisticsStage()
            stage.finish(reducer, stage.merge(run.parts(run.ask("reducer", run.everyone()))))
        else:
            refuse_multi_site(f"reducer {spec.reducer!r}", len(sites))
            reducer.load_state_dict(unpack("reducer.", run.ask("reducer_fit", run.everyone())[sites[0]][0]))
    reducer.eval()

    # -- reduce once; normalisation ---------------------------------------------------------------
    t0 = time.perf_counter()
    replies = run.ask("reduce", run.everyone(pack("reducer.", reducer.state_dict()), {"class_names": class_names}))
    for n in sites:
        run.described[n].update({k: replies[n][1][k] for k in ("train", "heldout", "train_counts")})
    train_count = sum(int(run.described[n]["train"]) for n in sites)
    heldout_count = sum(int(run.described[n]["heldout"]) for n in sites)
    if dp is not None:
        train_count, heldout_count = round(dp.records), 0
        say(f"reduced the sequences to {length} tokens in "
            f"{time.perf_counter() - t0:.1f}s")
    else:
        say(f"{train_count} train / {heldout_count} held out; reduced {sum(summary.class_counts.values())} sequences "
            f"to {length} tokens in {time.perf_counter() - t0:.1f}s")
    fingerprint = {"config": _config_hash(spec.config), "seed": spec.seed, "epochs": schedule.epochs,
                   "data": ";".join(f"{_shape(summaries[i])}:{replies[n][1]['fingerprint']}" for i, n in enumerate(sites))}
    state = TrainingState(epoch=0, step=0, fingerprint=fingerprint)
    if loaded is not None:
        differ = [_FINGERPRINT_WORDS[k] for k in fingerprint if loaded.state.fingerprint.get(k) != fingerprint[k]]
        if differ:
            raise _refuse_resume(checkpoint, differ)  # type: ignore[arg-type]
        state = loaded.state
        say(f"resuming from {checkpoint} after epoch {state.epoch}")
    normalization: dict[str, Tensor] = {}
    if spec.normalize and dp is not None:
        normalization = dp.normalization(reducer)
    elif spec.normalize:
        stage_n = NormalizationStage()
        normalization = stage_n.finish(stage_n.merge(run.parts(replies)))

    # -- upsampler ----------------------------------------------------------------------------------
    upsampler = registry.load("upsampler", spec.upsampler).from_config(
        spec.config, reduced_length=length, full_length=summary.seq_len, dim=summary.dim)
    if loaded is not None and state.upsampler_metrics is not None:
        upsampler.load_state_dict(unpack("upsampler.", loaded.tensors))
    else:
        state.upsampler_metrics = _fit_upsampler(run, upsampler, summary, heldout_count, dp, reducer)
    upsampler.eval()
    release_freed_memory()  # the passes over full-length sequences are done: what they freed goes back
    norm_arrays = pack("norm.", normalization)

    # -- generators ---------------------------------------------------------------------------------
    groups = spec.generator_groups(class_names, class_names)
    keys = list(groups)
    gen_cls = registry.load("generator", spec.generator_type)
    _require_training_memory(gen_cls, spec, summary, len(groups))
    held = {n: {c for c, k in summaries[i].class_counts.items() if k > 0} for i, n in enumerate(sites)}
    holders = {n: [k for k in keys if set(groups[k]) & held[n]] for n in sites}
    if dp is not None:  # which site holds which class is not released: every site answers for every key
        holders = {n: list(keys) for n in sites}
    generators: dict[str, Any] = {}
    for key in keys:
        torch.manual_seed(derive_seed(spec.seed, "init", key))
        generators[key] = gen_cls.from_config(spec.config, seq_len=length, dim=summary.dim,
                                              num_classes=len(class_names), condition_dim=summary.condition_dim)
    fitted = bool(getattr(gen_cls, "fitted", False))
    common = {"keys": keys, "groups": groups, "class_names": class_names}
    generator_fit: dict[str, dict[str, float]] = {}
    if fitted and dp is not None:
        t0 = time.perf_counter()
        generator_fit = dp.fit_gaussians(generators, normalization, reducer)
        say(f"fitted {len(generator_fit)} {'generator' if len(generator_fit) == 1 else 'generators'} from noisy "
            f"statistics in {time.perf_counter() - t0:.2f}s")
        state.history = [{"epoch": 1, "epochs": 1, "step": 0, "train": {}, "fit": generator_fit}]
        state.epoch = 1
    elif fitted:
        generator_fit = _fit_generators(run, generators, gen_cls, holders, common, norm_arrays)
        state.history = [_heldout_record(run, generators, common, norm_arrays, heldout_count, generator_fit)]
        state.epoch = 1
    else:
        _train_rounds(run, generators, holders, common, norm_arrays, schedule, state, loaded, merger,
                      checkpoint, metrics_path, progress, summary, class_names, reducer, upsampler, normalization)

    # -- the model ----------------------------------------------------------------------------------
    if dp is not None:  # classes dropped by the noisy counts cannot be sampled: no generator answers for them
        groups = {k: [c for c in members if summary.class_counts.get(c, 0) > 0] for k, members in groups.items()}
    model = _assemble(spec, summary, class_names, groups, generators, reducer, upsampler, normalization, data_dtype)
    site_docs = [{"name": run.names[n], "classes": {c: k for c, k in summaries[i].class_counts.items() if k > 0},
                  "generators": holders[n]} for i, n in enumerate(sites)]
    if dp is not None:  # per-site counts are not released
        site_docs = [{"name": run.names[n], "classes": {}, "generators": holders[n]} for n in sites]
    run.report.sites = site_docs
    privacy = merger.report()
    if privacy:  # node-level DP protects a site's weight updates, not a clip: not a record-level guarantee
        privacy = {"mechanism": None, "node_level": privacy}
    if dp is not None:
        privacy = {**dp.summary(), **({"node_level": privacy["node_level"]} if privacy else {})}
        say(f"privacy: spent epsilon {format(privacy['epsilon'], '.4g') if privacy['epsilon'] is not None else 'inf'} at delta "
            f"{privacy['delta']:g} (target {settings.epsilon:g}; largest over {len(sites)} site(s))")
    model.metrics = _final_metrics(state, generator_fit, site_docs, privacy, run.report)
    if fitted and metrics_path is not None:
        _write_metrics_lines(metrics_path, state.history, 0)
    if out is not None:
        from feda2v_toolkit.model.file import save_model

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_model(model.to("cpu"), out)
        say(f"wrote {out}")
        if checkpoint is not None and not keep_checkpoints:
            _remove_checkpoint(checkpoint)
    return model


def _private_pipeline(run: _Run, spec: RunSpec, settings: Any, summary: DataSummary, class_names: list[str],
                      schedule: Schedule) -> Any:
    """The pipeline's side of record-level DP (:mod:`feda2v_toolkit.training.private`) over ``run``'s sites."""
    from feda2v_toolkit.training.private import PrivatePipeline, make_plan

    groups = spec.generator_groups(class_names, class_names)
    plan = make_plan(spec, settings, full_length=summary.seq_len, dim=summary.dim, class_names=class_names,
                     groups=groups, condition_dim=summary.condition_dim, epochs=schedule.epochs)
    plan_meta = {"class_names": class_names, "groups": groups, "epochs": schedule.epochs}

    def exchange(step: str, arrays: Arrays, meta: Meta) -> tuple[Arrays, dict[str, Any]]:
        replies = run.ask("private", run.everyone(arrays, {"step": step, "plan": plan_meta, **meta}))
        ledgers = {run.names[n]: replies[n][1]["ledger"] for n in run.sites if replies[n][1].get("ledger") is not None}
        return (sum_parts(run.parts(replies)) if step != "ledger" else {}), ledgers

    public = None
    if settings.public_data:
        from feda2v_toolkit.training.private import PublicReference

        public = PublicReference(settings.public_data, spec, summary.seq_len, summary.dim)
        run.say(f"privacy: public data {settings.public_data} ({len(public.ds)} clips) fits the reducer, the "
                "normalisation, the upsampler and the gaussian's basis (they spend nothing)")
    return PrivatePipeline(plan, exchange, len(run.sites), run.say, public)


def _remove_checkpoint(path: Path) -> None:
    """A finished run's checkpoint is not needed any more: remove it, and its directory when that is now empty."""
    import contextlib

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty: a directory holding anything else stays


def _shape(summary: DataSummary) -> str:
    return f"{sum(summary.class_counts.values())}x{summary.seq_len}x{summary.dim}"


def _check_resumable_early(ckpt_path: Path, loaded: Any, spec: RunSpec, summaries: list[DataSummary],
                           schedule: Schedule) -> None:
    """What can be compared before the data is reduced (config, data shape, seed, epochs): refuse a checkpoint
    of another run before its fitted reducer is loaded into a reducer of another shape, naming what differs."""
    saved = loaded.state.fingerprint
    differ = [_FINGERPRINT_WORDS[k] for k, now in (("config", _config_hash(spec.config)), ("seed", spec.seed),
                                                   ("epochs", schedule.epochs)) if saved.get(k) != now]
    saved_shapes = [s.split(":", 1)[0] for s in str(saved.get("data", "")).split(";")]
    now_shapes = [_shape(s) for s in summaries]
    if saved_shapes != now_shapes:
        differ.insert(1 if "config" in differ else 0, "dataset")
    if differ:
        changes = []
        if "config" in differ:
            changes.append(_config_changes(loaded.doc.get("model", {}).get("config"), spec.config))
        if "dataset" in differ:
            old = ", ".join(s.replace("x", " x ") for s in saved_shapes)
            changes.append(f"data {old} -> {', '.join(s.replace('x', ' x ') for s in now_shapes)}")
        raise _refuse_resume(ckpt_path, differ, "; ".join(c for c in changes if c))


def _fit_upsampler(run: _Run, upsampler: Any, summary: DataSummary, heldout: int, dp: Any = None,
                   reducer: Any = None) -> dict[str, Any]:
    """Fit a trainable upsampler from the sites' pairs; score it on their held-out sequences (not in a private
    run: the held-out error is a function of the clips)."""
    spec = run.spec
    metrics: dict[str, Any] = {"name": spec.upsampler}
    if type(upsampler).trainable:
        t0 = time.perf_counter()
        run.say(f"fitting upsampler {spec.upsampler} on (reduced, full) training pairs")
        if dp is not None:
            metrics["fit"] = dp.fit_upsampler(upsampler, summary.seq_len, reducer)
        elif has_statistics(upsampler):
            stage = FittedStatisticsStage()
            metrics["fit"] = stage.finish(upsampler, stage.merge(run.parts(run.ask("upsampler", run.everyone()))))
        else:
            rounds = spec.upsampler_rounds if len(run.sites) > 1 else 1
            for r in range(rounds):
                replies = run.ask("upsampler_round", run.everyone(pack("upsampler.", upsampler.state_dict()),
                                                                  {"round": r}))
                states = [unpack("upsampler.", replies[n][0]) for n in run.sites]
                weights = [int(replies[n][1]["examples"]) for n in run.sites]
                upsampler.load_state_dict(average_state(states, weights))
                fits = [replies[n][1]["metrics"] for n in run.sites]
                metrics["fit"] = fits[0] if len(fits) == 1 else {"sites": fits}
                if rounds > 1:
                    run.say(f"upsampler round {r + 1}/{rounds}: averaged {len(run.sites)} fits")
        metrics["fit_seconds"] = time.perf_counter() - t0
    if heldout and dp is None and summary.seq_len != spec.training_length:
        sums = sum_parts(run.parts(run.ask("upsampler_heldout", run.everyone(pack("upsampler.", upsampler.state_dict())))))
        metrics.update(reconstruction_metrics(sums, summary.seq_len, summary.dim))
        if "heldout_mse" in metrics:
            run.say(f"upsampler {spec.upsampler}: held-out MSE {metrics['heldout_mse']:.5g} "
                    f"(linear interpolation {metrics['heldout_mse_linear']:.5g})")
    return metrics


def _fit_generators(run: _Run, generators: dict[str, Any], gen_cls: Any, holders: Mapping[int, list[str]],
                    common: Meta, norm_arrays: Arrays) -> dict[str, dict[str, float]]:
    """Closed-form generators: an exchange of sufficient statistics, merged per key among its holders -- after one
    of the per class counts and sums when the type takes its statistics about the merged means -- or, for a
    type without mergeable statistics, a fit at the one site."""
    spec, keys = run.spec, common["keys"]
    t0 = time.perf_counter()
    probe = generators[keys[0]]
    mergeable = has_statistics(probe) and callable(getattr(gen_cls, "merge_statistics", None)) and \
        probe.conditioning != "embedding"
    fit: dict[str, dict[str, float]] = {}
    if not mergeable:
        what = (f"a {spec.generator_type} generator conditioned on condition embeddings" if
                probe.conditioning == "embedding" else f"generator type {spec.generator_type!r}")
        refuse_multi_site(what, len(run.sites))
        arrays, meta = run.ask("generator_fit", run.everyone(norm_arrays, common))[run.sites[0]]
        for i, key in enumerate(keys):
            state = unpack(f"g{i}.", arrays)
            if state:
                generators[key].load_state_dict(state)
        fit = dict(meta["fit"])
    else:
        stage = GeneratorStatisticsStage()
        requests = {n: (dict(norm_arrays), common) for n in run.sites}
        if stage.two_exchanges(probe):  # the per class counts and sums first: the statistics about their means,
            sums = run.ask("generator_means", run.everyone(norm_arrays, common))  # each key's to its holders only
            for i, key in enumerate(keys):
                parts = [p for p in (unpack(f"g{i}.", sums[n][0]) for n in run.sites if key in holders[n]) if p]
                if parts:
                    means = stage.means(parts)
                    for n in run.sites:
                        if key in holders[n]:
                            requests[n][0][f"m{i}.means"] = means
        replies = run.ask("generator_statistics", requests)
        for i, key in enumerate(keys):
            parts = [p for p in (unpack(f"g{i}.", replies[n][0]) for n in run.sites if key in holders[n]) if p]
            if not parts:
                continue
            try:
                fit[key] = stage.finish(generators[key], stage.merge(gen_cls, parts))
            except ValueError as e:
                where = run.names[run.sites[0]] if len(run.sites) == 1 else "the sites' merged statistics"
                raise SiteError(f"{where}: generator {key!r}: {e}") from None
        for n in run.sites:
            for key, info in replies[n][1].get("truncated", {}).items():
                run.report.truncated.setdefault(key, {})[run.names[n]] = info
                cut = f"{100 * info['variance_left_out']:.2g}% of the variance left out of the factors, kept in the totals"
                if "classes" in info:
                    run.say(f"{run.names[n]}: generator {key!r}: classes {', '.join(map(str, info['classes']))} have "
                            f"more sequences than the rank; kept their top directions ({cut})")
                else:
                    run.say(f"{run.names[n]}: generator {key!r}: its within-class scatter has more directions than "
                            f"the rank; kept the top {info['directions']} ({cut})")
    for key, f in fit.items():
        check_finite(f, f"fitting generator {key!r}", "the closed-form fit has no learning rate: the data's "
                     "statistics are degenerate (check the clips for extreme values, or set gaussian_shrinkage)")
        run.say(f"fitted generator {key!r} on {int(f.get('sequences', 0))} sequences")
    how = ""
    if len(run.sites) > 1:
        how = f" from {len(run.sites)} sites' merged statistics" + ("" if run.report.truncated else " (exact)")
    run.say(f"fitted {len(fit)} {'generator' if len(fit) == 1 else 'generators'} in closed form{how} "
            f"in {time.perf_counter() - t0:.2f}s")
    return fit


def _heldout_record(run: _Run, generators: dict[str, Any], common: Meta, norm_arrays: Arrays, heldout: int,
                    fit: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The metrics record of a closed-form fit: its fit numbers and the held-out loss of the fitted generators."""
    record: dict[str, Any] = {"epoch": 1, "epochs": 1, "step": 0, "train": {}, "fit": fit}
    if heldout:
        arrays = dict(norm_arrays)
        for i, key in enumerate(common["keys"]):
            arrays.update(pack(f"g{i}.", generators[key].state_dict()))
        replies = run.ask("generator_heldout", run.everyone(arrays, common))
        scored = [(replies[n][1]["val"], int(replies[n][1]["count"])) for n in run.sites if replies[n][1]["count"]]
        if scored:
            record["val"] = mean_terms([v for v, _ in scored], [c for _, c in scored])
    return record


def _train_rounds(run: _Run, generators: dict[str, Any], holders: Mapping[int, list[str]], common: Meta,
                  norm_arrays: Arrays, schedule: Schedule, state: TrainingState, loaded: Any, merger: WeightsMerger,
                  checkpoint: Path | None, metrics_path: Any, progress: bool | None, summary: DataSummary,
                  class_names: list[str], reducer: Any, upsampler: Any, normalization: dict[str, Tensor]) -> None:
    """Rounds of local epochs, merged per generator among its holders, checkpointed after each round."""
    spec, keys = run.spec, common["keys"]
    states = {key: {k: v.detach().clone() for k, v in gen.state_dict().items()} for key, gen in generators.items()}
    optim: dict[str, tuple[Arrays, Meta]] = {}
    if loaded is not None and state.round:
        for i, key in enumerate(keys):
            saved = unpack(f"generators.{i}.", loaded.tensors)
            if saved:
                states[key] = saved
            opt = loaded.optimizer_state(i)
            if opt is not None:
                optim[key] = opt
    rounds = schedule.rounds
    if loaded is not None and state.round and callable(getattr(merger, "resumed", None)):
        merger.resumed(state.round)  # type: ignore[attr-defined]  # e.g. node-level DP: earlier rounds stay spent
    steps_per_epoch = _steps_per_epoch(run, holders, common)
    bar = Progress(schedule.epochs * steps_per_epoch, state.epoch * steps_per_epoch, progress)
    streamed = bool(getattr(run.transport, "streams_steps", False))
    if streamed:
        run.transport.set_progress(bar.update)  # type: ignore[attr-defined]
    metrics_file = _open_metrics(metrics_path, state.epoch) if metrics_path else nullcontext()
    model_for_checkpoint = None
    try:
        with metrics_file as mf:
            for r in range(state.round, rounds):
                epochs = list(schedule.round_epochs(r))
                if not epochs:
                    continue
                t0 = time.perf_counter()
                requests = {}
                for n in run.sites:
                    arrays = dict(norm_arrays)
                    docs: Meta = {}
                    for i, key in enumerate(keys):
                        if key in holders[n]:
                            arrays.update(pack(f"g{i}.", states[key]))
                            if merger.sends_optimizers and key in optim:
                                arrays.update(pack(f"o{i}.", optim[key][0]))
                                docs[key] = optim[key][1]
                    requests[n] = (arrays, {**common, "epochs": epochs, "total_epochs": schedule.epochs,
                                            "optimizers": docs, "return_optimizers": merger.sends_optimizers,
                                            **merger.round_meta()})
                replies = run.ask("generator_round", requests)
                parts, records, opt_docs = [], [], {}
                for n in run.sites:
                    arrays, meta = replies[n]
                    examples = {k: int(v) for k, v in meta["examples"].items()}
                    weights = {key: unpack(f"g{i}.", arrays) for i, key in enumerate(keys) if key in examples}
                    opts = {key: unpack(f"o{i}.", arrays) for i, key in enumerate(keys)
                            if key in examples and merger.sends_optimizers}
                    parts.append(WeightsPart(weights, examples, {}, opts))
                    records.append(meta["records"])
                    for key, d in meta.get("optimizers", {}).items():
                        opt_docs.setdefault(key, d)
                merged = merger.merge(states, parts, [run.names[n] for n in run.sites])
                for key, w in merged.weights.items():
                    states[key] = w
                    if key in merged.optimizers and key in opt_docs:
                        optim[key] = (merged.optimizers[key], opt_docs[key])
                seconds = time.perf_counter() - t0
                for e in epochs:
                    same = [rec for site_records in records for rec in site_records if rec["epoch"] == e + 1]
                    if not same:
                        continue
                    epoch_record = merge_epoch_records(same)
                    state.step += epoch_record["steps"]
                    record = {"epoch": e + 1, "epochs": schedule.epochs, "step": state.step,
                              "train": epoch_record["train"],
                              "samples_per_s": epoch_record["examples"] / seconds * len(epochs) if seconds > 0 else None,
                              "seconds": seconds / len(epochs)}
                    if len(run.sites) > 1 or rounds > 1 and run.report.engine != "local":
                        record["round"] = r + 1
                    if "val" in epoch_record:
                        record["val"] = epoch_record["val"]
                    state.history.append(record)
                    if mf is not None:
                        mf.write(json.dumps(record) + "\n")
                        mf.flush()
                    if not streamed:
                        bar.update(epoch_record["steps"])
                    bar.postfix(epoch=f"{e + 1}/{schedule.epochs}", **record["train"],
                                **({"val_loss": record["val"]["loss"]} if "val" in record else {}))
                state.epoch, state.round = epochs[-1] + 1, r + 1
                last = state.history[-1] if state.history else {}
                run.report.rounds.append({"round": r + 1, "rounds": rounds, "epochs": [epochs[0] + 1, epochs[-1] + 1],
                                          "train": last.get("train", {}), "val": last.get("val"), "seconds": seconds,
                                          "bytes": run.report.stages.get("generator_round", {}).get("sent", 0)})
                if len(run.sites) > 1 or run.report.engine != "local":
                    loss = last.get("train", {}).get("loss", float("nan"))
                    val = (last.get("val") or {}).get("loss")
                    run.say(f"round {r + 1}/{rounds}: {len(run.sites)} site{'s' if len(run.sites) > 1 else ''}, "
                            f"loss {loss:.5g}" + (f", held-out loss {val:.5g}" if val is not None else "")
                            + f", {seconds:.1f}s")
                if checkpoint is not None and spec.save_checkpoints:
                    for key, w in states.items():
                        generators[key].load_state_dict(w)
                    if model_for_checkpoint is None:
                        model_for_checkpoint = _assemble(spec, summary, class_names, common["groups"], generators,
                                                         reducer, upsampler, normalization, None)
                    save_checkpoint(checkpoint, model_for_checkpoint, optim, state)
    except KeyboardInterrupt:
        if checkpoint is not None and spec.save_checkpoints and checkpoint.exists():
            run.say(f"interrupted; the last checkpoint ({checkpoint}, epoch {checkpoint_epoch(checkpoint)}) "
                    f"is intact: run the same command with --resume to continue")
        else:
            run.say("interrupted before the first checkpoint; nothing to resume")
        raise
    finally:
        bar.close()
        if streamed:
            run.transport.set_progress(None)  # type: ignore[attr-defined]
    for key, w in states.items():
        generators[key].load_state_dict(w)


def _steps_per_epoch(run: _Run, holders: Mapping[int, list[str]], common: Meta) -> int:
    """Optimisation steps of one epoch over every site and generator (for the progress bar)."""
    total = 0
    for n in run.sites:
        counts = run.described[n]["train_counts"]
        for key in holders[n]:
            rows = sum(int(counts.get(c, 0)) for c in common["groups"][key])
            total += math.ceil(rows / run.spec.batch_size) if rows else 0
    return total


def _assemble(spec: RunSpec, summary: DataSummary, class_names: list[str], groups: Mapping[str, list[str]],
              generators: dict[str, Any], reducer: Any, upsampler: Any, normalization: dict[str, Tensor],
              data_dtype: str | None) -> GenerativeModel:
    """The one place a trained :class:`GenerativeModel` is built from the pipeline's parts."""
    return GenerativeModel(
        generator_type=spec.generator_type, generators=generators, granularity=spec.granularity,
        class_names=list(class_names), class_to_generator={c: key for key, members in groups.items() for c in members},
        reducer=reducer, reducer_name=spec.reducer, upsampler=upsampler, upsampler_name=spec.upsampler,
        full_length=summary.seq_len, training_length=spec.training_length, output_length=spec.output_length,
        dim=summary.dim, normalization=normalization, condition_dim=summary.condition_dim,
        class_counts=dict(summary.class_counts), config=spec.config, seed=spec.seed, data_dtype=data_dtype,
        seed_scheme=SEED_SCHEME)


def _final_metrics(state: TrainingState, generator_fit: dict[str, Any], sites: list[dict[str, Any]],
                   privacy: dict[str, Any], report: RunReport) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    last_val = next((r["val"] for r in reversed(state.history) if "val" in r), None)
    samples = [r["samples_per_s"] for r in state.history if r.get("samples_per_s")]
    return {"epochs": state.epoch, "steps": state.step, "train": last.get("train", {}), "val": last_val,
            **({"generator_fit": generator_fit} if generator_fit else {}),
            "train_seconds": sum(r.get("seconds", 0.0) for r in state.history),
            "samples_per_s": sum(samples) / len(samples) if samples else None,
            "upsampler": state.upsampler_metrics, "sites": sites,
            "privacy": privacy or {"mechanism": None},
            "run": report.to_json()}


def _require_training_memory(gen_cls: type, spec: RunSpec, summary: DataSummary, count: int) -> None:
    """Refuse generators that cannot fit (e.g. ``--hidden-dim 1000000000``) before building them: count
    their parameters on the meta device; weights, gradients and two Adam moments take 4 floats each."""
    try:
        with torch.device("meta"):
            probe = gen_cls.from_config(spec.config, seq_len=spec.training_length, dim=summary.dim,
                                        num_classes=len(summary.class_counts), condition_dim=summary.condition_dim)
        params = sum(p.numel() for p in probe.parameters())
    except Exception as exc:  # a generator that cannot be built on meta: no estimate, unless its sizes overflow
        if isinstance(exc, OverflowError) or "overflow" in str(exc).lower():  # the real build would fail or worse
            raise InputError(f"training {count} {spec.generator_type} generator(s): their sizes overflow 64-bit "
                             "integers (far more memory than any machine has); lower generator_hidden_dim / "
                             "--hidden-dim (see feda2v-tk plan)") from None
        return
    from feda2v_toolkit.runtime.resources import require_memory

    require_memory(params * 4 * 4 * count, f"training {count} {spec.generator_type} generator(s) of "
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


def _write_metrics_lines(path: str | os.PathLike[str], records: list[dict[str, Any]], done: int) -> None:
    with _open_metrics(path, done) as mf:
        for record in records:
            mf.write(json.dumps(record, default=float) + "\n")


# -- train: the pipeline over one site in this process ----------------------------------------------------

def train(config: Any, data: str | os.PathLike[str] | Dataset, *, out: str | os.PathLike[str] | None = None,
          overrides: Mapping[str, Any] | None = None, seed: int | None = None, device: str | torch.device = "cpu",
          resume: bool = False, checkpoint_dir: str | os.PathLike[str] | None = None,
          metrics_path: str | os.PathLike[str] | None = None, progress: bool | None = None,
          log: Callable[[str], None] | None = None, overwrite: bool = False,
          keep_checkpoints: bool = False, ranks: Ranks | None = None) -> GenerativeModel:
    """Train a generator model on ``data`` as ``config`` says; write it to ``out`` if given.

    The pipeline (module docstring) over one site holding all of ``data``. Under ``torchrun`` (``WORLD_SIZE`` >
    1, or given ``ranks``) every rank runs this same call and shares the site's blocks out
    (:mod:`feda2v_toolkit.runtime.ranks`): rank 0 writes ``out``, the metrics and checkpoints; the other ranks
    write nothing.

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
        metrics_path: one JSON line of metrics per epoch here.
        progress: show a progress bar (default: only when stderr is a terminal).
        log: called with one-line status messages (default: silent).
        keep_checkpoints: keep the last checkpoint after the model file is written (default: removed).
        overwrite: replace an existing ``out`` (and ``metrics_path``); without it they are refused, before any
            work, as every command refuses an existing output (:func:`~feda2v_toolkit.runtime.atomic.check_output`).
    """
    say = log or (lambda _msg: None)
    dev = resolve_device(device)
    data_paths = [] if isinstance(data, Dataset) else [data]
    if ranks is None:
        ranks = init_from_environment(dev)
    if ranks.distributed and not ranks.agreed:
        ranks.agreed = True
        return _train_ranks(ranks, config, data, out=out, overrides=overrides, seed=seed, device=dev, resume=resume,
                            checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, progress=progress, log=say,
                            overwrite=overwrite, keep_checkpoints=keep_checkpoints)

    def checkpoint_seed() -> int | None:  # a run that drew its seed resumes with it
        spec0 = RunSpec.resolve(config, overrides=overrides, seed=0)
        path = checkpoint_path(spec0, _checkpoint_dir(spec0, out, checkpoint_dir))
        if (resume or spec0.load_checkpoint) and path.exists():
            return load_checkpoint(path).state.fingerprint.get("seed")
        return None

    spec = RunSpec.resolve(config, overrides=overrides, seed=seed, fallback_seed=checkpoint_seed)
    ckpt = checkpoint_path(spec, _checkpoint_dir(spec, out, checkpoint_dir))
    check_outputs(out, metrics_path, ckpt if spec.save_checkpoints else None, inputs=data_paths,
                  overwrite=overwrite, resume=resume, config=config)
    site = Site(data, spec, 0, device=dev, ranks=ranks)
    if spec.seed_drawn:
        say(f"seed: {spec.seed} (drawn at random; " + ("the DP noise is secret: no seed reproduces a private run)"
                                                        if spec.config.get("generator_dp_epsilon") is not None
                                                        else "pass --seed to reproduce)"))
    try:
        return run_pipeline(spec, LocalTransport([site]), schedule=spec.single_site_schedule(), engine="local",
                            out=out, checkpoint=ckpt, resume=resume, metrics_path=metrics_path, progress=progress,
                            log=say, keep_checkpoints=keep_checkpoints)
    finally:
        site.close()


def _train_ranks(ranks: Ranks, config: Any, data: Any, *, out: Any, overrides: Any, seed: int | None, device: Any,
                 resume: bool, checkpoint_dir: Any, metrics_path: Any, progress: bool | None,
                 log: Callable[[str], None], overwrite: bool, keep_checkpoints: bool) -> GenerativeModel:
    """:func:`train` on one rank of several: the ranks agree on the seed, rank 0 checks and writes the outputs,
    the others write into a temporary directory that is removed after. A resumed run starts every rank from
    rank 0's checkpoint (each rank reads it; the others copy it into their temporary directory)."""
    import shutil
    import tempfile

    spec = RunSpec.resolve(config, overrides=overrides, seed=seed)
    resuming = resume or spec.load_checkpoint
    if dp_requested(spec.config):
        _check_private_ranks(spec)
    ckpt = checkpoint_path(spec, _checkpoint_dir(spec, out, checkpoint_dir))

    def look() -> str:  # what this rank sees of the checkpoint to resume: its digest, or "" (none)
        if not (resuming and ckpt.exists()):
            return ""
        with open(ckpt, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    def check() -> str:  # rank 0's outputs; a problem stops every rank (none waits for a skipped collective)
        check_outputs(out, metrics_path, ckpt if spec.save_checkpoints else None,
                      inputs=[] if isinstance(data, Dataset) else [data], overwrite=overwrite, resume=resuming,
                      config=config)
        return look()

    digest = agree(ranks, check if ranks.rank == 0 else look)
    seen = ranks.all_strings(digest or "")
    if seen[0] and any(d != seen[0] for d in seen):  # every rank must start from the same checkpoint
        blind = [r for r, d in enumerate(seen) if d != seen[0]]
        raise InputError(f"{ckpt}: rank {blind[0]} does not see rank 0's checkpoint (resume needs the checkpoint "
                         "directory on storage every node shares: --checkpoint-dir)")
    if seen[0] and seed is None and spec.seed_drawn:  # a run that drew its seed resumes with it
        seed = load_checkpoint(ckpt).state.fingerprint.get("seed")
        spec = RunSpec.resolve(config, overrides=overrides, seed=seed)
    agreed = int(ranks.all_strings(str(spec.seed))[0])  # a drawn seed is rank 0's
    tmp = None if ranks.rank == 0 else Path(tempfile.mkdtemp(prefix=f"feda2v-rank{ranks.rank}-"))

    def take_checkpoint() -> None:  # the other ranks resume from their own copy of rank 0's checkpoint
        if tmp is None or not seen[0]:
            return
        own = checkpoint_path(spec, tmp / "checkpoints")
        own.parent.mkdir()
        shutil.copyfile(ckpt, own)
        with open(own, "rb") as fh:
            if hashlib.file_digest(fh, "sha256").hexdigest() != seen[0]:
                raise InputError(f"{ckpt}: changed while rank {ranks.rank} copied it; resume again")

    try:
        agree(ranks, take_checkpoint)
        model = _train_rank(ranks, tmp, config, data, out=out, overrides=overrides, seed=agreed, device=device,
                            resume=resume, checkpoint_dir=checkpoint_dir, metrics_path=metrics_path,
                            progress=progress, log=log, overwrite=overwrite, keep_checkpoints=keep_checkpoints,
                            spec=spec)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ranks.finish()  # the others wait until rank 0 has written
    return model


def _train_rank(ranks: Ranks, tmp: Path | None, config: Any, data: Any, *, out: Any, overrides: Any, seed: int,
                device: Any, resume: bool, checkpoint_dir: Any, metrics_path: Any, progress: bool | None,
                log: Callable[[str], None], overwrite: bool, keep_checkpoints: bool, spec: RunSpec
                ) -> GenerativeModel:
    """This rank's :func:`train` with the agreed ``seed``: rank 0 (``tmp`` None) writes the outputs; the others
    write into ``tmp``."""
    if ranks.rank == 0:
        log(f"data-parallel: {ranks.world} ranks share {data if not isinstance(data, Dataset) else 'the data'}")
        if spec.seed_drawn:
            log(f"seed: {seed} (drawn at random; pass --seed to reproduce)")
        model = train(config, data, out=out, overrides=overrides, seed=seed, device=device, resume=resume,
                      checkpoint_dir=checkpoint_dir, metrics_path=metrics_path, progress=progress, log=log,
                      overwrite=overwrite, keep_checkpoints=keep_checkpoints, ranks=ranks)
    else:
        assert tmp is not None
        model = train(config, data, out=tmp / "model.safetensors" if out is not None else None,
                      overrides=overrides, seed=seed, device=device, resume=resume,
                      checkpoint_dir=tmp / "checkpoints",
                      metrics_path=tmp / "metrics.jsonl" if metrics_path is not None else None, progress=False,
                      log=None, overwrite=True, keep_checkpoints=False, ranks=ranks)
    return model


def _check_private_ranks(spec: RunSpec) -> None:
    """Before any work: DP-SGD on several ranks needs the generator type's one optimiser to be private (the ranks
    sum their clipped gradients before one draw of noise; a GAN's generator also steps on its own fakes)."""
    from feda2v_toolkit.plugins import get_registry
    from feda2v_toolkit.privacy.sgd import data_parallel_problem

    cls = get_registry().load("generator", spec.generator_type)
    if getattr(cls, "fitted", False):
        return  # closed-form statistics: summed over the ranks' blocks, noised once
    try:
        with torch.device("meta"):
            gen = cls.from_config(spec.config, seq_len=spec.training_length, dim=8, num_classes=2, condition_dim=0)
            optimizers = gen.configure_optimizers(spec.config)
        declared = gen.private_modules(spec.config)
    except Exception:  # noqa: BLE001 - the type's own checks speak later, with their own message
        return
    problem = data_parallel_problem(declared, optimizers) if declared is not None else None
    if problem:
        raise UsageError(f"DP-SGD with the generator type {spec.generator_type!r} runs in one process: {problem}; "
                         "start it without torchrun")


def check_outputs(out: Any, metrics_path: Any, checkpoint: Any, *, inputs: list[Any], overwrite: bool,
                  resume: bool, config: Any = None) -> None:
    """The overwrite rule for a training run, before any work: the model file and the metrics file are replaced
    only with ``overwrite`` (a resumed run continues its own metrics file), none of them may be or hold an
    input -- a dataset, or ``config`` when it is a file path -- and every place must be writable."""
    configs = [config] if isinstance(config, (str, os.PathLike)) else []
    for path in (out, metrics_path, checkpoint):
        if path is not None:
            check_inputs(path, configs, role="config file")
    if out is not None:
        check_output(out, inputs=inputs, overwrite=overwrite, role="input dataset")
    if metrics_path is not None:
        check_output(metrics_path, inputs=inputs, overwrite=overwrite or resume, role="input dataset")
    if checkpoint is not None:
        check_output_path(checkpoint, inputs, role="input dataset")
        check_writable(checkpoint)


def _checkpoint_dir(spec: RunSpec, out: Any, checkpoint_dir: Any) -> Any:
    if checkpoint_dir is None and out is not None and spec.checkpoint_dir == _DEFAULT_CHECKPOINT_DIR:
        return default_checkpoint_dir(out)  # beside the model, not a shared ./checkpoints
    return checkpoint_dir
