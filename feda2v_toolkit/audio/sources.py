"""Audio in: where clips come from (class folders, CSV/JSON manifests, saved Hugging Face datasets) and how
one clip becomes a 16 kHz mono waveform of a fixed length.

Reading uses soundfile (WAV, FLAC, OGG, MP3, AIFF, ...) and soxr for resampling, both from the optional
``audio`` extra (:func:`require`); nothing here imports torch. See ``docs/data.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feda2v_toolkit.errors import InputError, UsageError, spelled

#: the sample rate AST's feature extractor accepts
SAMPLE_RATE = 16_000
#: file suffixes a folder source picks up (what libsndfile reads)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64")
#: largest manifest read into memory
MAX_MANIFEST_BYTES = 256 * 2**20
CROP_POLICIES = ("start", "center")
#: the clip lengths a policy accepts (AST checkpoints see 10.24 s; an hour is far beyond any of them)
MIN_CLIP_SECONDS = 0.03
MAX_CLIP_SECONDS = 3600.0

#: the largest sample magnitude a clip may hold: audio is within [-1, 1] (a float file may go a little beyond;
#: one written at integer scale reaches 32,768); far larger values overflow the filterbank's float32 powers
MAX_SAMPLE = 1e6
_INSTALL = 'pip install "feda2v-tk[audio]"  (transformers, soundfile, soxr)'


def require(*modules: str) -> None:
    """Raise a UsageError naming exactly what to install when an ``audio`` extra module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"embedding audio needs {', '.join(missing)}, which is not installed; run: {_INSTALL}")


class AudioError(Exception):
    """One clip cannot be used (unreadable, empty, not audio); the message says why."""


@dataclass(frozen=True)
class ClipPolicy:
    """How a waveform becomes a clip: mean downmix, resample to 16 kHz (soxr, HQ), crop to ``seconds``
    (from the start or the centre) and zero-pad at the end."""

    seconds: float
    crop: str = "start"

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, int | float) and math.isfinite(self.seconds)
                and MIN_CLIP_SECONDS <= self.seconds <= MAX_CLIP_SECONDS):
            raise UsageError(f"{spelled('--clip-seconds', 'clip seconds')} must be a number of seconds in "
                             f"{MIN_CLIP_SECONDS}..{MAX_CLIP_SECONDS}, got {self.seconds!r}")
        if self.crop not in CROP_POLICIES:
            raise UsageError(f"crop must be one of {', '.join(CROP_POLICIES)}, not {self.crop!r}")

    @property
    def samples(self) -> int:
        return int(round(self.seconds * SAMPLE_RATE))

    def to_json(self) -> dict[str, Any]:
        return {"clip_seconds": self.seconds, "sample_rate": SAMPLE_RATE, "crop": self.crop,
                "pad": "zeros at the end", "downmix": "mean of channels", "resampler": "soxr HQ"}


@dataclass
class Clip:
    """One clip of a source: ``id`` (relative path or row name), integer ``label``, optional ``fold`` index,
    and where the audio is (``path``, or ``row`` of a saved dataset read through the source)."""

    id: str
    label: int
    fold: int | None = None
    path: Path | None = None
    row: int | None = None


@dataclass
class ClipSource:
    """The clips of a source, in a fixed order, with class names (and fold names when there are folds)."""

    clips: list[Clip]
    class_names: list[str]
    description: dict[str, Any]
    fold_names: list[str] | None = None
    row_reader: Callable[[int], Any] | None = field(default=None, repr=False)

    def open(self, clip: Clip) -> Any:
        """What soundfile reads for ``clip``: a path or a file-like object of bytes."""
        if clip.path is not None:
            return clip.path
        assert self.row_reader is not None and clip.row is not None
        return self.row_reader(clip.row)


# --------------------------------------------------------------------------------------------- sources


def open_source(source: str | os.PathLike[str], *, path_column: str = "path", label_column: str = "label",
                fold_column: str = "fold", audio_column: str = "audio", audio_root: str | None = None,
                split: str | None = None, folds: Sequence[str] | None = None) -> ClipSource:
    """A class-folder directory, a ``.csv``/``.json``/``.jsonl`` manifest, or a dataset saved with
    ``datasets.save_to_disk`` (detected by its ``state.json`` / ``dataset_dict.json``)."""
    root = Path(source)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        src = _hf_source(root, audio_column=audio_column, label_column=label_column, fold_column=fold_column,
                         split=split)
    elif root.is_dir():
        src = _folder_source(root)
    elif root.suffix.lower() in (".csv", ".json", ".jsonl"):
        src = _manifest_source(root, path_column=path_column, label_column=label_column,
                               fold_column=fold_column, audio_root=Path(audio_root) if audio_root else None)
    else:
        raise UsageError(f"{root}: not a class-folder directory, a .csv/.json/.jsonl manifest or a saved "
                         f"Hugging Face dataset")
    if folds:
        src = _select_folds(src, [str(f) for f in folds])
    if not src.clips:
        raise InputError(f"{root}: holds no audio clips")
    return src


def _folder_source(root: Path) -> ClipSource:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class sub-folders (expected {root}/<class>/<clip>.wav ...)")
    clips: list[Clip] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        clips += [Clip(id=p.relative_to(root).as_posix(), label=label, path=p) for p in files]
    return ClipSource(clips, classes, {"kind": "folder", "path": str(root)})


def open_regular(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Open ``path`` for binary reading only if it is a regular file: opened without blocking and checked on
    the open descriptor, so a FIFO never hangs the reader and a device is never read. Raises ``OSError``
    (``ENOENT``...) or :class:`NotRegularFile`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path}: the {what} is not a regular file (a device, pipe or socket)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class NotRegularFile(ValueError):
    """A path that should be a regular file is a device, FIFO, socket or directory."""


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (one-line errors otherwise)."""
    try:
        with open_regular(path, what) as fh:
            data = fh.read(limit + 1)
    except NotRegularFile as exc:
        raise UsageError(str(exc)) from None
    except IsADirectoryError:
        raise UsageError(f"{path}: the {what} is a directory") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{path}: the {what} is larger than the {limit} bytes read")
    return data


def _read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    data = read_bounded(path, MAX_MANIFEST_BYTES, "manifest")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read manifest: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:
            raise InputError(f"{path}: not a valid CSV manifest: {exc}") from None
    try:
        if path.suffix.lower() == ".jsonl":
            rows: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a manifest") from None
    if isinstance(rows, dict) and isinstance(rows.get("clips"), list):
        rows = rows["clips"]
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise InputError(f"{path}: expected a list of objects (or {{\"clips\": [...]}})")
    return rows


def _under_root(path: Path, row: int, rel: str, root: Path) -> Path:
    """``root / rel`` if it stays under ``root`` (no ``..`` out of it, no absolute path elsewhere)."""
    if "\0" in rel:
        raise InputError(f"{path}: row {row} has a path with a NUL character")
    root_abs = os.path.abspath(root)
    joined = os.path.normpath(os.path.join(root_abs, rel))
    if joined != root_abs and not joined.startswith(root_abs.rstrip(os.sep) + os.sep):
        raise InputError(f"{path}: row {row}: {rel!r} is outside the audio root {root}; a manifest's paths stay "
                         f"under {spelled('--audio-root', 'audio_root')} (default: the manifest's directory)")
    return root / rel


def _label_names(values: list[Any]) -> tuple[list[str], dict[str, int]]:
    """Class names from label values: sorted numerically when all are integers, else alphabetically."""
    distinct = {str(v) for v in values}
    names = sorted(distinct, key=int) if all(s.lstrip("-").isdigit() for s in distinct) else sorted(distinct)
    return names, {n: i for i, n in enumerate(names)}


def _manifest_source(path: Path, *, path_column: str, label_column: str, fold_column: str,
                     audio_root: Path | None) -> ClipSource:
    rows = _read_manifest_rows(path)
    base = audio_root or path.parent
    for i, row in enumerate(rows):
        for col in (path_column, label_column):
            if row.get(col) in (None, ""):
                have = ", ".join(map(str, row)) or "none"
                raise InputError(f"{path}: row {i + 1} has no {col!r} (columns: {have}); "
                                 f"name the columns with --path-column / --label-column")
    names, index = _label_names([r[label_column] for r in rows])
    has_folds = bool(rows) and all(r.get(fold_column) not in (None, "") for r in rows)
    fold_names, fold_index = _label_names([r[fold_column] for r in rows]) if has_folds else (None, {})
    clips = []
    for i, r in enumerate(rows):
        rel = str(r[path_column])
        clips.append(Clip(id=rel, label=index[str(r[label_column])], path=_under_root(path, i + 1, rel, base),
                          fold=fold_index[str(r[fold_column])] if has_folds else None))
    return ClipSource(clips, names, {"kind": "manifest", "path": str(path), "audio_root": str(base),
                                     "path_column": path_column, "label_column": label_column,
                                     "fold_column": fold_column if has_folds else None}, fold_names)


def _hf_source(root: Path, *, audio_column: str, label_column: str, fold_column: str,
               split: str | None) -> ClipSource:
    try:
        import datasets
    except ImportError:
        raise UsageError(f'{root}: reading a saved Hugging Face dataset needs the datasets package; run: '
                         f'pip install "feda2v-tk[datasets]"') from None
    import sys

    if not sys.stderr.isatty() and datasets.is_progress_bar_enabled():  # no \r-redrawn bars in logs
        datasets.disable_progress_bars()
    try:
        ds: Any = datasets.load_from_disk(str(root))
    except Exception as exc:  # datasets raises several types for a broken directory
        raise InputError(f"{root}: cannot load the saved dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise UsageError(f"{root}: choose a split with --split ({', '.join(splits)})")
        ds = ds[split]
    for col in (audio_column, label_column):
        if col not in ds.column_names:
            raise UsageError(f"{root}: no column {col!r} (columns: {', '.join(ds.column_names)}); "
                             f"name them with --audio-column / --label-column")
    if isinstance(ds.features[audio_column], datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    feature = ds.features[label_column]
    labels = ds[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names, label_ids = list(feature.names), [int(v) for v in labels]
    else:
        names, index = _label_names(labels)
        label_ids = [index[str(v)] for v in labels]
    fold_names, fold_ids = None, None
    if fold_column in ds.column_names:
        fold_names, fidx = _label_names(ds[fold_column])
        fold_ids = [fidx[str(v)] for v in ds[fold_column]]
    audio_col = ds.select_columns([audio_column])

    def read_row(row: int) -> Any:
        value = audio_col[row][audio_column]
        if isinstance(value, dict) and value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            return value["path"]
        if isinstance(value, str | bytes):
            return io.BytesIO(value) if isinstance(value, bytes) else value
        raise AudioError(f"column {audio_column!r} holds neither audio bytes nor a path")

    clips = []
    for row in range(len(ds)):
        clips.append(Clip(id=f"{split + '/' if split else ''}{row}", label=label_ids[row], row=row,
                          fold=fold_ids[row] if fold_ids else None))
    return ClipSource(clips, names, {"kind": "hf-dataset", "path": str(root), "split": split,
                                     "audio_column": audio_column, "label_column": label_column,
                                     "fold_column": fold_column if fold_ids else None}, fold_names, read_row)


def _select_folds(src: ClipSource, folds: list[str]) -> ClipSource:
    if src.fold_names is None:
        raise UsageError(f"{src.description['path']}: --folds given, but the source has no fold column")
    unknown = [f for f in folds if f not in src.fold_names]
    if unknown:
        raise UsageError(f"{src.description['path']}: unknown fold(s) {', '.join(unknown)} "
                         f"(folds: {', '.join(src.fold_names)})")
    keep = {src.fold_names.index(f) for f in folds}
    src.clips = [c for c in src.clips if c.fold in keep]
    src.description["folds"] = folds
    return src


# --------------------------------------------------------------------------------------------- clips


def load_clip(what: Any, policy: ClipPolicy) -> tuple[Any, int]:
    """Read ``what`` (a path or file-like) as a float32 mono 16 kHz waveform of exactly ``policy.samples``
    samples; return it with the number of real (non-padding) samples. Raises :class:`AudioError`."""
    import numpy as np
    import soundfile as sf
    import soxr

    opened = None
    try:
        if isinstance(what, str | os.PathLike):
            opened = open_regular(what, "audio file")  # a FIFO or device in a manifest: refused, never read
            what = opened
        with sf.SoundFile(what) as fh:
            rate, total = fh.samplerate, fh.frames
            if total == 0:
                raise AudioError("empty: the file holds no audio samples")
            # read only what the clip keeps (plus resampler margin): bounded memory for long files
            keep = int(np.ceil(policy.seconds * rate))
            start = (total - keep) // 2 if policy.crop == "center" and total > keep else 0
            if start:
                fh.seek(start)
            data = fh.read(keep + 64, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except NotRegularFile:
        raise AudioError("not a regular file (a device, pipe or socket)") from None
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as exc:
        raise AudioError(f"unreadable: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None
    finally:
        if opened is not None:
            opened.close()
    if data.shape[0] == 0:
        raise AudioError("empty: the file holds no audio samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("holds NaN or infinite samples")
    peak = float(np.abs(mono).max())
    if peak > MAX_SAMPLE:
        raise AudioError(f"samples reach {peak:.3g} in magnitude (audio is within [-1, 1]; at most {MAX_SAMPLE:.0e} "
                         "is read)")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    n = policy.samples
    real = min(mono.shape[0], n)
    out = np.zeros(n, dtype=np.float32)
    out[:real] = mono[:real]
    return out, real


def real_frames(real_samples: int, max_length: int) -> int:
    """Frames of the Kaldi fbank (25 ms window, 10 ms hop) that hold real audio, capped at ``max_length``."""
    frames = 1 + (real_samples - 400) // 160 if real_samples >= 400 else 0
    return max(0, min(frames, max_length))
