"""Same seed and data -> byte-identical model files (sorted metadata, timings kept out)."""

from __future__ import annotations

import hashlib
import json
import struct

from feda2v_toolkit.training.pipeline import train
from tests.hardening.conftest import run_main


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_cli_runs_with_the_same_seed_write_files_with_the_same_sha256(tiny_data, tmp_path, capsys):
    args = ["--epochs", "2", "--training-length", "4", "--hidden-dim", "16", "--latent-dim", "4", "--seed", "3",
            "-q"]
    for name in ("a", "b"):
        code, _, err = run_main(["train", "-d", str(tiny_data), "-o", str(tmp_path / f"{name}.safetensors"),
                                 *args], capsys)
        assert code == 0, err
    assert _sha256(tmp_path / "a.safetensors") == _sha256(tmp_path / "b.safetensors")


def test_the_header_is_sorted_and_holds_no_wall_clock_timings(tiny_data, tiny_config, tmp_path):
    model = train(tiny_config, tiny_data, out=tmp_path / "m.safetensors")
    assert "train_seconds" in model.metrics  # the returned model still has them (and the metrics file)
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    doc = header["__metadata__"]["model"]
    assert "seconds" not in doc and "samples_per_s" not in doc
    assert json.loads(doc)["data_dtype"] == "float16"


def _digests(root):
    """sha256 of every file under ``root`` (or of ``root`` itself), by relative name."""
    if root.is_file():
        return {"": _sha256(root)}
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_writing_command_writes_the_same_bytes_twice(model_file, tiny_data, tmp_path, capsys):
    from tests.model.test_original_checkpoints import FULL, D, orig, save_unified

    ckpt = save_unified(tmp_path / "ckpt.pt", orig(0), selected_classes=["dog", "cat"])
    commands = {
        "demo-data file": ["demo-data", "{out}.safetensors", "--per-class", "3", "--full-length", "20", "--dim", "8"],
        "demo-data shards": ["demo-data", "{out}", "--per-class", "3", "--full-length", "20", "--dim", "8"],
        "generate": ["generate", str(model_file), "-o", "{out}", "-k", "5", "--seed", "4"],
        "split": ["split", str(tiny_data), "-o", "{out}", "--nodes", "2", "--by", "dirichlet", "--seed", "2"],
        "convert-data": ["convert-data", str(tiny_data), "-o", "{out}", "--dtype", "float32"],
        "convert": ["convert", str(ckpt), "-o", "{out}.safetensors", "--dim", str(D), "--full-length", str(FULL)],
    }
    for name, argv in commands.items():
        written = []
        for run in ("a", "b"):
            out = tmp_path / f"{name.replace(' ', '-')}-{run}"
            code, _, err = run_main([a.replace("{out}", str(out)) for a in argv] + ["-q"], capsys)
            assert code == 0, (name, err)
            written.append(_digests(out if out.exists() else out.with_suffix(".safetensors")))
        assert written[0] == written[1] and written[0], name


def test_embed_writes_the_same_bytes_twice_and_when_resumed(tmp_path, capsys):
    import pytest

    pytest.importorskip("transformers")
    from feda2v_toolkit.audio.embed import embed
    from feda2v_toolkit.audio.sources import ClipPolicy, open_source
    from tests.audio.test_embed import _Interrupting
    from tests.audio_fakes import TINY_TOKENS, make_class_folders, save_tiny_ast

    ast = save_tiny_ast(tmp_path / "ast")
    clips = make_class_folders(tmp_path / "clips")
    capsys.readouterr()
    argv = ["embed", str(clips), "--model", str(ast), "--clip-seconds", "1", "--device", "cpu", "--batch-size", "2",
            "-q"]
    for run in ("a", "b"):
        assert run_main([*argv, "-o", str(tmp_path / run)], capsys)[0] == 0
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    # interrupted after two shards, then resumed: the very files an uninterrupted run writes
    from feda2v_toolkit.audio.embed import ASTEmbedder

    run = dict(policy=ClipPolicy(1.0), batch_size=2, shard_bytes=2 * TINY_TOKENS * 64 * 2, progress=False)
    inner = ASTEmbedder(str(ast), device="cpu")
    embed(open_source(clips), tmp_path / "whole", embedder=inner, **run)
    with pytest.raises(KeyboardInterrupt):
        embed(open_source(clips), tmp_path / "resumed", embedder=_Interrupting(inner, after=3), **run)
    embed(open_source(clips), tmp_path / "resumed", embedder=inner, **run)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "resumed")
