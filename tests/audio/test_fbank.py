"""AST's filterbank features a clip at a time: the bytes of transformers' own numpy path, or that path itself."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from transformers import ASTFeatureExtractor  # noqa: E402
from transformers.utils import is_speech_available  # noqa: E402

from feda2v_toolkit.audio.fbank import Featurizer, clip_fbank  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")

needs_numpy_path = pytest.mark.skipif(is_speech_available(), reason="torchaudio installed: the extractor's "
                                                                      "features come from torchaudio, not numpy")


def waves() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(16_000) / 16_000
    return [
        (0.1 * rng.standard_normal(16_000)).astype(np.float32),           # 98 frames: padded
        np.zeros(16_000, np.float32),                                      # silence: the mel floor
        (20_000 * rng.standard_normal(17_000)).astype(np.float32),         # loud, int16-like scale
        (0.5 * np.sin(2 * np.pi * 1000 * t) + 0.2).astype(np.float32),     # a tone with a DC offset
        (0.1 * rng.standard_normal(400)).astype(np.float32),               # exactly one frame
    ]


def extractor_output(fe, clips) -> np.ndarray:
    return fe(clips, sampling_rate=16_000, return_tensors="np")["input_values"]


@needs_numpy_path
@pytest.mark.parametrize("settings", [
    {"max_length": 1024},                                        # AST's: every clip padded
    {"max_length": 40, "num_mel_bins": 64},                      # cut to 40 frames, fewer bins
    {"max_length": 120, "do_normalize": False},
])
def test_a_clip_at_a_time_gives_the_bytes_of_the_extractor(settings):
    fe = ASTFeatureExtractor(**settings)
    clips = waves()
    assert np.array_equal(np.stack([clip_fbank(fe, w) for w in clips]), extractor_output(fe, clips))
    featurizer = Featurizer(fe)
    assert featurizer.fast
    out = featurizer(clips)
    assert out.dtype == np.float32 and np.array_equal(out, extractor_output(fe, clips))


@needs_numpy_path
def test_an_extractor_whose_numpy_path_differs_is_used_as_it_is():
    class Changed(ASTFeatureExtractor):  # e.g. a transformers version that changed its framing
        def _extract_fbank_features(self, waveform, max_length):
            return super()._extract_fbank_features(waveform[80:], max_length)

    fe = Changed(max_length=100)
    featurizer = Featurizer(fe)
    assert not featurizer.fast
    clips = waves()[:2]
    assert np.array_equal(featurizer(clips), extractor_output(fe, clips))


def test_clips_shorter_than_a_frame_go_to_the_extractor():
    fe = ASTFeatureExtractor(max_length=50)
    featurizer = Featurizer(fe)
    short = [np.zeros(100, np.float32)]
    try:
        expected = extractor_output(fe, short)
    except ValueError as e:  # the extractor's own answer, whatever it is
        with pytest.raises(type(e)):
            featurizer(short)
    else:
        assert np.array_equal(featurizer(short), expected)
