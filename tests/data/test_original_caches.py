"""The original FedA2V code's AST caches are read in place by open_dataset (and so train/analyze/evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from feda2v_toolkit.data.convert import convert_dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.errors import InputError, UsageError

S, D = 14, 8


def write_ast_cache(root, per_class):
    """The layout of the original pregenerate_ast_cache.py: <class>/embeddings_NNN.npy + manifest.json."""
    rng = np.random.default_rng(0)
    rows = {}
    for name, chunk_sizes in per_class.items():
        d = root / name
        d.mkdir(parents=True)
        index, chunks, all_rows = {}, [], []
        for ci, n in enumerate(chunk_sizes):
            arr = rng.standard_normal((n, S, D)).astype(np.float32)
            np.save(d / f"embeddings_{ci:03d}.npy", arr)
            chunks.append({"file": f"embeddings_{ci:03d}.npy", "num_samples": n, "shape": [n, S, D]})
            for off in range(n):
                index[f"{name}_{ci}_{off}"] = [ci, off]
            all_rows.append(arr)
        manifest = {"file_id_to_index": index, "chunks": chunks, "embedding_shape": [S, D],
                    "total_samples": sum(chunk_sizes), "class_name": name, "created": "2026-01-19T10:30:00",
                    "last_updated": "2026-01-19T10:30:00"}
        (d / "manifest.json").write_text(json.dumps(manifest))
        rows[name] = np.concatenate(all_rows)
    return rows


def test_ast_cache_directory_is_read_in_place(tmp_path):
    rows = write_ast_cache(tmp_path / "cache", {"dog": [3, 2], "baby_cry": [4]})
    ds = open_dataset(tmp_path / "cache")
    assert (len(ds), ds.seq_len, ds.dim) == (9, S, D)
    assert ds.class_names == ["baby_cry", "dog"] and ds.class_counts() == {"baby_cry": 4, "dog": 5}
    batch = ds.read(range(9))
    np.testing.assert_array_equal(batch.embeddings[:4].numpy(), rows["baby_cry"])
    np.testing.assert_array_equal(batch.embeddings[4:].numpy(), rows["dog"])
    assert batch.labels.tolist() == [0] * 4 + [1] * 5
    assert not ds.sources[0].tensors["embeddings"].tensor.numpy().flags.owndata  # memory-mapped, not copied
    ds.read(range(4)).embeddings.mul_(0)  # one chunk's rows: a batch is a copy, never a view of the map
    np.testing.assert_array_equal(ds.read(range(4)).embeddings.numpy(), rows["baby_cry"])
    np.testing.assert_array_equal(np.load(tmp_path / "cache" / "baby_cry" / "embeddings_000.npy"), rows["baby_cry"])


def test_rows_the_manifest_no_longer_indexes_are_left_out(tmp_path):
    write_ast_cache(tmp_path / "cache", {"dog": [4]})
    manifest = json.loads((tmp_path / "cache" / "dog" / "manifest.json").read_text())
    del manifest["file_id_to_index"]["dog_0_1"]
    (tmp_path / "cache" / "dog" / "manifest.json").write_text(json.dumps(manifest))
    ds = open_dataset(tmp_path / "cache")
    assert len(ds) == 3 and [s.count for s in ds.sources] == [1, 2]


@pytest.mark.parametrize(("breakage", "message"), [
    ("missing_chunk", "chunk listed in the manifest is missing"),
    ("pickled", "cannot read as a .npy array"),
    ("count", "manifest says 3 samples, the chunk holds 2"),
    ("path", "has no plain file name"),
    ("index", "points to chunk 7, but 1 chunk"),
    ("width0", r"embeddings_000\.npy: 'embeddings' must be .* D >= 1, found shape \[3, 16, 0\]"),
    ("length0", r"embeddings_000\.npy: 'embeddings' must be .* S >= 1 .*found shape \[3, 0, 8\]"),
])
def test_broken_caches_are_one_line_errors(tmp_path, breakage, message):
    write_ast_cache(tmp_path / "cache", {"dog": [3]})
    d = tmp_path / "cache" / "dog"
    manifest = json.loads((d / "manifest.json").read_text())
    if breakage == "missing_chunk":
        (d / "embeddings_000.npy").unlink()
    elif breakage == "pickled":
        np.save(d / "embeddings_000.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif breakage in ("width0", "length0"):
        np.save(d / "embeddings_000.npy", np.zeros((3, 16, 0) if breakage == "width0" else (3, 0, D), np.float32))
    elif breakage == "count":
        np.save(d / "embeddings_000.npy", np.zeros((2, S, D), dtype=np.float32))
    elif breakage == "index":
        manifest["file_id_to_index"]["dog_0_0"] = [7, 0]
        (d / "manifest.json").write_text(json.dumps(manifest))
    else:
        manifest["chunks"][0]["file"] = "../../etc/passwd"
        (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message):
        open_dataset(tmp_path / "cache")


@pytest.mark.parametrize("nested", [True, False])
def test_pt_dict_keyed_by_file_id_is_read(tmp_path, nested):
    table = {f"video_{i:05d}:{'dog' if i % 2 else 'chainsaw'}": torch.randn(S, D) for i in range(5)}
    obj = {"embeddings": table, "metadata": {"sample_rate": 16000, "duration": 5.0}} if nested else table
    torch.save(obj, tmp_path / "cache.pt")
    ds = open_dataset(tmp_path / "cache.pt")
    assert ds.class_names == ["chainsaw", "dog"] and ds.labels.tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(ds.read([3]).embeddings[0], table["video_00003:dog"])


@pytest.mark.parametrize("row", [(S, 0), (0, D)])
def test_pt_dict_keyed_by_file_id_with_empty_sequences_is_refused(tmp_path, row):
    torch.save({"video_00000:dog": torch.zeros(row), "video_00001:cat": torch.zeros(row)}, tmp_path / "cache.pt")
    with pytest.raises(InputError, match=r"cache\.pt: 'embeddings' must be \[N, S, D\] with"):
        open_dataset(tmp_path / "cache.pt")


def test_convert_data_refuses_a_cache_of_empty_sequences_and_writes_nothing(tmp_path):
    write_ast_cache(tmp_path / "cache", {"dog": [3]})
    np.save(tmp_path / "cache" / "dog" / "embeddings_000.npy", np.zeros((3, 16, 0), np.float32))
    with pytest.raises(InputError, match="D >= 1"):
        convert_dataset(tmp_path / "cache", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_keys_without_a_class_go_to_one_class(tmp_path):
    torch.save({"1-100032-A-0": torch.randn(1, S, D), "1-100038-A-14": torch.randn(1, S, D)}, tmp_path / "c.pt")
    ds = open_dataset(tmp_path / "c.pt")
    assert ds.class_names == ["unlabelled"] and len(ds) == 2


def test_the_old_embeddings_and_labels_pt_still_reads(tmp_path):
    torch.save({"embeddings": torch.randn(3, S, D), "labels": torch.tensor([0, 1, 0])}, tmp_path / "c.pt")
    assert len(open_dataset(tmp_path / "c.pt")) == 3


def test_convert_data_writes_our_format(tmp_path):
    rows = write_ast_cache(tmp_path / "cache", {"dog": [3, 2], "cat": [1]})
    report = convert_dataset(tmp_path / "cache", tmp_path / "out", dtype="float16")
    ds = open_dataset(tmp_path / "out")
    assert report["clips"] == 6 and ds.storage_dtype == torch.float16 and ds.class_names == ["cat", "dog"]
    np.testing.assert_allclose(ds.read(range(1, 6)).embeddings.numpy(), rows["dog"], atol=2e-3)
    with pytest.raises(UsageError, match="overwrite=True"):
        convert_dataset(tmp_path / "cache", tmp_path / "out")
    convert_dataset(tmp_path / "cache", tmp_path / "out", overwrite=True)
    assert open_dataset(tmp_path / "out").storage_dtype == torch.float32


def test_train_reads_an_ast_cache_directly(tmp_path, tiny_config):
    from feda2v_toolkit.training.pipeline import train

    write_ast_cache(tmp_path / "cache", {"dog": [6, 4], "cat": [10]})
    model = train(tiny_config, tmp_path / "cache", seed=0, progress=False)
    assert model.class_names == ["cat", "dog"]
    assert tuple(model.sample(2, class_name="dog", length=S).shape) == (2, S, D)
