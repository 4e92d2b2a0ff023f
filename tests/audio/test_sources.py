"""Audio sources (class folders, manifests, saved datasets) and clip reading (downmix, resample, pad/crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from audio_fakes import make_class_folders, tone, write_audio

pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from feda2v_toolkit.audio.sources import AudioError, ClipPolicy, load_clip, open_source, real_frames, require  # noqa: E402
from feda2v_toolkit.errors import InputError, UsageError  # noqa: E402


def test_folder_source_lists_classes_and_clips_in_a_fixed_order(tmp_path):
    src = open_source(make_class_folders(tmp_path))
    assert src.class_names == ["bird", "engine"]
    assert [c.id for c in src.clips] == ["bird/a.wav", "bird/b.flac", "bird/c.wav",
                                        "engine/a.flac", "engine/b.wav", "engine/sub/c.wav"]
    assert [c.label for c in src.clips] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (22050, 2), (44100, 2), (48000, 1)])
def test_clips_are_16khz_mono_and_exactly_clip_seconds(tmp_path, rate, channels):
    path = write_audio(tmp_path / "a.flac", tone(440, 0.7, rate, channels), rate)
    wave, real = load_clip(path, ClipPolicy(1.0))
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert abs(real - 0.7 * 16000) <= 2 and not wave[real:].any()  # zero-padded at the end
    spectrum = np.abs(np.fft.rfft(wave[:real]))
    assert abs(np.argmax(spectrum) * 16000 / real - 440) < 5  # the tone survives resampling


def test_stereo_is_the_mean_of_the_channels(tmp_path):
    data = np.zeros((16000, 2), dtype=np.float32)
    data[:, 0] = tone(440, 1.0, 16000)[:, 0]
    path = write_audio(tmp_path / "a.wav", data, 16000)
    wave, _ = load_clip(path, ClipPolicy(1.0))
    np.testing.assert_allclose(wave, data[:, 0] / 2, atol=1e-4)


def test_long_clips_are_cropped_from_the_start_or_the_centre(tmp_path):
    data = np.concatenate([np.full((16000, 1), 0.1), np.full((16000, 1), 0.2), np.full((16000, 1), 0.3)])
    path = write_audio(tmp_path / "a.wav", data.astype(np.float32), 16000)
    start, real = load_clip(path, ClipPolicy(1.0))
    centre, _ = load_clip(path, ClipPolicy(1.0, crop="center"))
    assert real == 16000
    assert np.allclose(start, 0.1, atol=1e-3) and np.allclose(centre, 0.2, atol=1e-3)


def test_empty_and_unreadable_files_raise_audio_error(tmp_path):
    empty = write_audio(tmp_path / "e.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    (tmp_path / "x.wav").write_bytes(b"not audio")
    with pytest.raises(AudioError, match="empty"):
        load_clip(empty, ClipPolicy(1.0))
    with pytest.raises(AudioError, match="unreadable"):
        load_clip(tmp_path / "x.wav", ClipPolicy(1.0))


def test_samples_far_beyond_the_audio_range_are_refused_before_the_filterbank(tmp_path):
    """Finite float samples of 3e38 overflow the filterbank's powers: refused, not embedded as NaN rows; a float
    file a little beyond [-1, 1], or at integer scale, is read."""
    import soundfile as sf

    for peak, refused in ((3e38, True), (1.5, False), (32767.0, False)):
        path = tmp_path / f"f{peak:g}.wav"
        sf.write(path, np.full(8000, peak, dtype=np.float32), 16000, subtype="FLOAT")
        if refused:
            with pytest.raises(AudioError, match="samples reach 3e\\+38 in magnitude"):
                load_clip(path, ClipPolicy(1.0))
        else:
            assert float(np.abs(load_clip(path, ClipPolicy(1.0))[0]).max()) == pytest.approx(peak)


def test_real_frames_follow_the_fbank_framing():
    assert real_frames(16000, 1024) == 98  # 1 + (16000 - 400) // 160
    assert real_frames(80000, 1024) == 498  # a 5 s clip fills about half of AST's 1024 frames
    assert real_frames(399, 1024) == 0 and real_frames(10**7, 1024) == 1024


def test_csv_manifest_with_folds_and_an_audio_root(tmp_path):
    make_class_folders(tmp_path / "audio")
    rows = "filename,category,fold\nbird/a.wav,bird,1\nengine/b.wav,engine,2\nbird/c.wav,bird,2\n"
    (tmp_path / "meta.csv").write_text(rows)
    src = open_source(tmp_path / "meta.csv", path_column="filename", label_column="category",
                      audio_root=str(tmp_path / "audio"))
    assert src.class_names == ["bird", "engine"] and src.fold_names == ["1", "2"]
    assert [(c.id, c.label, c.fold) for c in src.clips] == [("bird/a.wav", 0, 0), ("engine/b.wav", 1, 1),
                                                          ("bird/c.wav", 0, 1)]
    assert src.clips[0].path == tmp_path / "audio" / "bird" / "a.wav"
    two = open_source(tmp_path / "meta.csv", path_column="filename", label_column="category",
                      audio_root=str(tmp_path / "audio"), folds=["2"])
    assert [c.id for c in two.clips] == ["engine/b.wav", "bird/c.wav"]
    with pytest.raises(UsageError, match="unknown fold"):
        open_source(tmp_path / "meta.csv", path_column="filename", label_column="category", folds=["9"])


def test_json_manifest_paths_are_relative_to_it_and_integer_labels_sort_numerically(tmp_path):
    make_class_folders(tmp_path)
    clips = [{"path": "bird/a.wav", "label": 10}, {"path": "bird/b.flac", "label": 2}]
    (tmp_path / "m.json").write_text(json.dumps({"clips": clips}))
    src = open_source(tmp_path / "m.json")
    assert src.class_names == ["2", "10"] and [c.label for c in src.clips] == [1, 0]
    assert src.fold_names is None


def test_a_manifest_without_the_named_column_is_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.wav,x\n")
    with pytest.raises(InputError, match=r"m\.csv: row 1 has no 'path' \(columns: file, label\)"):
        open_source(tmp_path / "m.csv")


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    make_class_folders(tmp_path / "audio")
    paths = [str(tmp_path / "audio" / p) for p in ("bird/a.wav", "engine/a.flac", "bird/b.flac")]
    features = datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                  "label": datasets.ClassLabel(names=["bird", "engine"])})
    ds = datasets.Dataset.from_dict({"audio": [{"path": p, "bytes": Path(p).read_bytes()} for p in paths],
                                     "label": [0, 1, 0]}, features=features)
    ds = ds.cast_column("audio", datasets.Audio())  # an Audio column, as hub datasets have (cast: no encoding)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    src = open_source(tmp_path / "saved")
    assert src.class_names == ["bird", "engine"] and [c.label for c in src.clips] == [0, 1, 0]
    wave, real = load_clip(src.open(src.clips[1]), ClipPolicy(1.0))
    assert real == 16000 and wave.shape == (16000,)
    with pytest.raises(UsageError, match="no column 'sound'"):
        open_source(tmp_path / "saved", audio_column="sound")


def test_a_missing_extra_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "soxr" else real(name, *a))
    with pytest.raises(UsageError, match=r'needs soxr, which is not installed; run: pip install "feda2v-tk\[audio\]"'):
        require("transformers", "soxr")
