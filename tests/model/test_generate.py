"""Generation: shards in the dataset format, per-class reproducibility, bounded and all-or-nothing output."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import write_dataset
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.generate import ClassAgnosticWarning, generate
from feda2v_toolkit.plugins import list_upsamplers
from feda2v_toolkit.training.pipeline import train


@pytest.fixture(scope="module")
def model(tiny_data, tmp_path_factory) -> GenerativeModel:
    cfg = {"generator_hidden_dim": 32, "generator_latent_dim": 8, "generator_training_epochs": 2,
           "generator_batch_size": 8, "use_conditioned_vae": True, "generator_output_sequence_length": 50,
           "generator_checkpoint_dir": str(tmp_path_factory.mktemp("ck")), "synthetic_samples_per_class": 3}
    return train(cfg, tiny_data, seed=0)


def test_writes_k_samples_per_class_at_the_output_length_in_the_dataset_format(model, tmp_path):
    report = generate(model, tmp_path / "out", samples=4, seed=1)
    ds = open_dataset(tmp_path / "out")
    assert (len(ds), ds.seq_len, ds.dim) == (16, 50, 16)
    assert ds.class_names == model.class_names
    assert ds.class_counts() == {c: 4 for c in model.class_names}
    assert report.samples == {c: 4 for c in model.class_names}


def test_defaults_come_from_the_config_and_auto_from_the_training_counts(model, tmp_path):
    generate(model, tmp_path / "a")
    assert open_dataset(tmp_path / "a").class_counts() == {c: 3 for c in model.class_names}
    generate(model, tmp_path / "b", samples="auto", classes=["drum"])
    assert open_dataset(tmp_path / "b").class_counts()["drum"] == model.class_counts["drum"]


def test_a_class_gets_the_same_samples_whatever_else_is_generated(model, tmp_path):
    generate(model, tmp_path / "all", samples=3, seed=9)
    generate(model, tmp_path / "one", samples=3, seed=9, classes=["whistle"])
    every = open_dataset(tmp_path / "all")
    only = open_dataset(tmp_path / "one")
    rows = (every.labels == model.class_names.index("whistle")).nonzero().flatten()
    assert torch.equal(every.read(rows).embeddings, only.read(range(3)).embeddings)


def test_output_length_dtype_and_shards(model, tmp_path):
    from feda2v_toolkit.model.generate import OutputLengthWarning

    with pytest.warns(OutputLengthWarning, match="longer than the training data's sequences"):
        generate(model, tmp_path / "o", samples=5, length=120, dtype="float16", shard_bytes=120 * 16 * 2 * 4)
    ds = open_dataset(tmp_path / "o")
    assert ds.seq_len == 120 and ds.storage_dtype == torch.float16
    assert len(ds.sources) == 5  # 20 samples, 4 per shard


def test_an_error_midway_leaves_no_output(model, tmp_path, monkeypatch):
    calls = []
    real = GenerativeModel.upsample

    def fails_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerativeModel, "upsample", fails_on_third_batch)
    with pytest.raises(RuntimeError):
        generate(model, tmp_path / "out", samples=2, batch_size=1, shard_bytes=1)
    assert list(tmp_path.iterdir()) == []


def test_unknown_class_and_bad_counts_are_usage_errors(model, tmp_path):
    with pytest.raises(UsageError, match="unknown class"):
        generate(model, tmp_path / "x", classes=["cat"])
    with pytest.raises(UsageError, match="positive integer"):
        generate(model, tmp_path / "x", samples="many")
    counts, model.class_counts = model.class_counts, {}
    try:
        with pytest.raises(UsageError, match="training count"):
            generate(model, tmp_path / "x", samples="auto")
    finally:
        model.class_counts = counts


def test_a_model_with_no_generator_for_any_class_generates_nothing_and_says_so(model, tmp_path):
    import dataclasses

    with pytest.raises(UsageError, match="no generator for any of its classes"):
        generate(dataclasses.replace(model, class_to_generator={}), tmp_path / "x", samples=2)
    assert not (tmp_path / "x").exists()


def test_a_unified_unconditioned_model_warns_that_labels_mean_nothing(tiny_data, tmp_path):
    cfg = {"generator_type": "vae", "generator_hidden_dim": 16, "generator_latent_dim": 4,
           "generator_training_epochs": 1, "use_conditioned_vae": False, "generator_checkpoint_dir": str(tmp_path / "ck")}
    plain = train(cfg, tiny_data, seed=0)
    with pytest.warns(ClassAgnosticWarning):
        generate(plain, tmp_path / "out", samples=1)


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """``(model, data file, conditions)``: a VAE conditioned on the 6-wide condition embeddings of 12 clips of
    [10, 4] in 2 classes (even rows class 0)."""
    root = tmp_path_factory.mktemp("conditioned")
    emb = torch.randn(12, 10, 4)
    cond = torch.randn(12, 6)
    data = write_dataset(root / "d.safetensors", emb, torch.arange(12) % 2, conditions=cond)
    cfg = {"generator_hidden_dim": 16, "generator_latent_dim": 4, "generator_training_epochs": 1,
           "use_conditioned_vae": True, "generator_checkpoint_dir": str(root / "ck")}
    return train(cfg, data, seed=0), data, cond


def test_an_embedding_conditioned_model_needs_conditions(conditioned, tmp_path):
    model, data, cond = conditioned
    with pytest.raises(UsageError, match="conditions=FILE"):
        generate(model, tmp_path / "out", samples=2)
    generate(model, tmp_path / "out", samples=8, conditions=data)
    out = open_dataset(tmp_path / "out")
    assert out.condition_dim == 6
    first = out.read(range(8)).conditions
    assert torch.equal(first[:6], cond[[0, 2, 4, 6, 8, 10]])  # class 0's conditions, in order, then cycled
    assert torch.equal(first[6:], cond[[0, 2]])


def test_samples_do_not_depend_on_the_shard_size(model, tmp_path):
    generate(model, tmp_path / "big", samples=6, seed=2, batch_size=4)
    generate(model, tmp_path / "tiny", samples=6, seed=2, batch_size=4, shard_bytes=1)
    big, tiny = open_dataset(tmp_path / "big"), open_dataset(tmp_path / "tiny")
    assert len(tiny.sources) == 24
    assert torch.equal(big.read(range(24)).embeddings, tiny.read(range(24)).embeddings)


def test_a_subset_of_classes_is_a_dataset_of_those_classes_that_trains(model, tmp_path):
    generate(model, tmp_path / "two", samples=4, classes=["bird", "drum"], seed=0)
    ds = open_dataset(tmp_path / "two")
    assert ds.class_names == ["drum", "bird"]  # the model's order
    assert ds.class_counts() == {"drum": 4, "bird": 4}
    cfg = {"generator_hidden_dim": 8, "generator_latent_dim": 2, "generator_training_epochs": 1,
           "generator_checkpoint_dir": str(tmp_path / "ck")}
    assert train(cfg, tmp_path / "two", seed=0).class_names == ["drum", "bird"]


def test_duplicate_classes_are_refused(model, tmp_path):
    with pytest.raises(UsageError, match="more than once"):
        generate(model, tmp_path / "x", classes=["drum", "drum"])


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _piece_budget(rows: int, length: int = 50, dim: int = 16, itemsize: int = 2) -> int:
    """A memory budget whose half holds the upsampling working set of ``rows`` samples (upsample_rows)."""
    return 2 * rows * length * dim * (8 + 2 * itemsize)


@pytest.mark.parametrize("upsampler", list_upsamplers())
def test_a_small_memory_budget_upsamples_in_pieces_and_writes_the_same_bytes(upsampler, tiny_data, tmp_path,
                                                                             monkeypatch):
    from feda2v_toolkit.model.generate import upsample_rows

    cfg = {"generator_type": "gaussian", "generator_upsampler": upsampler, "generator_training_sequence_length": 5,
           "generator_latent_dim": 4, "generator_upsampler_epochs": 1, "generator_output_sequence_length": 50,
           "generator_checkpoint_dir": str(tmp_path / "ck")}
    trained = train(cfg, tiny_data, seed=0)
    generate(trained, tmp_path / "whole", samples=7, seed=3, batch_size=5)
    assert upsample_rows(5, 50, 16, 2, _piece_budget(2)) == 2
    sizes: list[int] = []
    real = GenerativeModel.upsample
    monkeypatch.setattr(GenerativeModel, "upsample", lambda self, x, *a, **k: sizes.append(x.shape[0]) or
                        real(self, x, *a, **k))
    lines: list[str] = []
    generate(trained, tmp_path / "pieces", samples=7, seed=3, batch_size=5, memory_budget=_piece_budget(2),
             log=lines.append)
    assert sizes == [2, 2, 1, 2] * 4  # batches of 5 and 2 per class, upsampled 2 at a time
    assert any("2 at a time" in line for line in lines)
    assert _files(tmp_path / "pieces") == _files(tmp_path / "whole")  # the same shards, byte for byte


def test_the_budget_never_splits_below_one_sample_nor_above_the_batch():
    from feda2v_toolkit.model.generate import DEFAULT_BATCH, upsample_rows

    assert upsample_rows(64, 1214, 768, 2, 1) == 1
    assert upsample_rows(64, 1214, 768, 2, 2**40) == 64
    assert upsample_rows(DEFAULT_BATCH, 1214, 768, 2, 2 * 2**30) == DEFAULT_BATCH  # the default budget: whole
    assert upsample_rows(DEFAULT_BATCH, 1214, 768, 4, 2 * 2**30) == DEFAULT_BATCH  # batches, float32 too


def test_conditions_follow_their_samples_when_a_batch_is_upsampled_in_pieces(conditioned, tmp_path):
    trained, data, _ = conditioned
    generate(trained, tmp_path / "whole", samples=8, conditions=data, batch_size=4)
    generate(trained, tmp_path / "pieces", samples=8, conditions=data, batch_size=4,
             memory_budget=_piece_budget(3, length=10, dim=4, itemsize=4))
    assert _files(tmp_path / "pieces") == _files(tmp_path / "whole")


def test_generate_takes_the_memory_budget_option(model, tmp_path):
    from click.testing import CliRunner

    from feda2v_toolkit.cli import cli
    from feda2v_toolkit.model.file import save_model

    path = save_model(model, tmp_path / "m.safetensors")
    args = ["generate", str(path), "-k", "3", "--batch-size", "3"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "pieces"), "--memory-budget", str(_piece_budget(1))])
    assert r.exit_code == 0, r.output
    assert "1 at a time" in r.output
    assert _files(tmp_path / "pieces") == _files(tmp_path / "whole")


def test_the_pieces_are_announced_only_when_a_drawn_batch_is_split(model, tmp_path):
    lines: list[str] = []
    generate(model, tmp_path / "small", samples=2, memory_budget=_piece_budget(2), log=lines.append)
    assert not any("at a time" in line for line in lines)  # batches of 2 fit: nothing is split
    generate(model, tmp_path / "split", samples=3, memory_budget=_piece_budget(2), log=lines.append)
    assert any("up to 3 samples) 2 at a time" in line for line in lines)


def _free_space(monkeypatch, free: int) -> None:
    import types

    monkeypatch.setattr("feda2v_toolkit.runtime.resources.shutil.disk_usage", lambda _p: types.SimpleNamespace(free=free))


def test_the_output_size_is_estimated_from_samples_length_dim_and_dtype_headers_aside(model, tmp_path):
    from feda2v_toolkit.model.generate import output_bytes

    report = generate(model, tmp_path / "o", samples=5, length=20, dtype="float16", seed=0)
    estimate = output_bytes(20, 20, 16, 2)
    assert estimate == 20 * (20 * 16 * 2 + 8)
    assert estimate <= report.bytes_written <= estimate + 4096 * report.shards


def test_more_samples_than_the_free_disk_space_holds_are_refused_before_anything_is_written(model, tmp_path,
                                                                                            monkeypatch):
    _free_space(monkeypatch, 10 * 2**20)
    with pytest.raises(UsageError) as info:
        generate(model, tmp_path / "out", samples=10_000, length=50, dtype="float32")
    assert str(info.value) == (f"{tmp_path / 'out'}: not enough free disk space (No space left on device): writing "
                               "40,000 samples of [50, 16] float32 needs about 122.4 MiB, its file system has 10.0 "
                               "MiB free; lower samples or length")
    assert list(tmp_path.iterdir()) == []
    generate(model, tmp_path / "fits", samples=100, length=50, dtype="float32")  # 1.2 MiB


def test_training_counts_from_the_model_file_are_bounded_by_the_free_disk_space(model, tmp_path, monkeypatch):
    import dataclasses
    import time

    _free_space(monkeypatch, 2**40)
    huge = dataclasses.replace(model, class_counts=dict.fromkeys(model.class_names, 10**15))
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match=r"writing 4,000,000,000,000,000 samples \(the model's training counts\) "
                                         r"of \[50, 16\] float16 needs about 5712\.8 PiB, its file system has "
                                         r"1\.0 TiB free"):
        generate(huge, tmp_path / "out", samples="auto")
    assert time.perf_counter() - t0 < 5 and list(tmp_path.iterdir()) == []
