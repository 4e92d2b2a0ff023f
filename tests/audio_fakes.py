"""Test helpers for ``embed``: a tiny randomly initialised AST saved with ``save_pretrained`` (no download)
and synthesised audio files (WAV and FLAC, several sample rates, mono and stereo)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

#: the tiny AST: 128 mel x 116 frames -> 12 x 11 patches + 2 = 134 tokens of width 64
TINY_AST = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128,
            "max_length": 116}
TINY_TOKENS = 134


def save_tiny_ast(directory: Path, **overrides: int) -> Path:
    """Save a randomly initialised (seed 0) tiny ASTModel and its feature extractor to ``directory``."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    cfg = ASTConfig(**{**TINY_AST, **overrides})
    torch.manual_seed(0)
    ASTModel(cfg).save_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # transformers' note on empty mel filters
        ASTFeatureExtractor(max_length=cfg.max_length).save_pretrained(directory)
    return directory


def tone(freq: float, seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A sine at ``freq`` Hz with a little noise, ``[frames, channels]`` float32."""
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(seed)
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def write_audio(path: Path, data: np.ndarray, rate: int) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype="PCM_16")
    return path


def make_class_folders(root: Path) -> Path:
    """Two classes of three clips each: WAV and FLAC, 8, 16, 22.05 and 44.1 kHz, mono and stereo,
    shorter and longer than one second."""
    specs = {
        "bird": [("a.wav", 16000, 1, 1.0), ("b.flac", 44100, 2, 1.5), ("c.wav", 8000, 1, 0.6)],
        "engine": [("a.flac", 22050, 1, 1.2), ("b.wav", 44100, 2, 0.9), ("sub/c.wav", 16000, 2, 2.0)],
    }
    for i, (cls, files) in enumerate(specs.items()):
        for j, (name, rate, channels, seconds) in enumerate(files):
            write_audio(root / cls / name, tone(300.0 * (i + 1) + 40 * j, seconds, rate, channels, seed=j), rate)
    return root
