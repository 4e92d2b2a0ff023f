"""A benchmark corpus with real structure: AST-shaped embeddings of recorded (synthesised) instrument notes.

    python bench/corpus.py -o PATH [--per-class 32] [--seed 0] [--first-clip 0] [--overwrite] [--check]
    make corpus            # builds the default corpus into bench/.cache/ and prints the sanity check
    FEDA2V_BENCH_CACHE=/work/bench-cache nice -n 10 python bench/corpus.py --per-class 200 --check

    from bench.corpus import ensure_corpus   # (or put bench/ on sys.path and ``import corpus``)
    path = ensure_corpus(per_class=32, seed=0)   # built once into the cache directory, then reused

The cache directory is ``$FEDA2V_BENCH_CACHE`` when set (read at every call), else ``bench/.cache/``:
point several worktrees at one directory to build each corpus once. Entries are named
``corpus-v{CORPUS_VERSION}-s{seed}-n{per_class}-f{first_clip}`` and written atomically, so a stale
version is never reused and two processes building the same corpus do not corrupt it.

Why: the toolkit's synthetic demo data (``feda2v_toolkit/demo.py``) has none of the structure of real
AST embeddings; generators, upsamplers and ``analyze`` tuned on it fail on embeddings of real sound. This
corpus is made from real recorded instrument samples and an AST-like front end, so benchmarks meet the
real difficulties (a strong shared positional pattern, low-rank correlated features, LayerNorm scaling
with a few high-gain dimensions, padding frames, background noise) while staying fully reproducible
with no download at run time beyond the two Debian packages.

Audio. Twelve classes, one per General MIDI instrument family (piano, chromatic percussion, organ,
guitar, bass, strings, brass, reed, pipe, synth lead, synth pad, ethnic), rendered from the Fluid R3 GM
soundfont (sampled recordings of real instruments; Debian ``fluid-soundfont-gm``) with the ``fluidsynth``
CLI at 16 kHz, reverb and chorus off, 32-bit float output (no dither), mono downmix. Each 10 s clip draws,
from its own random generator (seeded by ``(version, seed, class, clip)``): the program among two typical
members of the family, a phrase of 1-6 notes on a major or minor scale from a base pitch within 3
semitones of the family's register (sometimes as thirds), velocities, short or long notes and gaps, an
onset of 0-3 s, the phrase repeated 1-3 times or until the clip ends, an overall level of -30..-6 dB,
and white / pink / brown background noise at an SNR of 15-35 dB. The MIDI files come from a small SMF
writer here; one ``fluidsynth`` call renders up to 16 clips of a class, each in its own 12 s slot (10 s
clip + 2 s of silence). fluidsynth keeps a little state from slot to slot (voice reuse), so clip ``j``
is always rendered in slot ``j % 16`` after the same clips ``16 * (j // 16) ..`` of its class: a clip's
content is bit for bit the same whatever ``--per-class`` / ``--first-clip`` ask for (checked). The tools
are installed with apt when missing and running as root.

Front end, as AST's (``torchaudio.compliance.kaldi.fbank`` re-implemented in torch): 25 ms Hann
frames every 10 ms (snip edges), DC removal, pre-emphasis 0.97, 512-point power spectrum, 128 Kaldi mel
bins (20 Hz .. 8 kHz), log; the 998 frames of a 10 s clip are zero-padded to 1024 (as AST pads) and
normalised with AST's AudioSet statistics ``(fbank + 4.2677393) / (2 * 4.5689974)``. The ``[128, 1024]``
(frequency, time) image is cut into 16 x 16 patches with stride 10: 12 x 101 = 1212 patches, flattened
frequency-major (token ``2 + f * 101 + t``); the last 2-3 time patches of every row are padding.

Tokens (fixed random weights from a generator seeded by the corpus version, not by ``--seed``: every
corpus shares one "model"): each 256-value patch is mapped to 768 by a scaled random orthogonal
projection plus a bias, and a strong smooth position code (a random low-frequency function of the
frequency row plus one of the time column) is added. Two summary tokens (AST's cls/dist) are fixed
vectors plus projections of the clip's mean patch token. A deterministic "contextualisation" stands in
for AST's 12 attention layers: every token gets a projection of the clip's mean token and of the mean of
its 5 time neighbours, then a GELU MLP residual block (LayerNorm, 768 -> 1536 -> 768), and finally a
per-token LayerNorm with a fixed gain (about 1, with 6 "massive activation" dimensions at gain 16-32)
and a fixed bias (a strong pattern shared by all tokens). Because the LayerNorm divides by each token's
spread, content modulates how strongly the positional pattern shows -- the coupling that makes a
classifier trained on smoothed (reduced + interpolated) sequences misjudge real ones. Output ``[N,
1214, 768]`` float16 in the toolkit's dataset format: a shard directory written by ``DatasetWriter``
(labels index the family names in the metadata), class by class, clip by clip.

Measured (12 classes x 32 clips, seed 0; 2 shared CPU cores: build 115 s wall, 40 s CPU (82 s wall
on a rebuild at load ~3); 716 MB):
the tokens' mean over clips holds 98% of their variance and 10 principal directions of the 768
features hold 98% (the high-gain dimensions dominate). ``--check`` (ridge classifier of
``feda2v_toolkit.analysis.classifier`` on ``pooled_features(x, 64)`` of the full sequences, trained on
the first 16 clips of each class, tested on the other 16; chance 0.083):

* real-only accuracy: 0.583 (seed 1: 0.552),
* reduced to 16 tokens by ``adaptive_avg``, back to 1214 by ``linear``, trained on those and tested on
  real sequences: 0.109 (seed 1: 0.359), while 0.630 (0.620) when tested on interpolated ones -- the
  known failure. The size of the drop varies with the clips; measure on more than one seed.

The larger corpus, 12 classes x 200 clips (seed 0; the same generator as above, so its first 32 clips
of each class are the 32-clip corpus bit for bit): build 344 s wall (nice 10, 2 shared cores, load
~2-3; 347 s user + 145 s system CPU), ``--check`` 37-42 s more, 4.2 GB on disk, peak RSS 4.0 GB
(build and check in one process). ``--check`` there trains on the first 100 clips of each class and tests on the other
100:

* real-only accuracy: 0.801 (chance 0.083) -- more training clips than the 32-clip corpus's 0.583,
  not saturated;
* ``adaptive_avg`` 16 + ``linear``: 0.255 on real sequences, 0.878 on interpolated ones;
* near-duplicates (:func:`neighbours`, on the same pooled features): a clip's nearest clip of its own
  class lies at a median distance of 21.6, its nearest clip of another class at 21.7 (ratio 0.99: a
  class is no tighter cluster than the corpus as a whole -- the classes are told apart by a linear
  read-out, 1-NN accuracy is 0.49); the closest same-class pair lies at 0.29 x the median distance and
  no clip's nearest same-class neighbour is within 0.25 x (0 near-duplicates). The closest pairs are
  different performances (bass clips 184 / 194: finger vs acoustic bass, 6 notes on 3 pitches vs 2 on
  one). As a yardstick (a one-off check, not in ``--check``): the same notes rendered again with another
  level and background noise lie at 0.07-10.7 x (median 2.4 x) that median distance -- level and noise
  move a clip more than its notes do, as with recordings. 32-clip corpus: ratio 1.10, closest pair
  0.32 x, 0 near-duplicates, 1-NN 0.33. The clip content was not changed for the larger corpus
  (``CORPUS_VERSION`` stays 1).

Development notes: with all eight members of each family and 2-3 octave pitch ranges the real-only
accuracy was 0.18; with three members 0.46-0.50.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.errors import UsageError

#: bump when the corpus content changes (the cache key includes it)
CORPUS_VERSION = 1
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
APT_PACKAGES = ("fluidsynth", "fluid-soundfont-gm")
#: where ``ensure_corpus`` keeps built corpora; ``FEDA2V_BENCH_CACHE`` overrides it (read at each call) so
#: that several worktrees can share one directory
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CACHE_ENV = "FEDA2V_BENCH_CACHE"

SAMPLE_RATE = 16000
CLIP_SECONDS = 10.0
SLOT_SECONDS = 12.0  # clip + 2 s of silence for release tails; a multiple of 64 samples
CLIPS_PER_RENDER = 16
NUM_FRAMES = 1024
NUM_MELS = 128
SEQ_LEN = 1214
DIM = 768
PATCH = 16
STRIDE = 10
F_PATCHES = (NUM_MELS - PATCH) // STRIDE + 1  # 12
T_PATCHES = (NUM_FRAMES - PATCH) // STRIDE + 1  # 101
AST_MEAN, AST_STD = -4.2677393, 4.5689974

#: (class name, GM programs (0-based) drawn from, lowest and highest base pitch): two typical members
#: of each family and a base pitch within 3 semitones of the family's typical register (see the module
#: docstring's development notes).
FAMILIES: tuple[tuple[str, tuple[int, ...], int, int], ...] = (
    ("piano", (0, 1), 57, 63),  # acoustic grand, bright acoustic
    ("chromatic_percussion", (8, 9), 76, 82),  # celesta, glockenspiel
    ("organ", (16, 17), 52, 58),  # drawbar, percussive
    ("guitar", (24, 25), 51, 57),  # nylon, steel
    ("bass", (32, 33), 32, 38),  # acoustic, finger
    ("strings", (40, 41), 64, 70),  # violin, viola
    ("brass", (56, 57), 54, 60),  # trumpet, trombone
    ("reed", (65, 66), 61, 67),  # alto sax, tenor sax
    ("pipe", (72, 73), 74, 80),  # piccolo, flute
    ("synth_lead", (80, 81), 66, 72),  # square, sawtooth
    ("synth_pad", (88, 89), 51, 57),  # new age, warm
    ("ethnic", (104, 105), 62, 68),  # sitar, banjo
)
CLASS_NAMES = [f[0] for f in FAMILIES]


# ----------------------------------------------------------------------------- MIDI


@dataclass
class Note:
    start: float  # seconds from the clip start
    length: float
    pitch: int
    velocity: int


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def write_midi(path: Path, events: list[tuple[int, bytes]], *, division: int = 500) -> None:
    """Write a format-0 SMF: ``events`` are ``(absolute tick, message bytes)``; tempo 1 tick = 1 ms."""
    track = bytearray(b"\x00\xff\x51\x03" + (division * 1000).to_bytes(3, "big"))  # tempo: us per quarter
    now = 0
    for tick, msg in sorted(events, key=lambda e: (e[0], e[1][0] & 0xF0 == 0x90)):  # offs before ons
        track += _varlen(tick - now) + msg
        now = tick
    track += b"\x00\xff\x2f\x00"
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, division)
    path.write_bytes(header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


def clip_notes(rng: np.random.Generator, family: int) -> tuple[int, list[Note]]:
    """Draw one clip's program and notes (see the module docstring)."""
    _, programs, lo, hi = FAMILIES[family]
    program = programs[int(rng.integers(len(programs)))]
    scale = (0, 2, 4, 5, 7, 9, 11) if rng.random() < 0.6 else (0, 2, 3, 5, 7, 8, 10)
    base = int(rng.integers(lo, hi + 1))
    n_notes = int(rng.integers(1, 7))
    degrees = np.cumsum(np.concatenate([[0], rng.integers(-2, 3, n_notes - 1)]))
    chord = rng.random() < 0.25
    level = int(rng.integers(50, 121))
    short = rng.random() < 0.5
    phrase: list[tuple[float, float, list[int], int]] = []
    t = 0.0
    for deg in degrees:
        octave, step = divmod(int(deg), 7)
        pitch = base + 12 * octave + scale[step]
        length = float(rng.uniform(0.08, 0.5) if short else rng.uniform(0.3, 1.6))
        pitches = [pitch, pitch + scale[(step + 2) % 7] - scale[step] + (12 if step + 2 >= 7 else 0)] \
            if chord else [pitch]
        vel = int(np.clip(level + rng.integers(-15, 16), 20, 127))
        phrase.append((t, length, pitches, vel))
        t += length * float(rng.uniform(0.7, 1.6))
    phrase_len = t
    onset = float(rng.uniform(0.0, 3.0))
    repeats = int(rng.integers(1, 4)) if rng.random() < 0.3 else 100  # mostly: until the clip ends
    gap = float(rng.uniform(0.1, 1.0))
    notes = []
    for r in range(repeats):
        t0 = onset + r * (phrase_len + gap)
        for start, length, pitches, vel in phrase:
            if t0 + start >= CLIP_SECONDS - 0.2:
                break
            end = min(t0 + start + length, CLIP_SECONDS - 0.1)
            notes.extend(Note(t0 + start, end - t0 - start, int(np.clip(p, 21, 108)), vel) for p in pitches)
    return program, notes


def render(jobs: Sequence[tuple[int, list[Note]]], workdir: Path) -> np.ndarray:
    """Render clips ``(program, notes)`` with fluidsynth, one per slot: ``[len(jobs), clip samples]`` float32.

    A slot's audio does not depend on later slots, but (slightly) on earlier ones.
    """
    events: list[tuple[int, bytes]] = []
    for k, (program, notes) in enumerate(jobs):
        slot = int(round((k + 1) * SLOT_SECONDS * 1000))  # slot 0 stays empty: the player's start-up
        # the same near-silent note before every clip: the first note then sounds the same whatever came before
        events.append((slot - 1200, bytes([0xB0, 121, 0])))  # reset controllers
        events.append((slot - 1200, bytes([0xC0, program])))
        events.append((slot - 1100, bytes([0x90, 60, 1])))
        events.append((slot - 1000, bytes([0x80, 60, 0])))
        events.append((slot - 500, bytes([0xB0, 120, 0])))  # all sound off
        for n in notes:
            on = slot + 1 + int(round(n.start * 1000))
            off = max(on + 1, slot + 1 + int(round((n.start + n.length) * 1000)))
            events.append((on, bytes([0x90, n.pitch, n.velocity])))
            events.append((off, bytes([0x80, n.pitch, 0])))
        events.append((slot + int(CLIP_SECONDS * 1000) + 500, bytes([0xB0, 120, 0])))  # all sound off
    # a last event one slot later so that fluidsynth renders the final slot fully
    events.append((int(round((len(jobs) + 1) * SLOT_SECONDS * 1000)), bytes([0xB0, 123, 0])))
    fd, name = tempfile.mkstemp(suffix=".mid", dir=workdir)
    os.close(fd)
    mid, wav = Path(name), Path(name).with_suffix(".wav")
    try:
        write_midi(mid, events)
        cmd = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.5", "-r", str(SAMPLE_RATE),
               "-O", "float", "-T", "wav", "-F", str(wav), str(SOUNDFONT), str(mid)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wav.exists():
            raise RuntimeError(f"fluidsynth failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        audio = read_float_wav(wav)
    finally:
        mid.unlink(missing_ok=True)
        wav.unlink(missing_ok=True)
    slot_n, clip_n = int(SLOT_SECONDS * SAMPLE_RATE), int(CLIP_SECONDS * SAMPLE_RATE)
    need = (len(jobs) + 1) * slot_n
    if audio.shape[0] < need:
        audio = np.pad(audio, (0, need - audio.shape[0]))
    return np.stack([audio[(k + 1) * slot_n: (k + 1) * slot_n + clip_n] for k in range(len(jobs))])


def read_float_wav(path: Path) -> np.ndarray:
    """Mono float32 samples of a 32-bit float (or 16-bit PCM) WAV file (channels averaged)."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"{path}: not a WAV file")
    pos, channels, bits, fmt, samples = 12, 1, 16, 1, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt, channels = struct.unpack("<HH", body[:4])
            bits = struct.unpack("<H", body[14:16])[0]
            if fmt == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes
                fmt = struct.unpack("<H", body[24:26])[0]
        elif cid == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    if samples is None:
        raise RuntimeError(f"{path}: no data chunk")
    if fmt == 3 and bits == 32:
        x = np.frombuffer(samples[: len(samples) // 4 * 4], dtype="<f4")
    elif fmt == 1 and bits == 16:
        x = np.frombuffer(samples[: len(samples) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    else:
        raise RuntimeError(f"{path}: unsupported WAV format {fmt}/{bits} bits")
    x = x[: len(x) // channels * channels].reshape(-1, channels)
    return x.mean(1).astype(np.float32)


def add_noise(rng: np.random.Generator, audio: np.ndarray) -> np.ndarray:
    """Scale to a random level and add white / pink / brown noise at a random SNR (rng drawn after the notes)."""
    level_db = rng.uniform(-30.0, -6.0)
    snr_db = rng.uniform(15.0, 35.0)
    colour = int(rng.integers(3))
    white = rng.standard_normal(audio.shape[0] + 1024)
    if colour == 0:
        noise = white[:audio.shape[0]]
    else:
        spec = np.fft.rfft(white)
        f = np.maximum(np.fft.rfftfreq(white.shape[0]), 1.0 / white.shape[0])
        spec /= f ** (0.5 * colour)  # 1/f (pink) or 1/f^2 (brown) power
        noise = np.fft.irfft(spec, white.shape[0])[:audio.shape[0]]
    active = audio[np.abs(audio) > 1e-4]
    sig_power = float(np.mean(active.astype(np.float64) ** 2)) if active.size else 0.0
    if sig_power <= 0:
        sig_power = 1e-6
    out = audio / math.sqrt(sig_power) * 10 ** (level_db / 20)
    noise = noise / math.sqrt(float(np.mean(noise ** 2))) * 10 ** ((level_db - snr_db) / 20)
    return (out + noise).astype(np.float32)


# ----------------------------------------------------------------------------- front end


def _mel(f: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(f / 700.0)


def kaldi_mel_banks(num_bins: int = NUM_MELS, n_fft: int = 512, sample_rate: int = SAMPLE_RATE,
                    low: float = 20.0, high: float = 0.0) -> Tensor:
    """Kaldi's triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (the Nyquist column is zero)."""
    high = high if high > 0 else sample_rate / 2 + high
    mel_low, mel_high = _mel(torch.tensor(low, dtype=torch.float64)), _mel(torch.tensor(high, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64)).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1)).float()


def fbank(wave: Tensor, banks: Tensor) -> Tensor:
    """``torchaudio.compliance.kaldi.fbank`` as AST calls it: ``[B, samples] -> [B, frames, 128]`` log mel."""
    frames = wave.unfold(1, 400, 160)  # snip edges
    frames = frames - frames.mean(2, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], 2)
    frames = frames - 0.97 * prev
    window = torch.hann_window(400, periodic=False, dtype=wave.dtype)
    spec = torch.fft.rfft(frames * window, n=512).abs().square()
    energies = spec @ banks.T
    return torch.log(energies.clamp(min=torch.finfo(torch.float32).eps))


def patches(wave: Tensor, banks: Tensor) -> Tensor:
    """``[B, samples] -> [B, 1212, 256]``: AST's normalised, padded fbank cut into 16x16 patches (stride 10)."""
    fb = fbank(wave, banks)
    n = fb.shape[1]
    fb = F.pad(fb, (0, 0, 0, NUM_FRAMES - n)) if n < NUM_FRAMES else fb[:, :NUM_FRAMES]
    fb = (fb - AST_MEAN) / (2 * AST_STD)
    img = fb.transpose(1, 2)  # [B, 128 freq, 1024 time]
    p = img.unfold(1, PATCH, STRIDE).unfold(2, PATCH, STRIDE)  # [B, 12, 101, 16, 16]
    return p.reshape(wave.shape[0], F_PATCHES * T_PATCHES, PATCH * PATCH)


# ----------------------------------------------------------------------------- token model


class TokenModel:
    """The fixed random "AST" that turns patches into ``[B, 1214, 768]`` tokens (see the module docstring)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(9_000 + CORPUS_VERSION)

        def randn(*shape: int, scale: float = 1.0) -> Tensor:
            return torch.randn(*shape, generator=g) * scale

        q, _ = torch.linalg.qr(randn(DIM, PATCH * PATCH))
        self.proj = q.T.contiguous() * math.sqrt(DIM / (PATCH * PATCH)) * 2.0  # [256, 768], orthogonal rows
        self.proj_bias = randn(DIM, scale=0.3)
        # smooth position code: low-frequency random functions of the frequency row and time column
        f = torch.arange(F_PATCHES, dtype=torch.float32) / F_PATCHES
        t = torch.arange(T_PATCHES, dtype=torch.float32) / T_PATCHES
        kf = torch.arange(1, 5, dtype=torch.float32)
        kt = torch.arange(1, 9, dtype=torch.float32)
        f_basis = torch.cat([torch.cos(math.pi * kf[:, None] * f), torch.sin(math.pi * kf[:, None] * f)]).T
        t_basis = torch.cat([torch.cos(math.pi * kt[:, None] * t), torch.sin(math.pi * kt[:, None] * t)]).T
        f_code = f_basis @ randn(f_basis.shape[1], DIM, scale=3.0)
        t_code = t_basis @ randn(t_basis.shape[1], DIM, scale=1.5)
        self.pos = (f_code[:, None, :] + t_code[None, :, :]).reshape(F_PATCHES * T_PATCHES, DIM)
        self.summary = randn(2, DIM, scale=1.0)
        self.summary_proj = randn(2, DIM, DIM, scale=1.0 / math.sqrt(DIM))
        self.global_mix = randn(DIM, DIM, scale=0.5 / math.sqrt(DIM))
        self.local_mix = randn(DIM, DIM, scale=0.5 / math.sqrt(DIM))
        hidden = 2 * DIM
        self.w1 = randn(DIM, hidden, scale=1.0 / math.sqrt(DIM))
        self.b1 = randn(hidden, scale=0.5)
        self.w2 = randn(hidden, DIM, scale=1.0 / math.sqrt(hidden))
        gain = 1.0 + 0.25 * randn(DIM)
        loud = torch.randperm(DIM, generator=g)[:6]
        gain[loud] = torch.linspace(16.0, 32.0, 6) * torch.sign(randn(6))
        self.gain = gain
        self.bias = randn(DIM, scale=1.0)
        self.bias[loud] = randn(6, scale=6.0)

    def __call__(self, p: Tensor) -> Tensor:
        """``[B, 1212, 256]`` patches -> ``[B, 1214, 768]`` float32 tokens."""
        h = p @ self.proj + self.proj_bias + self.pos  # [B, 1212, 768]
        mean = h.mean(1, keepdim=True)
        grid = h.view(h.shape[0], F_PATCHES, T_PATCHES, DIM)
        neigh = F.avg_pool2d(grid.permute(0, 3, 1, 2), (1, 5), stride=1, padding=(0, 2),
                             count_include_pad=False).permute(0, 2, 3, 1).reshape_as(h)
        h = h + mean @ self.global_mix + neigh @ self.local_mix
        summary = self.summary + torch.einsum("bd,kde->bke", mean[:, 0], self.summary_proj)
        h = torch.cat([summary, h], 1)
        z = F.layer_norm(h, (DIM,))
        h = h + F.gelu(z @ self.w1 + self.b1) @ self.w2
        return F.layer_norm(h, (DIM,)) * self.gain + self.bias


# ----------------------------------------------------------------------------- building


def ensure_tools() -> None:
    """Install fluidsynth and the Fluid R3 GM soundfont with apt when missing (needs root)."""
    if shutil.which("fluidsynth") and SOUNDFONT.exists():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(APT_PACKAGES)} with apt-get ...", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False).returncode:
                break
    if not (shutil.which("fluidsynth") and SOUNDFONT.exists()):
        raise SystemExit(f"corpus: needs fluidsynth and {SOUNDFONT}: apt-get install -y {' '.join(APT_PACKAGES)}")


def clip_rng(seed: int, family: int, clip: int) -> np.random.Generator:
    return np.random.default_rng([CORPUS_VERSION, seed, family, clip])


def iter_corpus(per_class: int, seed: int, first_clip: int = 0,
                batch: int = CLIPS_PER_RENDER) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(tokens [b, 1214, 768] float32, labels [b])`` class by class, clip by clip."""
    ensure_tools()
    model = TokenModel()
    banks = kaldi_mel_banks()
    # Clip j of a class is always rendered in slot j % batch of the batch of that class's clips
    # batch * (j // batch) ..: fluidsynth keeps a little state from one slot to the next (voice reuse),
    # so a clip renders bit for bit the same whatever --per-class / --first-clip ask for.
    last = first_clip + per_class
    chunks = [[(c, j) for j in range(b * batch, min((b + 1) * batch, last))]
              for c in range(len(FAMILIES)) for b in range(first_clip // batch, (last - 1) // batch + 1)]

    def draw(chunk: list[tuple[int, int]]) -> tuple[list[np.random.Generator], np.ndarray]:
        rngs = [clip_rng(seed, c, j) for c, j in chunk]
        notes = [clip_notes(r, c) for r, (c, _) in zip(rngs, chunk, strict=True)]
        with tempfile.TemporaryDirectory(prefix="feda2v-corpus-") as tmp:
            audio = render(notes, Path(tmp))
        return rngs, audio

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(draw, ch) for ch in chunks[:2]]
        for i, chunk in enumerate(chunks):
            rngs, audio = futures[i].result()
            if i + 2 < len(chunks):
                futures.append(pool.submit(draw, chunks[i + 2]))
            keep = [k for k, (_, j) in enumerate(chunk) if j >= first_clip]
            wave = torch.from_numpy(np.stack([add_noise(rngs[k], audio[k]) for k in keep]))
            wave = wave - wave.mean(1, keepdim=True)
            with torch.no_grad():
                tokens = model(patches(wave, banks))
            yield tokens, torch.tensor([chunk[k][0] for k in keep])


def build_corpus(out: Path, per_class: int = 32, seed: int = 0, first_clip: int = 0, *,
                 quiet: bool = False) -> Path:
    """Write the corpus as a shard directory at ``out`` (absent or empty), all or nothing."""
    from feda2v_toolkit.data import DatasetWriter

    t0 = time.perf_counter()
    total = per_class * len(FAMILIES)
    meta = {"corpus": "bench/corpus.py", "corpus_version": str(CORPUS_VERSION), "seed": str(seed),
            "per_class": str(per_class), "first_clip": str(first_clip)}
    done = 0
    with DatasetWriter(out, class_names=CLASS_NAMES, dtype=torch.float16, extra_metadata=meta) as writer:
        for tokens, labels in iter_corpus(per_class, seed, first_clip):
            writer.add(tokens, labels, copy=False)
            done += labels.shape[0]
            if not quiet:
                print(f"\r  {done}/{total} clips  {time.perf_counter() - t0:.0f}s", end="", file=sys.stderr)
    if not quiet:
        print(file=sys.stderr)
        print(f"corpus: {total} clips ({len(FAMILIES)} classes x {per_class}) x [{SEQ_LEN}, {DIM}] float16 "
              f"-> {out} in {time.perf_counter() - t0:.1f}s")
    return out


def cache_dir() -> Path:
    """``$FEDA2V_BENCH_CACHE`` when set (and not empty), else ``bench/.cache/``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else CACHE_DIR


def corpus_path(per_class: int = 32, seed: int = 0, first_clip: int = 0) -> Path:
    """Where :func:`ensure_corpus` keeps this corpus (the name holds the corpus version)."""
    return cache_dir() / f"corpus-v{CORPUS_VERSION}-s{seed}-n{per_class}-f{first_clip}"


def ensure_corpus(per_class: int = 32, seed: int = 0, first_clip: int = 0, *, quiet: bool = False) -> Path:
    """The corpus's cached shard directory under :func:`cache_dir`, built on first use (atomically)."""
    path = corpus_path(per_class, seed, first_clip)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return build_corpus(path, per_class, seed, first_clip, quiet=quiet)
    except (OSError, UsageError):
        if path.is_dir() and any(path.glob("*.safetensors")):
            return path  # another process finished the same corpus first
        raise


# ----------------------------------------------------------------------------- sanity check


def neighbours(feats: Tensor, labels: Tensor, *, duplicate: float = 0.25) -> dict[str, float]:
    """Near-duplicate check: each clip's Euclidean distance to its nearest other clip of its own class
    ("within") and of any other class ("between"), on the classifier's features.

    Returned: the medians of both and their ratio (near 1: a class's clips are no closer to each other than
    to other classes' clips; far below 1 would mean clusters of copies); the smallest within-class distance
    over the median one; the number of clips whose nearest same-class clip lies closer than ``duplicate``
    times that median ("near-duplicates"); and the 1-nearest-neighbour accuracy (leave one out).
    """
    x = feats.float() - feats.float().mean(0)
    sq = x.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).double().clamp(min=0)
    d2.fill_diagonal_(math.inf)
    same = labels[:, None] == labels[None, :]
    within = d2.masked_fill(~same, math.inf).min(1).values.sqrt()
    between = d2.masked_fill(same, math.inf).min(1).values.sqrt()
    med_w, med_b = float(within.median()), float(between.median())
    return {"nn_within_median": med_w, "nn_between_median": med_b, "nn_within_over_between": med_w / med_b,
            "nn_within_min_over_median": float(within.min()) / med_w,
            "near_duplicates": float((within < duplicate * med_w).sum()),
            "nn1_accuracy": float((within < between).double().mean())}


def check(path: Path, *, length: int = 16, positions: int = 64) -> dict[str, float]:
    """Real-only ridge accuracy (half of each class trains, half tests), the adaptive_avg -> linear loss and
    the near-duplicate check (:func:`neighbours`)."""
    from feda2v_toolkit.analysis.classifier import RidgeClassifier, pooled_features
    from feda2v_toolkit.data import open_dataset
    from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

    ds = open_dataset(path)
    train_mask = torch.zeros(len(ds), dtype=torch.bool)
    for c in range(ds.num_classes):
        idx = torch.nonzero(ds.labels == c).flatten()
        train_mask[idx[: len(idx) // 2]] = True
    real, interp = [], []
    for batch in ds.batches(32):
        x = batch.embeddings
        real.append(pooled_features(x, positions))
        reduced = F.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2)
        interp.append(pooled_features(interpolate_sequence(reduced, ds.seq_len, "linear"), positions))
    feats, ifeats = torch.cat(real), torch.cat(interp)
    y = ds.labels
    tr, te = train_mask, ~train_mask
    clf = RidgeClassifier(ds.num_classes).fit(feats[tr], y[tr])
    clf_i = RidgeClassifier(ds.num_classes).fit(ifeats[tr], y[tr])
    return {"chance": 1.0 / ds.num_classes, "real_accuracy": clf.accuracy(feats[te], y[te]),
            f"adaptive_avg{length}_linear_accuracy": clf_i.accuracy(feats[te], y[te]),
            f"adaptive_avg{length}_linear_on_interpolated": clf_i.accuracy(ifeats[te], y[te]),
            **neighbours(feats, y)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path,
                    help=f"output shard directory (default: the cached corpus under ${CACHE_ENV}, else bench/.cache/)")
    ap.add_argument("--per-class", type=int, default=32, help="clips per class (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-clip", type=int, default=0, help="index of the first clip of each class")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--check", action="store_true", help="print the classifier sanity check afterwards")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.per_class < 2 or args.first_clip < 0:
        ap.error("--per-class must be >= 2 and --first-clip >= 0")
    t0 = time.perf_counter()
    if args.out is None:
        path = ensure_corpus(args.per_class, args.seed, args.first_clip, quiet=args.quiet)
    else:
        path = args.out
        if path.exists():
            if not args.overwrite:
                print(f"corpus: {path}: exists (use --overwrite to replace it)", file=sys.stderr)
                return 2
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        build_corpus(path, args.per_class, args.seed, args.first_clip, quiet=args.quiet)
    if args.check:
        t1 = time.perf_counter()
        figures = check(path)
        print("check: " + ", ".join(f"{k} {v:.0f}" if k == "near_duplicates" else f"{k} {v:.3f}"
                                    for k, v in figures.items())
              + f" ({time.perf_counter() - t1:.1f}s)")
    if not args.quiet:
        print(f"path: {path}\ntotal time {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
