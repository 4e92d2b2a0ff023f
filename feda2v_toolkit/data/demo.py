"""An AST-shaped demo dataset with real class structure, made on the fly (nothing is downloaded).

An Audio Spectrogram Transformer turns a clip into ``[1214, 768]`` tokens: 2 summary tokens, then
12 frequency x 101 time patches, frequency-major (token ``2 + f * 101 + t``). The demo mimics that
layout with four sound classes whose differences live at different scales:

* every token carries a smooth, strong **positional component** shared by all clips (as AST tokens do);
* ``engine`` and ``drum`` sit in the **low** frequency bands, ``whistle`` and ``bird`` in the **high**
  ones -- visible after coarse pooling;
* ``engine`` and ``whistle`` are **steady**, ``drum`` and ``bird`` **decay** after their onset, with the
  same mean energy -- visible only when the reduced sequence resolves time within a frequency row;
* all classes share one timbre (a few feature directions), mixed a little differently in every clip;
* clips vary in loudness, onset, decay time and timbre mixture, and carry noise (per-element std 0.5
  against unit-RMS positional and content components) that is **correlated across features**: 80% of
  its variance lies in 8 directions shared by all clips, so the features are low-rank, as real ones are;
* as a transformer's output, every token then passes a **final LayerNorm**: centred and scaled per
  position, multiplied by a gain of about 1 with a few high-gain dimensions (1 per 128, gain 4, as real
  models' "massive activation" dimensions) and shifted by a **bias shared by every token** (unit RMS).
  Its statistics are each position's expected ones, not each clip's own: a true per-token LayerNorm
  lets even one pooled token tell the classes apart (the corpus of ``bench/corpus.py``, made from real
  recorded sound with an AST-like front end, has that coupling; benchmarks should use it).

So reducing sequences to a few tokens keeps some class information and loses some, which is what
``feda2v-tk analyze`` measures. Measured (``feda2v-tk demo-data d.safetensors --per-class 20``, then
``feda2v-tk analyze -d d.safetensors --lengths 1,2,4,8,32,64 --reducers adaptive_avg --upsamplers
linear``: 60 clips fitted, 20 held out; ridge classifier on pooled features): 100% on the original
sequences; 45% accuracy after pooling to 1 token, 55-70% at 2-4, 100% from 8 on; adaptive average
pooling + linear interpolation keeps R^2 0.24 of the within-sequence variance at 4 tokens, 0.50 at 32
and 0.74 at 64 (the demo data before the LayerNorm and correlated noise: 35%, 60-65%, 100%; R^2 0.25,
0.51, 0.75). Shapes other than AST's work too (tests use tiny ones).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from feda2v_toolkit.data.writer import DatasetWriter, write_dataset

CLASS_NAMES = ("engine", "drum", "whistle", "bird")
AST_SEQ_LEN = 1214
AST_DIM = 768
AST_SUMMARY_TOKENS = 2
AST_FREQ_BINS = 12


@dataclass(frozen=True)
class _Layout:
    """Where each token sits on the (frequency, time) grid; summary tokens have f = t = -1."""

    freq: Tensor  # [L] long
    time: Tensor  # [L] float in [0, 1)
    n_freq: int
    n_time: int

    @classmethod
    def of(cls, seq_len: int) -> _Layout:
        summary = min(AST_SUMMARY_TOKENS, max(seq_len - 1, 0))
        patches = seq_len - summary
        n_freq = max(1, min(AST_FREQ_BINS, patches // 4))
        n_time = max(1, math.ceil(patches / n_freq))
        p = torch.arange(patches)
        freq = torch.cat([torch.full((summary,), -1), p // n_time])
        time = torch.cat([torch.full((summary,), -1.0), (p % n_time).float() / n_time])
        return cls(freq, time, n_freq, n_time)


class _World:
    """The dataset-level structure (positional component, timbre, class bands), fixed by the seed.

    Directions have unit per-element RMS, so the signal-to-noise ratio does not depend on ``dim``:
    ``positional`` and ``content`` are per-element RMS scales, ``noise`` the per-element noise std.
    """

    positional_scale = 1.0
    content_scale = 1.0
    noise_rank = 8
    correlated_noise = 0.8  # share of the noise's variance in the ``noise_rank`` shared directions
    loud_gain = 4.0
    bias_scale = 1.0

    def __init__(self, seq_len: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.layout = lay = _Layout.of(seq_len)
        self.seq_len, self.dim = seq_len, dim
        rank = min(8, dim)
        basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0].T * math.sqrt(dim)  # [rank, D]
        f = lay.freq.clamp(min=0).float() / max(lay.n_freq - 1, 1)
        t = lay.time.clamp(min=0)
        coeffs = torch.stack([
            torch.cos(math.pi * (k % 3 + 1) * f + 2 * math.pi * (k // 3) * t + k) for k in range(rank)
        ], dim=1)  # [L, rank] smooth in f and t
        summary = lay.freq < 0
        coeffs[summary] = torch.randn(int(summary.sum()), rank, generator=g)
        self.positional = self.positional_scale * coeffs @ basis / math.sqrt(rank / 2)  # [L, D]
        timbre = torch.randn(3, dim, generator=g)  # shared by every class
        self.timbre = timbre / timbre.pow(2).mean(dim=1, keepdim=True).sqrt()  # [3, D], unit RMS
        low = torch.exp(-0.5 * ((torch.arange(lay.n_freq) - 0.2 * lay.n_freq) / (0.15 * lay.n_freq + 0.5)) ** 2)
        high = torch.exp(-0.5 * ((torch.arange(lay.n_freq) - 0.75 * lay.n_freq) / (0.15 * lay.n_freq + 0.5)) ** 2)
        self.band = {"engine": low, "drum": low, "whistle": high, "bird": high}
        self.decays = {"engine": False, "drum": True, "whistle": False, "bird": True}
        # noise correlated across features: most of it in a few directions, as in real embeddings
        noise_rank = min(self.noise_rank, dim)
        self.noise_basis = torch.linalg.qr(torch.randn(dim, noise_rank, generator=g))[0].T * math.sqrt(
            dim / noise_rank)  # [r, D]: unit per-element RMS for unit-variance coefficients
        # a transformer's final LayerNorm: gain about 1 with a few high-gain dimensions, and a bias
        # shared by every token (see _layer_norm)
        gain = 1.0 + 0.2 * torch.randn(dim, generator=g)
        loud = torch.randperm(dim, generator=g)[:max(1, dim // 128)]
        gain[loud] = self.loud_gain * torch.sign(torch.randn(loud.numel(), generator=g))
        self.gain = gain
        self.bias = self.bias_scale * torch.randn(dim, generator=g)

    def sample(self, label: int, g: torch.Generator, noise: float) -> Tensor:
        """One clip ``[L, D]`` of class ``label``."""
        lay = self.layout
        name = CLASS_NAMES[label]
        loud = 0.7 + 0.6 * torch.rand((), generator=g)
        onset = 0.3 * torch.rand((), generator=g)
        mix = 1.0 + 0.35 * torch.randn(3, generator=g)  # the same timbre, varied per clip
        direction = (mix.unsqueeze(1) * self.timbre).sum(0) / math.sqrt(3)  # [D], about unit RMS
        t = lay.time.clamp(min=0)
        envelope = torch.sigmoid((t - onset) * 40.0)  # the sound starts at the onset
        if self.decays[name]:
            tau = 0.12 + 0.05 * torch.rand((), generator=g)
            decay = torch.exp(-(t - onset).clamp(min=0) / tau)
            envelope = envelope * decay * (envelope.mean() / (envelope * decay).mean())  # same mean energy
        band = self.band[name][lay.freq.clamp(min=0)]
        amplitude = loud * band * envelope  # [L]
        summary = lay.freq < 0
        amplitude[summary] = loud * 0.8  # summary tokens see the whole clip
        x = self.positional + self.content_scale * amplitude.unsqueeze(1) * direction.unsqueeze(0)
        shared = torch.randn(self.seq_len, self.noise_basis.shape[0], generator=g) @ self.noise_basis
        own = torch.randn(self.seq_len, self.dim, generator=g)
        x = x + noise * (math.sqrt(self.correlated_noise) * shared + math.sqrt(1 - self.correlated_noise) * own)
        return self._layer_norm(x, noise)

    def _layer_norm(self, x: Tensor, noise: float) -> Tensor:
        """A final LayerNorm whose statistics are each position's expected ones, not the clip's own.

        Every position is centred and scaled differently (by its positional component's mean and spread,
        plus the expected content and noise variance), then the gain and the shared bias apply. A true
        LayerNorm divides each token by its own spread, which depends on the clip's loudness there, and
        then even one pooled token tells the classes apart (``bench/corpus.py`` has that coupling).
        """
        spread = self.positional.var(dim=1, unbiased=False) + noise ** 2 + 0.5 * self.content_scale ** 2
        centred = x - self.positional.mean(dim=1, keepdim=True)
        return centred * spread.rsqrt().unsqueeze(1) * self.gain + self.bias


def _labels_for(num_per_class: int, num_classes: int) -> Tensor:
    return torch.arange(num_classes).repeat_interleave(num_per_class)


def _clips(world: _World, labels: Tensor, seed: int, noise: float, first_clip: int = 0,
           chunk: int = 16) -> Iterator[Tensor]:
    """Clips in chunks of ``chunk``; clip ``i`` has its own RNG stream, so it never depends on N."""
    for start in range(0, labels.numel(), chunk):
        rows = []
        for offset, label in enumerate(labels[start:start + chunk].tolist()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + first_clip + start + offset + 1)
            rows.append(world.sample(label, g, noise))
        yield torch.stack(rows)


def _require_demo_memory(clips: int, seq_len: int, dim: int, itemsize: int) -> None:
    """Refuse (:class:`~feda2v_toolkit.errors.ResourceError`) a demo dataset whose clips held at once (``clips``
    of ``itemsize`` bytes per value), its structure (a few ``[L, D]`` float32 tensors) and one chunk of clips
    being drawn (float32, twice) cannot fit in memory, before anything is allocated."""
    from feda2v_toolkit.runtime.resources import require_memory

    values = seq_len * dim
    require_memory(values * (clips * itemsize + 8 * 4 + 2 * 16 * 4), f"a demo dataset of {clips or 'streamed'} "
                   f"clips [{seq_len}, {dim}]", hint="lower --per-class, --full-length or --dim" +
                   (", or write a directory of shards" if clips else ""))


def make_demo_dataset(num_per_class: int = 24, *, seq_len: int = AST_SEQ_LEN, dim: int = AST_DIM,
                      num_classes: int = len(CLASS_NAMES), seed: int = 0, noise: float = 0.5,
                      dtype: torch.dtype = torch.float32, first_clip: int = 0) -> tuple[Tensor, Tensor, list[str]]:
    """Return ``(embeddings [N, L, D], labels [N], class_names)`` with ``N = num_per_class * classes``.

    Deterministic in ``seed``; sample ``i`` does not depend on how many samples are drawn. ``seed`` also
    fixes the dataset-level structure; ``first_clip`` draws other clips of the same structure (e.g. a
    held-out set: ``first_clip`` at least the number of clips already drawn).
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}")
    _require_demo_memory(num_per_class * num_classes, seq_len, dim, torch.empty((), dtype=dtype).element_size())
    world = _World(seq_len, dim, seed)
    labels = _labels_for(num_per_class, num_classes)
    out = torch.empty(labels.numel(), seq_len, dim, dtype=dtype)
    start = 0
    for rows in _clips(world, labels, seed, noise, first_clip):
        out[start:start + rows.shape[0]] = rows.to(dtype)
        start += rows.shape[0]
    return out, labels, list(CLASS_NAMES[:num_classes])


def write_demo_dataset(path: str | os.PathLike[str], num_per_class: int = 24, *, seq_len: int = AST_SEQ_LEN,
                       dim: int = AST_DIM, num_classes: int = len(CLASS_NAMES), seed: int = 0,
                       noise: float = 0.5, dtype: torch.dtype = torch.float16,
                       shard_bytes: int | None = None, first_clip: int = 0, overwrite: bool = False) -> Path:
    """Write the demo dataset: one ``.safetensors`` file, or a shard directory (streamed, bounded memory).

    An existing output is replaced only with ``overwrite`` (the overwrite rule,
    :func:`~feda2v_toolkit.runtime.atomic.check_output`; a directory only if it holds nothing but shards)."""
    from feda2v_toolkit.runtime.atomic import check_output

    out = check_output(path, overwrite=overwrite, directory=Path(path).suffix != ".safetensors")
    from feda2v_toolkit.runtime.resources import require_disk_space

    clips = num_per_class * min(max(num_classes, 1), len(CLASS_NAMES))
    require_disk_space(clips * seq_len * dim * torch.empty((), dtype=dtype).element_size(), out,
                       f"writing {clips:,} demo clips [{seq_len}, {dim}]", hint="lower --per-class, --full-length or --dim")
    meta = {"source": "feda2v-tk demo"}
    if out.suffix == ".safetensors":
        emb, labels, names = make_demo_dataset(num_per_class, seq_len=seq_len, dim=dim, num_classes=num_classes,
                                               seed=seed, noise=noise, dtype=dtype, first_clip=first_clip)
        return write_dataset(out, emb, labels, class_names=names, extra_metadata=meta)
    _require_demo_memory(0, seq_len, dim, 0)  # streamed: the structure and a chunk of clips
    world = _World(seq_len, dim, seed)
    labels = _labels_for(num_per_class, num_classes)
    kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
    with DatasetWriter(out, class_names=CLASS_NAMES[:num_classes], dtype=dtype, extra_metadata=meta,
                       overwrite=overwrite, rows=len(labels), **kwargs) as writer:
        start = 0
        for rows in _clips(world, labels, seed, noise, first_clip):
            writer.add(rows, labels[start:start + rows.shape[0]])
            start += rows.shape[0]
    return out
