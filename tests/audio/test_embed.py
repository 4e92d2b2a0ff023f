"""``embed``: the real from_pretrained path on a tiny random AST, synthesised audio, resume and determinism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from audio_fakes import TINY_TOKENS, make_class_folders, save_tiny_ast, tone, write_audio
from safetensors import safe_open

pytest.importorskip("transformers")
pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from feda2v_toolkit.audio.embed import ASTEmbedder, ast_token_count, embed, partial_dir  # noqa: E402
from feda2v_toolkit.audio.sources import ClipPolicy, open_source  # noqa: E402
from feda2v_toolkit.data.open import open_dataset  # noqa: E402
from feda2v_toolkit.errors import InputError, UsageError  # noqa: E402

POLICY = ClipPolicy(1.0)


@pytest.fixture(scope="module")
def tiny_ast(tmp_path_factory):
    return save_tiny_ast(tmp_path_factory.mktemp("ast"))


@pytest.fixture(scope="module")
def embedder(tiny_ast):
    return ASTEmbedder(str(tiny_ast), device="cpu")


@pytest.fixture
def clips(tmp_path):
    return make_class_folders(tmp_path / "clips")


def _all(path):
    ds = open_dataset(path)
    return ds, ds.read(range(len(ds)), dtype=ds.storage_dtype, check_finite=True)


def test_token_count_formula_matches_the_model():
    assert ast_token_count(128, 1024, 16, 10, 10) == 1214  # the 10-10 AudioSet checkpoints
    assert ast_token_count(128, 128, 16, 10, 10) == 146  # speech commands
    assert ast_token_count(128, 116, 16, 10, 10) == TINY_TOKENS


def test_embed_writes_every_clip_with_labels_frames_and_metadata(tiny_ast, clips, tmp_path):
    report = embed(open_source(clips), tmp_path / "out", model=str(tiny_ast), policy=POLICY, batch_size=2,
                   device="cpu", progress=False)
    ds, batch = _all(tmp_path / "out")
    assert (report.rows, report.clips, report.skipped) == (6, 6, [])
    assert (len(ds), ds.seq_len, ds.dim, ds.storage_dtype) == (6, TINY_TOKENS, 64, torch.float16)
    assert ds.class_names == ["bird", "engine"]
    assert batch.labels.tolist() == [0, 0, 0, 1, 1, 1]
    shard = sorted((tmp_path / "out").glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as fh:
        frames = fh.get_tensor("frames").tolist()
        meta = fh.metadata()
    # 1 s clips: 1.0, 1.5 (cropped), 0.6 (padded) s of real audio -> 98, 98 and 58 of 116 frames
    assert frames[:3] == [98, 98, 58]
    settings = json.loads(meta["embed"])
    assert settings["model"] == str(tiny_ast) and settings["tokens"] == TINY_TOKENS
    assert settings["clip_policy"]["clip_seconds"] == 1.0 and settings["extractor"]["max_length"] == 116
    assert json.loads(meta["clip_ids"])[:2] == ["bird/a.wav", "bird/b.flac"]
    assert not partial_dir(tmp_path / "out").exists()


def test_embeddings_are_the_model_last_hidden_state(embedder, tmp_path):
    from feda2v_toolkit.audio.sources import load_clip

    path = write_audio(tmp_path / "c" / "x" / "a.wav", tone(440, 1.0, 16000), 16000)
    embed(open_source(tmp_path / "c"), tmp_path / "out", policy=POLICY, dtype="float32", embedder=embedder,
          progress=False)
    wave, _ = load_clip(path, POLICY)
    feats = embedder.extractor([wave], sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        expected = embedder.model(feats).last_hidden_state
    _, batch = _all(tmp_path / "out")
    torch.testing.assert_close(batch.embeddings, expected, rtol=1e-5, atol=1e-5)


def test_tokens_are_frequency_major(tmp_path):
    """With no transformer layers each token sees only its own patch: changing the audio's second half
    changes, in every frequency row alike, only the time patches that cover it."""
    model = save_tiny_ast(tmp_path / "ast0", num_hidden_layers=0)
    first = tone(500, 0.5, 16000)
    for name, second in (("same", tone(500, 0.5, 16000, seed=0)), ("other", tone(3000, 0.5, 16000, seed=9))):
        import numpy as np

        write_audio(tmp_path / "src" / name / "a.wav", np.concatenate([first, second]), 16000)
    embed(open_source(tmp_path / "src"), tmp_path / "out", model=str(model), policy=POLICY, dtype="float32",
          device="cpu", progress=False)
    _, batch = _all(tmp_path / "out")
    diff = (batch.embeddings[0] - batch.embeddings[1]).abs().amax(dim=-1)
    grid = diff[2:].reshape(12, 11) > 1e-5  # [frequency, time] when tokens are frequency-major
    # 98 real frames of 116; the second half starts at frame ~48: time patches (10 frames apart, 16 wide)
    # 0-2 see only the shared first half, 5-8 the changed second half, 10 only padding -- in every row
    assert not grid[:, :3].any() and grid[:, 5:9].all() and not grid[:, 10].any()


def test_same_command_gives_bitwise_the_same_dataset_whatever_the_reader_threads(embedder, clips, tmp_path):
    for name, workers in (("a", 1), ("b", 3)):
        embed(open_source(clips), tmp_path / name, policy=POLICY, batch_size=2, embedder=embedder,
              read_workers=workers, progress=False)
    (_, a), (_, b) = _all(tmp_path / "a"), _all(tmp_path / "b")
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.labels, b.labels)


class _Interrupting:
    """Wraps an embedder and raises KeyboardInterrupt on the ``after``-th forward pass."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, features):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner(features)


def test_interrupted_run_resumes_to_the_uninterrupted_result(embedder, clips, tmp_path):
    shard_bytes = 2 * TINY_TOKENS * 64 * 2  # two clips per shard
    run = dict(policy=POLICY, batch_size=2, shard_bytes=shard_bytes, progress=False)
    embed(open_source(clips), tmp_path / "whole", embedder=embedder, **run)
    with pytest.raises(KeyboardInterrupt):
        embed(open_source(clips), tmp_path / "out", embedder=_Interrupting(embedder, after=3), **run)
    work = partial_dir(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == [
        "done-00000.json", "done-00001.json", "embed-state.json", "part-00000.safetensors", "part-00001.safetensors"]
    counting = _Interrupting(embedder, after=-1)
    report = embed(open_source(clips), tmp_path / "out", embedder=counting, **run)
    assert (report.resumed, report.computed, counting.calls) == (4, 2, 1)
    (_, whole), (_, resumed) = _all(tmp_path / "whole"), _all(tmp_path / "out")
    assert torch.equal(whole.embeddings, resumed.embeddings) and torch.equal(whole.labels, resumed.labels)
    assert not work.exists()


def test_deeply_nested_json_in_a_partial_run_counts_as_unreadable_not_as_a_crash(embedder, clips, tmp_path):
    run = dict(policy=POLICY, batch_size=2, shard_bytes=2 * TINY_TOKENS * 64 * 2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        embed(open_source(clips), tmp_path / "out", embedder=_Interrupting(embedder, after=3), **run)
    work = partial_dir(tmp_path / "out")
    nested = "[" * 100_000 + "]" * 100_000
    (work / "done-00001.json").write_text(nested)  # that part is embedded again
    report = embed(open_source(clips), tmp_path / "out", embedder=embedder, **run)
    assert (report.resumed, report.computed) == (2, 4)
    with pytest.raises(KeyboardInterrupt):
        embed(open_source(clips), tmp_path / "again", embedder=_Interrupting(embedder, after=3), **run)
    (partial_dir(tmp_path / "again") / "embed-state.json").write_text(nested)
    with pytest.raises(UsageError, match="not the work directory of an embed run"):
        embed(open_source(clips), tmp_path / "again", embedder=embedder, **run)


def test_a_partial_run_with_other_settings_is_not_mixed_in(embedder, clips, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        embed(open_source(clips), tmp_path / "out", policy=POLICY, batch_size=2, shard_bytes=1,
              embedder=_Interrupting(embedder, after=2), progress=False)
    with pytest.raises(UsageError, match="other settings"):
        embed(open_source(clips), tmp_path / "out", policy=ClipPolicy(0.5), embedder=embedder, progress=False)
    report = embed(open_source(clips), tmp_path / "out", policy=ClipPolicy(0.5), embedder=embedder,
                   overwrite=True, progress=False)
    assert report.resumed == 0 and report.rows == 6


def test_unreadable_and_empty_files_are_listed_or_stop_the_run(embedder, clips, tmp_path):
    (clips / "bird" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    write_audio(clips / "engine" / "empty.wav", tone(100, 0.0, 16000), 16000)
    import soundfile as sf

    sf.write(clips / "engine" / "huge.wav", np.full(8000, 3e38, dtype=np.float32), 16000, subtype="FLOAT")
    report = embed(open_source(clips), tmp_path / "out", policy=POLICY, embedder=embedder, progress=False)
    assert report.rows == 6 and bool(torch.isfinite(_all(tmp_path / "out")[1].embeddings).all())
    reasons = {item["id"]: item["reason"] for item in report.skipped}
    assert set(reasons) == {"bird/broken.wav", "engine/empty.wav", "engine/huge.wav"}
    assert reasons["bird/broken.wav"].startswith("unreadable") and reasons["engine/empty.wav"].startswith("empty")
    assert reasons["engine/huge.wav"].startswith("samples reach")
    assert all(item["path"].endswith(item["id"]) for item in report.skipped)
    with pytest.raises(InputError, match=r"broken\.wav: unreadable"):
        embed(open_source(clips), tmp_path / "strict", policy=POLICY, embedder=embedder, on_error="fail",
              progress=False)
    assert not (tmp_path / "strict").exists() and not partial_dir(tmp_path / "strict").exists()


def test_a_clip_whose_features_overflow_is_skipped_not_written_as_nan(embedder, clips, tmp_path):
    """The safety net behind the sample bound: a clip whose filterbank features are NaN or infinite is listed as
    unreadable, and the other clips of its batch are embedded."""

    class Overflowing:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def features(self, waves):
            feats = self.inner.features(waves)
            if self.calls == 0:
                feats[0, 0, 0] = np.inf
            self.calls += 1
            return feats

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, features):
            return self.inner(features)

    report = embed(open_source(clips), tmp_path / "out", policy=POLICY, batch_size=3, embedder=Overflowing(embedder),
                   progress=False)
    assert report.rows == 5 and [item["reason"] for item in report.skipped] == \
        ["its filterbank features are NaN or infinite"]
    assert bool(torch.isfinite(_all(tmp_path / "out")[1].embeddings).all())


def test_existing_output_needs_overwrite(embedder, clips, tmp_path):
    import feda2v_toolkit as ftk

    ftk.embed_audio(str(clips), tmp_path / "out", policy=POLICY, embedder=embedder, progress=False)  # a path works
    with pytest.raises(UsageError, match="overwrite=True"):
        embed(open_source(clips), tmp_path / "out", policy=POLICY, embedder=embedder, progress=False)
    shutil.rmtree(clips / "engine")
    embed(open_source(clips), tmp_path / "out", policy=POLICY, embedder=embedder, overwrite=True, progress=False)
    assert open_dataset(tmp_path / "out").class_names == ["bird"]


def test_a_directory_that_is_not_an_ast_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot load an AST model"):
        ASTEmbedder(str(tmp_path / "empty"), device="cpu")


def test_a_classification_checkpoint_loads_its_encoder_weights(tmp_path):
    """The hub checkpoints FedA2V uses are ASTForAudioClassification: ASTModel takes their encoder as is."""
    import warnings

    from audio_fakes import TINY_AST
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(1)
    classifier = ASTForAudioClassification(ASTConfig(**TINY_AST, num_labels=3))
    classifier.save_pretrained(tmp_path / "clf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ASTFeatureExtractor(max_length=TINY_AST["max_length"]).save_pretrained(tmp_path / "clf")
    loaded = ASTEmbedder(str(tmp_path / "clf"), device="cpu").model.state_dict()
    original = classifier.audio_spectrogram_transformer.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_two_ranks_embed_the_bytes_of_one_process(tiny_ast, clips, tmp_path):
    """torchrun: each rank embeds every other shard into the shared work directory; rank 0 assembles."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    row = TINY_TOKENS * 64 * 2  # float16 rows of the tiny AST: shards of one batch of two clips
    embed(open_source(clips), tmp_path / "one", model=str(tiny_ast), policy=POLICY, batch_size=2, device="cpu",
          shard_bytes=2 * row, progress=False)
    script = Path(__file__).with_name("_embed_ranks.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(script), str(clips),
                           str(tmp_path / "two"), str(tiny_ast), str(2 * row)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(one) == 3 and one == sorted(p.name for p in (tmp_path / "two").iterdir())  # 6 clips, 3 shards
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not partial_dir(tmp_path / "two").exists()
