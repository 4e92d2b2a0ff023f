"""bench/corpus.py without rendering audio: its MIDI writer, AST front end and token model.

Rendering needs fluidsynth and a 140 MB soundfont, which tests never install; ``make corpus`` builds
the corpus itself and prints its sanity check.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "corpus.py"


@pytest.fixture(scope="module")
def corpus():
    spec = importlib.util.spec_from_file_location("bench_corpus", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_corpus"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_corpus"]


def test_midi_file_is_a_format_0_smf_with_events_in_time_order(corpus, tmp_path):
    path = tmp_path / "a.mid"
    corpus.write_midi(path, [(300, bytes([0x80, 60, 0])), (0, bytes([0x90, 60, 100])), (200, bytes([0xC0, 5]))])
    data = path.read_bytes()
    assert data[:4] == b"MThd" and struct.unpack(">IHHH", data[4:14]) == (6, 0, 1, 500)
    assert data[14:18] == b"MTrk" and struct.unpack(">I", data[18:22])[0] == len(data) - 22
    body = data[22:]
    assert body.index(bytes([0x90, 60, 100])) < body.index(bytes([0xC0, 5])) < body.index(bytes([0x80, 60, 0]))
    assert body.endswith(b"\x00\xff\x2f\x00")
    assert corpus._varlen(200) == bytes([0x81, 0x48])


def test_clip_notes_depend_only_on_the_clip_generator_and_stay_in_the_clip(corpus):
    a = corpus.clip_notes(corpus.clip_rng(0, 3, 7), 3)
    assert a == corpus.clip_notes(corpus.clip_rng(0, 3, 7), 3)
    assert a != corpus.clip_notes(corpus.clip_rng(0, 3, 8), 3)
    program, notes = a
    assert program in corpus.FAMILIES[3][1] and notes
    assert all(n.start >= 0 and n.start + n.length <= corpus.CLIP_SECONDS for n in notes)


def test_front_end_makes_12_by_101_frequency_major_patches_of_the_normalised_padded_fbank(corpus):
    banks = corpus.kaldi_mel_banks()
    assert banks.shape == (128, 257) and float(banks[:, -1].abs().sum()) == 0.0
    t = torch.arange(160000) / 16000
    low = torch.sin(2 * torch.pi * 200 * t).unsqueeze(0) * 0.1
    p = corpus.patches(low, banks)
    assert p.shape == (1, 1212, 256)
    row_energy = p[0].view(12, 101, 256).mean((1, 2))
    assert int(row_energy.argmax()) == 0  # a 200 Hz tone lights the lowest frequency row
    # the last time patches of every row lie in AST's zero padding (frames 998..1023)
    pad = (0 - corpus.AST_MEAN) / (2 * corpus.AST_STD)
    assert torch.allclose(p[0].view(12, 101, 16, 16)[:, -1], torch.tensor(pad))


def test_token_model_is_fixed_and_ends_in_a_layernorm_with_a_shared_bias(corpus):
    p = torch.randn(2, 1212, 256) * 0.3
    a, b = corpus.TokenModel()(p), corpus.TokenModel()(p)
    assert a.shape == (2, 1214, 768) and torch.equal(a, b)
    normalised = (a - corpus.TokenModel().bias) / corpus.TokenModel().gain
    assert torch.allclose(normalised.mean(-1), torch.zeros(2, 1214), atol=1e-4)
    assert torch.allclose(normalised.std(-1, unbiased=False), torch.ones(2, 1214), atol=1e-3)


def test_noise_is_added_at_a_finite_level(corpus):
    audio = np.zeros(16000, dtype=np.float32)
    audio[:8000] = 0.1 * np.sin(np.arange(8000) * 0.1)
    out = corpus.add_noise(corpus.clip_rng(0, 0, 0), audio)
    assert out.dtype == np.float32 and np.isfinite(out).all() and np.abs(out[8000:]).max() > 0


def test_cache_directory_follows_the_environment_variable(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv(corpus.CACHE_ENV, raising=False)
    assert corpus.cache_dir() == corpus.CACHE_DIR
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "shared"))
    path = corpus.corpus_path(per_class=200, seed=0)
    assert path == tmp_path / "shared" / f"corpus-v{corpus.CORPUS_VERSION}-s0-n200-f0"
    # a corpus already in the shared directory is reused, never rebuilt (building would need fluidsynth)
    path.mkdir(parents=True)
    (path / "part-00000.safetensors").write_bytes(b"")
    assert corpus.ensure_corpus(per_class=200, seed=0) == path


def test_neighbour_check_finds_planted_near_duplicates(corpus):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 50, generator=g)
    labels = torch.arange(40) % 2
    clean = corpus.neighbours(feats, labels)
    assert clean["near_duplicates"] == 0 and 0.8 < clean["nn_within_over_between"] < 1.25
    feats[2] = feats[0] + 1e-3 * torch.randn(50, generator=g)  # clip 2 copies clip 0 (same class)
    dup = corpus.neighbours(feats, labels)
    assert dup["near_duplicates"] == 2 and dup["nn_within_min_over_median"] < 0.01
