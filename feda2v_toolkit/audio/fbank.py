"""AST's filterbank features without torchaudio: transformers' numpy path, computed a clip at a time.

Without torchaudio, ``ASTFeatureExtractor`` computes its Kaldi-style log-mel filterbank with
``transformers.audio_utils.spectrogram``, which loops in Python over the ~1,000 frames of a 10 s clip: ~20-30 ms a
clip, holding the GIL, so that ``embed``'s read workers (threads) do not add up and a GPU waits for them.
:func:`clip_fbank` does the same arithmetic on all of a clip's frames at once (the same numpy operations on the
same float64 values, the same per-clip mel product, the same padding and normalisation): the same bytes, ~3x
faster on one thread, and numpy releases the GIL inside the array operations.

:class:`Featurizer` uses it only where it applies -- an extractor on that numpy path whose output on a probe
clip it reproduces bit for bit (checked once); otherwise (torchaudio installed, another extractor, a transformers
version whose numpy path changed) the extractor itself runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# transformers' ASTFeatureExtractor._extract_fbank_features, numpy path (Kaldi's defaults at 16 kHz)
FRAME, HOP, FFT, PREEMPHASIS, MEL_FLOOR = 400, 160, 512, 0.97, 1.192092955078125e-07


def clip_fbank(extractor: Any, wave: np.ndarray) -> np.ndarray:
    """The extractor's normalised, padded (or cut) log-mel features ``[max_length, mel]`` float32 of one 16 kHz
    mono waveform (at least one frame long), as its numpy path computes them."""
    x = np.asarray(wave, dtype=np.float32).astype(np.float64)
    frames = int(1 + np.floor((x.size - FRAME) / HOP))
    buf = np.zeros((frames, FFT))
    buf[:, :FRAME] = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP][:frames]
    frame = buf[:, :FRAME]
    frame -= frame.mean(axis=1, keepdims=True)  # the DC offset, per frame
    frame[:, 1:] -= PREEMPHASIS * frame[:, :-1]  # the product is a new array: the old values, as in the loop
    frame[:, 0] *= 1 - PREEMPHASIS
    frame *= extractor.window.astype(np.float64)
    spec = np.fft.rfft(buf, axis=-1).astype(np.complex64)  # the loop stores each frame's spectrum as complex64
    power = np.abs(spec, dtype=np.float64) ** 2.0
    mel = np.maximum(MEL_FLOOR, np.dot(extractor.mel_filters.T, power.T))  # one product per clip, as there
    logmel = np.asarray(np.log(mel), np.float32).T
    out = np.zeros((extractor.max_length, logmel.shape[1]), np.float32)
    kept = min(extractor.max_length, frames)
    out[:kept] = logmel[:kept]
    return extractor.normalize(out) if extractor.do_normalize else out


def _probe() -> np.ndarray:
    """0.7 s of a fixed tone and noise: frames with and without padding to check a path against."""
    t = np.arange(11_200) / 16_000
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


class Featurizer:
    """``extractor(waves)``'s ``input_values`` ``[B, max_length, mel]`` (numpy float32), through
    :func:`clip_fbank` when that gives the same bytes (checked on a probe clip when made), else the extractor."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        self.fast = self._applies()

    def _applies(self) -> bool:
        from transformers.utils import is_speech_available

        fe = self.extractor
        if is_speech_available() or not all(hasattr(fe, a) for a in ("window", "mel_filters", "normalize",
                                                                         "max_length", "do_normalize")):
            return False
        if getattr(fe, "sampling_rate", None) != 16_000 or np.shape(fe.window) != (FRAME,):
            return False
        probe = _probe()
        try:
            return bool(np.array_equal(clip_fbank(fe, probe)[None], self._slow([probe])))
        except (ValueError, TypeError, AttributeError, IndexError):
            return False

    def _slow(self, waves: list[np.ndarray]) -> np.ndarray:
        out = self.extractor(waves, sampling_rate=16_000, return_tensors="np")
        return out["input_values"] if "input_values" in out else out["audio_values"]

    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        if not self.fast or any(np.size(w) < FRAME for w in waves):  # no whole frame: the extractor's own path
            return self._slow(waves)
        return np.stack([clip_fbank(self.extractor, w) for w in waves])
