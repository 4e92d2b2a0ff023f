"""Audio -> AST embeddings (``feda2v-tk embed``): Hugging Face transformers' ``ASTFeatureExtractor`` +
``ASTModel``, ``last_hidden_state`` kept whole, streamed into dataset shards, resumable.

Work happens in a hidden sibling directory ``.NAME.embed-partial``: the clips are cut into fixed shards
(a whole number of batches each); every finished shard is written atomically with a ``done-NNNNN.json``
marker next to it. Re-running the same command skips the finished shards and computes the rest from the
same batches, so the result is the same as an uninterrupted run; at the end the directory is renamed to
the output in one step. Settings that change the result (model, clip policy, clips, dtype, batch size)
are fingerprinted: a partial run with other settings is never mixed in. See ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feda2v_toolkit.audio.sources import (
    AudioError,
    Clip,
    ClipPolicy,
    ClipSource,
    load_clip,
    real_frames,
    require,
)
from feda2v_toolkit.errors import InputError, UsageError, spelled
from feda2v_toolkit.runtime.atomic import (
    atomic_path,
    check_output,
    default_mode,
    make_parents,
    replace_directory,
)

#: the checkpoint FedA2V uses (1214 tokens of width 768)
DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
EMBED_FORMAT_VERSION = 1
_PARTIAL_SUFFIX = ".embed-partial"


def ast_token_count(num_mel_bins: int, max_length: int, patch_size: int, frequency_stride: int,
                    time_stride: int) -> int:
    """Tokens AST emits: 2 summary tokens + frequency x time patches (frequency-major)."""
    return ((num_mel_bins - patch_size) // frequency_stride + 1) * ((max_length - patch_size) // time_stride + 1) + 2


class ASTEmbedder:
    """A frozen AST (``ASTModel.from_pretrained``) and its feature extractor, fp32 in eval mode.

    ``model`` is a hub name or a local directory (``save_pretrained`` layout); ``device``: cpu, cuda or auto.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, revision: str | None = None, device: str = "auto") -> None:
        require("transformers", "soundfile", "soxr")
        from transformers.utils import logging as hf_logging

        from feda2v_toolkit.audio.ast_model import load_ast
        from feda2v_toolkit.runtime.launch import rank_device

        if device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device must be auto, cpu or cuda, not {device!r}")
        device = rank_device(device)  # under torchrun: one GPU per rank, or the CPU for every rank
        level, bars = hf_logging.get_verbosity(), not hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # its load report (checked strictly by load_ast) and hub chatter
        hf_logging.disable_progress_bar()
        import sys

        if not sys.stderr.isatty():  # a download's bars only on a terminal: no \r-redrawn lines in logs
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        try:
            self.extractor, self.model = load_ast(model, revision=revision)
        finally:
            hf_logging.set_verbosity(level)
            if not bars:
                hf_logging.enable_progress_bar()
        self.model.eval().requires_grad_(False).to(device)
        self.name, self.revision, self.device = model, revision, device
        cfg, fe = self.model.config, self.extractor
        if fe.sampling_rate != 16_000:
            raise InputError(f"{model}: feature extractor expects {fe.sampling_rate} Hz; AST uses 16000")
        if fe.max_length != cfg.max_length or fe.num_mel_bins != cfg.num_mel_bins:
            raise InputError(f"{model}: feature extractor ({fe.num_mel_bins} mel x {fe.max_length} frames) does "
                             f"not match the model ({cfg.num_mel_bins} x {cfg.max_length})")
        from feda2v_toolkit.audio.fbank import Featurizer

        self.featurizer = Featurizer(fe)  # once the extractor is known to be AST's (16 kHz, the model's shape)
        self.max_length = int(cfg.max_length)
        self.tokens = ast_token_count(cfg.num_mel_bins, cfg.max_length, cfg.patch_size, cfg.frequency_stride,
                                      cfg.time_stride)
        self.dim = int(cfg.hidden_size)

    def settings(self) -> dict[str, Any]:
        """What fixes the embeddings: model name, revision, commit, extractor and patch settings."""
        import transformers
        from transformers.utils import is_speech_available

        cfg, fe = self.model.config, self.extractor
        return {"model": self.name, "revision": self.revision,
                "commit": getattr(cfg, "_commit_hash", None), "transformers": transformers.__version__,
                "extractor": {"sampling_rate": fe.sampling_rate, "num_mel_bins": fe.num_mel_bins,
                              "max_length": fe.max_length, "do_normalize": fe.do_normalize,
                              "mean": fe.mean, "std": fe.std,
                              "fbank": "torchaudio kaldi" if is_speech_available() else "numpy"},
                "patches": {"patch_size": cfg.patch_size, "frequency_stride": cfg.frequency_stride,
                            "time_stride": cfg.time_stride, "order": "frequency-major"},
                "tokens": self.tokens, "dim": self.dim, "output": "last_hidden_state", "inference": "float32"}

    def features(self, waves: list[Any]) -> Any:
        """Mel filterbank features ``[B, max_length, mel]`` (numpy float32) of 16 kHz mono waveforms: the
        extractor's, a clip's frames at once where it computes them in numpy (:mod:`feda2v_toolkit.audio.fbank`:
        the same bytes)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*mel filter has all zero values.*")
            return self.featurizer(waves)

    def __call__(self, features: Any) -> Any:
        """``last_hidden_state`` ``[B, tokens, dim]`` float32 on the CPU."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(features).to(self.device)
            hidden = self.model(input_values=x).last_hidden_state
        if tuple(hidden.shape[1:]) != (self.tokens, self.dim):
            raise InputError(f"{self.name}: model returned {list(hidden.shape[1:])}, expected "
                             f"[{self.tokens}, {self.dim}]")
        return hidden.float().cpu()


@dataclass
class EmbedReport:
    """What a run did: clips in the source, clips written (``rows``), clips skipped (id, path, reason), clips
    already done by an earlier run, classes left out because none of their clips could be read, and timing
    (``model_seconds``: the forward passes alone)."""

    out: Path
    clips: int
    rows: int = 0
    resumed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0
    computed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    dropped_classes: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "clips": self.clips, "rows": self.rows, "resumed": self.resumed,
                "computed": self.computed, "skipped": self.skipped, "seconds": round(self.seconds, 3),
                "model_seconds": round(self.model_seconds, 3), "clips_per_second": round(self.clips_per_second, 3),
                "dropped_classes": self.dropped_classes, "settings": self.settings}


def partial_dir(out: Path) -> Path:
    """Where an unfinished ``embed`` into ``out`` keeps its finished shards."""
    return out.parent / f".{out.name}{_PARTIAL_SUFFIX}"


def embed(source: ClipSource | str | os.PathLike[str], out: str | os.PathLike[str], *, model: str = DEFAULT_MODEL,
          revision: str | None = None, policy: ClipPolicy | None = None, batch_size: int = 8,
          device: str = "auto", dtype: str = "float16", on_error: str = "skip", overwrite: bool = False,
          shard_bytes: int | None = None, progress: bool | None = None, read_workers: int = 1,
          embedder: ASTEmbedder | None = None, ranks: Any = None) -> EmbedReport:
    """Embed every clip of ``source`` (a :class:`ClipSource`, or a class-folder directory / manifest / saved
    dataset path opened with default columns) into the shard directory ``out`` (resumable; see the module
    docstring).

    ``on_error``: ``skip`` lists unreadable or empty clips in the report, ``fail`` stops at the first
    (finished shards stay for a resumed run). ``read_workers`` threads read and featurise the next batches
    while the model runs (1 suits a CPU run; more keep a GPU fed); the result does not depend on it.
    Raises UsageError / InputError for bad arguments or inputs.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or given :class:`~feda2v_toolkit.runtime.ranks.Ranks`) every rank
    runs this same call: rank ``r`` embeds shards ``k`` with ``k mod W = r`` into the shared work directory (one
    GPU per rank: ``cuda:LOCAL_RANK``), and rank 0 assembles the output once every rank is done -- the same
    bytes as one process. The ranks must see the same file system.
    """
    from feda2v_toolkit.runtime.threads import settle_vector_math

    settle_vector_math()  # the same bytes on every run (runtime.threads)
    import torch

    from feda2v_toolkit.runtime.ranks import agree, init_from_environment

    if ranks is None:
        ranks = init_from_environment(device)

    from feda2v_toolkit.data.dataset import DEFAULT_SHARD_BYTES
    from feda2v_toolkit.data.writer import _resolve_dtype
    from feda2v_toolkit.runtime.progress import Progress

    if not isinstance(source, ClipSource):
        from feda2v_toolkit.audio.sources import open_source

        source = open_source(source)
    policy = policy or ClipPolicy(10.0)
    if on_error not in ("skip", "fail"):
        raise UsageError(f"on_error must be skip or fail, not {on_error!r}")
    if batch_size < 1:
        raise UsageError("batch_size must be >= 1")
    storage = _resolve_dtype(dtype) or torch.float16
    # agree(): one process runs the check as it is; ranks stop together when rank 0's output is refused
    out = agree(ranks, lambda: check_output(out, inputs=source_paths(source), overwrite=overwrite, directory=True,
                                              role="audio source"))
    emb = embedder or ASTEmbedder(model, revision=revision, device=device)
    from feda2v_toolkit.runtime.resources import require_memory

    row_bytes = emb.tokens * emb.dim * storage.itemsize
    batches_per_shard = max(1, (shard_bytes or DEFAULT_SHARD_BYTES) // row_bytes // batch_size)
    shard_clips = batches_per_shard * batch_size
    # the waveforms of the batches being prepared, their filterbank features, and the shard gathered in place
    require_memory((max(1, read_workers) + 1) * batch_size * (policy.samples * 4 * 3 + emb.max_length * 128 * 4)
                   + min(shard_clips, len(source.clips)) * row_bytes,
                   f"reading batches of {batch_size} clips of {policy.seconds:g} s into shards of {shard_clips} "
                   "clips", hint=spelled("lower --clip-seconds, --batch-size or --shard-size",
                                         "lower the clip seconds, batch_size or shard_bytes"))
    settings = {**emb.settings(), "clip_policy": policy.to_json(), "dtype": str(storage).removeprefix("torch."),
                "batch_size": batch_size, "shard_clips": shard_clips, "source": source.description,
                "embed_format_version": EMBED_FORMAT_VERSION}
    fingerprint = _fingerprint(settings, source)
    # rank 0 makes (or resumes) the work directory; the others join it
    agree(ranks, lambda: _prepare_partial(out, fingerprint, overwrite) if ranks.rank == 0 else None)
    work = partial_dir(out)
    report = EmbedReport(out=out, clips=len(source.clips), settings=settings)
    meta_common = {"embed": json.dumps(settings)}
    if source.fold_names is not None:
        meta_common["fold_names"] = json.dumps(source.fold_names)

    shards = [source.clips[i:i + shard_clips] for i in range(0, len(source.clips), shard_clips)]
    todo = []
    for k, clips in enumerate(shards):
        done = _read_done(work / f"done-{k:05d}.json")
        if done is None:
            if k % ranks.world == ranks.rank:
                todo.append(k)
        else:
            report.resumed += len(clips)
    mine = sum(len(shards[k]) for k in todo)
    bar = Progress(mine + report.resumed, report.resumed, progress if ranks.rank == 0 else False, unit="clip",
                   desc="embed")
    start = time.perf_counter()
    try:
        batches = [(k, shards[k][j:j + batch_size]) for k in todo for j in range(0, len(shards[k]), batch_size)]
        current: int | None = None
        # one shard's rows are gathered in place: bounded memory, no concatenation copy
        buffer = torch.empty(min(shard_clips, len(source.clips)), emb.tokens, emb.dim, dtype=storage)
        parts: list[tuple[list[Clip], list[int]]] = []
        filled = 0
        skipped: list[dict[str, str]] = []
        n_skipped = 0
        for k, clips, prepared in _prefetch(batches, lambda b: _prepare(source, b[1], policy, emb),
                                            max(1, read_workers)):
            if current is not None and k != current:
                _finish_shard(work, current, buffer[:filled], parts, skipped, source, meta_common, out)
                parts, skipped, filled = [], [], 0
            current = k
            feats, good, frames, bad = prepared
            for clip, reason in bad:
                where = str(clip.path) if clip.path is not None else f"{source.description['path']}:{clip.id}"
                if on_error == "fail":
                    raise InputError(f"{where}: {reason}")
                skipped.append({"id": clip.id, "path": where, "reason": reason})
            if good:
                t0 = time.perf_counter()
                hidden = emb(feats)
                report.model_seconds += time.perf_counter() - t0
                buffer[filled:filled + len(good)].copy_(hidden)
                filled += len(good)
                parts.append((good, frames))
            report.computed += len(clips)
            bar.update(len(clips))
            n_skipped += len(bad)
            bar.postfix(skipped=n_skipped)
        if current is not None:
            _finish_shard(work, current, buffer[:filled], parts, skipped, source, meta_common, out)
    except BaseException:
        # one rank failing ends the run: torchrun stops the other ranks when this one exits
        if not ranks.distributed and not any(work.glob("done-*.json")):  # nothing worth resuming: leave nothing
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    if ranks.distributed:
        agree(ranks, lambda: None)  # every rank's shards are done
        report.computed = len(source.clips) - report.resumed
    if ranks.rank == 0:
        _assemble(work, out, len(shards), report, source)
    ranks.finish()  # the other ranks wait for the assembly
    return report


def source_paths(source: ClipSource) -> list[Path]:
    """What an embed run reads, which its output may not be, contain or lie inside: the source (a folder,
    a manifest, a saved dataset) and, for a manifest, every clip it lists."""
    paths = [Path(source.description["path"])]
    if source.description.get("kind") == "manifest":
        paths += [c.path for c in source.clips if c.path is not None]
    return paths


def _fingerprint(settings: dict[str, Any], source: ClipSource) -> str:
    """A hash of everything that fixes the result; source paths resolved (the same run from another cwd)."""
    resolved = {k: str(Path(v).resolve()) if k in ("path", "audio_root") and v else v
                for k, v in settings["source"].items()}
    model = str(Path(settings["model"]).resolve()) if Path(settings["model"]).is_dir() else settings["model"]
    h = hashlib.sha256(json.dumps({**settings, "source": resolved, "model": model}, sort_keys=True,
                                  default=str).encode())
    h.update(json.dumps(source.class_names).encode())
    for c in source.clips:
        h.update(f"\0{c.id}\0{c.label}\0{c.fold}".encode())
    return h.hexdigest()


def _prepare_partial(out: Path, fingerprint: str, overwrite: bool) -> Path:
    """The partial directory for this run: resumed when its fingerprint matches, else fresh."""
    work = partial_dir(out)
    state = work / "embed-state.json"
    if work.exists():
        try:
            old = json.loads(state.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError, RecursionError):
            old = None
        if old == fingerprint:
            return work
        if old is None and any(work.iterdir()):
            raise UsageError(f"{work}: is not the work directory of an embed run (no embed-state.json); not "
                             "touching it: move it away")
        if old is not None and not overwrite:
            raise UsageError(f"{work}: an unfinished embed run with other settings or clips is there; re-run "
                             f"it with the same settings to resume, or add {spelled('--overwrite', 'overwrite=True')} "
                             "to start over")
        shutil.rmtree(work)
    make_parents(work)
    work.mkdir()
    try:
        with atomic_path(state, display=out) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


def _read_done(path: Path) -> dict[str, Any] | None:
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return done if isinstance(done, dict) and isinstance(done.get("rows"), int) else None


def _prepare(source: ClipSource, clips: list[Clip], policy: ClipPolicy,
             emb: ASTEmbedder) -> tuple[Any, list[Clip], list[int], list[tuple[Clip, str]]]:
    """Read a batch's clips and compute their features (runs on the prefetch thread)."""
    import numpy as np

    waves, good, frames, bad = [], [], [], []
    for clip in clips:
        try:
            wave, real = load_clip(source.open(clip), policy)
        except AudioError as exc:
            bad.append((clip, str(exc)))
            continue
        waves.append(wave)
        good.append(clip)
        frames.append(real_frames(real, emb.max_length))
    feats = emb.features(waves) if waves else None
    if feats is not None:  # a clip whose features overflow is unreadable too, never a NaN row in the output
        finite = np.isfinite(feats.reshape(feats.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad += [(c, "its filterbank features are NaN or infinite") for c, ok in zip(good, finite, strict=True)
                    if not ok]
            good = [c for c, ok in zip(good, finite, strict=True) if ok]
            frames = [f for f, ok in zip(frames, finite, strict=True) if ok]
            feats = feats[finite] if good else None
    return feats, good, frames, bad


def _prefetch(batches: list[tuple[int, list[Clip]]], prepare: Any,
              workers: int = 1) -> Iterator[tuple[int, list[Clip], Any]]:
    """Yield ``(shard, clips, prepare(batch))`` in order, with the next ``workers`` batches prepared on
    ``workers`` threads meanwhile (reading, resampling and the filterbank release the GIL for most work)."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="feda2v-embed-read") as pool:
        pending = deque(pool.submit(prepare, b) for b in batches[:workers])
        for i, batch in enumerate(batches):
            result = pending.popleft().result()
            if i + workers < len(batches):
                pending.append(pool.submit(prepare, batches[i + workers]))
            yield batch[0], batch[1], result


def _finish_shard(work: Path, k: int, embeddings: Any, parts: list[tuple[list[Clip], list[int]]],
                  skipped: list[dict[str, str]], source: ClipSource, meta_common: dict[str, str],
                  out: Path) -> None:
    """Write shard ``k`` (if it has rows) and then its done marker, each atomically."""
    import torch

    from feda2v_toolkit.data.writer import dataset_metadata
    from feda2v_toolkit.runtime.tensorfile import write_tensor_file

    clips = [c for good, _ in parts for c in good]
    if clips:
        tensors = {"embeddings": embeddings, "labels": torch.tensor([c.label for c in clips], dtype=torch.long),
                   "frames": torch.tensor([f for _, fr in parts for f in fr], dtype=torch.int32)}
        if source.fold_names is not None:
            tensors["folds"] = torch.tensor([c.fold for c in clips], dtype=torch.long)
        meta = dataset_metadata(source.class_names, {**meta_common, "clip_ids": json.dumps([c.id for c in clips])})
        with atomic_path(work / f"part-{k:05d}.safetensors", display=out) as tmp:
            write_tensor_file(tmp, tensors, meta)
    with atomic_path(work / f"done-{k:05d}.json", display=out) as tmp:
        tmp.write_text(json.dumps({"rows": len(clips), "skipped": skipped}) + "\n", encoding="utf-8")


def _assemble(work: Path, out: Path, num_shards: int, report: EmbedReport, source: ClipSource) -> None:
    """Check every shard is done, drop the classes no clip was written for, drop the markers and move the
    directory to ``out`` in one rename (a shard whose clips were all skipped leaves a gap in the part numbers;
    readers take parts in name order). An existing ``out`` (only dataset shards: the overwrite rule) is
    replaced only then."""
    names = []
    counts = [0] * len(source.class_names)
    for k in range(num_shards):
        done = _read_done(work / f"done-{k:05d}.json")
        if done is None:
            raise InputError(f"{work}: shard {k} is not finished")  # cannot happen: every shard was computed
        report.rows += done["rows"]
        report.skipped += done["skipped"]
        if done["rows"]:
            names.append(f"part-{k:05d}.safetensors")
            for label in _shard_labels(work / names[-1]):
                if 0 <= label < len(counts):
                    counts[label] += 1
    if not names:
        shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"{report.settings['source']['path']}: none of the {report.clips} clips could be read")
    empty = [c for c, n in zip(source.class_names, counts, strict=True) if n == 0]
    if empty:
        _drop_classes(work, names, source.class_names, empty)
        report.dropped_classes = empty
    for extra in [*work.glob("done-*.json"), work / "embed-state.json"]:
        extra.unlink()
    os.chmod(work, default_mode(directory=True))
    replace_directory(work, out)


def _shard_labels(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor("labels").tolist()


def _drop_classes(work: Path, names: list[str], class_names: list[str], empty: list[str]) -> None:
    """Rewrite the shards without the classes no clip was written for (labels renumbered, ``class_names``
    shortened), each atomically; a shard already rewritten (an interrupted earlier assembly) is left."""
    import torch
    from safetensors import safe_open

    from feda2v_toolkit.data.dataset import _class_names_from_metadata
    from feda2v_toolkit.runtime.tensorfile import write_tensor_file

    kept = [c for c in class_names if c not in empty]
    new_label = torch.full((len(class_names),), -1, dtype=torch.long)
    for i, c in enumerate(class_names):
        if c in kept:
            new_label[i] = kept.index(c)
    for name in names:
        path = work / name
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            if (_class_names_from_metadata(path, meta) or []) == kept:
                continue
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
        tensors["labels"] = new_label[tensors["labels"]]
        meta["class_names"] = json.dumps(kept)
        with atomic_path(path) as tmp:
            write_tensor_file(tmp, tensors, meta)
