"""The reduced cache in memory or on disk, the memory budget that chooses, and the statistics of one read."""

from __future__ import annotations

import hashlib

import pytest
import torch

from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.resources import (
    DEFAULT_MEMORY_BUDGET,
    ENV_MEMORY_BUDGET,
    cache_in_memory,
    memory_budget,
    set_memory_budget,
)
from feda2v_toolkit.training.streams import ReducedCache


@pytest.fixture(autouse=True)
def _no_budget_left_behind():
    yield
    set_memory_budget(None)


def test_a_cache_on_disk_reads_what_a_cache_in_memory_reads():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, 3, 4, generator=g)
    labels = torch.arange(50) % 3
    mem = ReducedCache(50, 3, 4, labels, None)
    disk = ReducedCache(50, 3, 4, labels, None, in_memory=False)
    assert mem.in_memory and not disk.in_memory
    for start in range(0, 50, 7):  # written in pieces, as blocks arrive
        mem.write(start, values[start:start + 7])
        disk.write(start, values[start:start + 7])
    rows = torch.tensor([49, 0, 1, 2, 2, 17, 30, 31, 5])  # any order, repeats, runs
    assert torch.equal(disk.raw(rows), values[rows]) and torch.equal(mem.raw(rows), values[rows])
    norm = {"mean": values.mean(0), "std": values.std(0)}
    mem.standardize(norm)
    disk.standardize(norm)
    expected = values.clone().sub_(norm["mean"]).div_(norm["std"])[rows]  # standardised in place, as before
    assert torch.equal(mem.read(rows), expected) and torch.equal(disk.read(rows), expected)
    assert torch.equal(mem.raw(rows), values[rows])  # reading never changes the cache
    disk.close()


def test_a_cache_on_disk_is_written_in_the_background_and_read_after_its_writes(monkeypatch):
    """Writes go through a thread holding at most PENDING_WRITES blocks; a read waits for them; the thread ends
    with the cache."""
    import threading

    from feda2v_toolkit.runtime import scratch

    g = torch.Generator().manual_seed(1)
    values = torch.randn(40, 2, 3, generator=g)
    disk = ReducedCache(40, 2, 3, torch.zeros(40, dtype=torch.long), None, in_memory=False)
    gate, written = threading.Event(), []
    real_pwrite = scratch.os.pwrite

    def slow_pwrite(fd, data, offset):
        gate.wait(10)
        written.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(scratch.os, "pwrite", slow_pwrite)
    disk.write(0, values[:10])
    disk.write(10, values[10:20])  # both accepted while the disk is stalled: the pass goes on
    assert written == []
    gate.set()
    disk.write(20, values[20:])
    assert torch.equal(disk.raw(torch.arange(40)), values)  # waited for every write
    assert sorted(written) == [0, 10 * 24, 20 * 24]
    disk.close()
    assert not any(t.name.startswith("feda2v-cache-writer") for t in threading.enumerate())


def test_a_failed_background_write_is_raised_by_the_next_write_or_read(monkeypatch):
    import errno
    import os

    from feda2v_toolkit.runtime import scratch

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(scratch.os, "pwrite", full)
    disk = ReducedCache(8, 2, 3, torch.zeros(8, dtype=torch.long), None, in_memory=False)
    disk.write(0, torch.ones(4, 2, 3))
    with pytest.raises(OSError) as raised:
        disk.raw(torch.arange(4))
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        disk.write(4, torch.ones(4, 2, 3))
    disk.close()  # closing after a failure is clean


def test_an_abandoned_cache_ends_its_writer_thread():
    import gc
    import threading

    disk = ReducedCache(8, 2, 3, torch.zeros(8, dtype=torch.long), None, in_memory=False)
    disk.write(0, torch.ones(8, 2, 3))
    thread = next(t for t in threading.enumerate() if t.name.startswith("feda2v-cache-writer"))
    del disk
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_the_budget_comes_from_the_option_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv(ENV_MEMORY_BUDGET, raising=False)
    monkeypatch.setenv("FEDA2V_MEMORY_LIMIT", str(64 * 2**30))
    assert memory_budget() == DEFAULT_MEMORY_BUDGET
    monkeypatch.setenv(ENV_MEMORY_BUDGET, "1GiB")
    assert memory_budget() == 2**30
    set_memory_budget(3 * 2**30)
    assert memory_budget() == 3 * 2**30
    assert cache_in_memory(3 * 2**30 // 4) and not cache_in_memory(3 * 2**30 // 4 + 1)
    monkeypatch.setenv("FEDA2V_MEMORY_LIMIT", str(2**30))
    assert memory_budget() == 2**30  # never more than the machine (or its limit) has
    set_memory_budget(None)
    monkeypatch.setenv(ENV_MEMORY_BUDGET, "lots")
    with pytest.raises(UsageError, match="FEDA2V_MEMORY_BUDGET"):
        memory_budget()


def test_train_past_the_budget_keeps_its_cache_on_disk_and_writes_the_same_model(tiny_data, tmp_path, monkeypatch):
    from feda2v_toolkit.training import site as site_module
    from feda2v_toolkit.training.pipeline import train

    made: list[ReducedCache] = []
    original = site_module.ReducedCache

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(site_module, "ReducedCache", spy)
    cfg = {"generator_type": "gaussian", "generator_training_sequence_length": 4, "generator_latent_dim": 8,
           "generator_upsampler": "lstsq", "generator_checkpoint_dir": str(tmp_path / "ck")}
    train(cfg, tiny_data, out=tmp_path / "mem.safetensors", seed=1)
    set_memory_budget(1024)  # far less than the 40 x 4 x 16 x 4 bytes of the cache
    train(cfg, tiny_data, out=tmp_path / "disk.safetensors", seed=1)
    assert [c.in_memory for c in made] == [True, False]

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(tmp_path / "mem.safetensors") == sha(tmp_path / "disk.safetensors")


def test_the_statistics_taken_while_reducing_are_those_of_the_training_pairs(tiny_data):
    from feda2v_toolkit.training.site import Site
    from feda2v_toolkit.training.spec import RunSpec
    from feda2v_toolkit.training.stages import FittedStatisticsStage

    spec = RunSpec.resolve({"generator_type": "gaussian", "generator_training_sequence_length": 4,
                            "generator_upsampler": "lstsq"}, seed=0)
    site = Site(tiny_data, spec, 0)
    reducer = site._reducer()
    site.reduce(reducer.state_dict(), site.ds.class_names)
    fused = site.upsampler_statistics()
    streamed = FittedStatisticsStage().local(site._upsampler(), site._pairs())
    assert set(fused) == set(streamed)
    for k in fused:  # other chunks: the float32 products round differently (lstsq.fit_statistics)
        torch.testing.assert_close(fused[k], streamed[k], rtol=1e-6, atol=1e-6 * float(streamed[k].abs().max()))


def test_the_reduce_pass_finds_nan_and_inf_in_the_reduced_sequences_without_another_pass(tmp_path, monkeypatch):
    """adaptive_avg (the default) propagates NaN and inf: the pass checks its reductions, never the full chunks
    again, and still names the file and the sample."""
    from feda2v_toolkit.data.dataset import Dataset
    from feda2v_toolkit.data.writer import write_dataset
    from feda2v_toolkit.errors import InputError
    from feda2v_toolkit.training.pipeline import train

    checks: list[bool] = []
    original = Dataset.check_finite
    monkeypatch.setattr(Dataset, "check_finite",
                        lambda self, emb, idx, summary=None: checks.append(summary is not None)
                        or original(self, emb, idx, summary=summary))
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(24, 20, 4, generator=g)
    cfg = {"generator_type": "gaussian", "generator_training_sequence_length": 4,
           "generator_checkpoint_dir": str(tmp_path / "ck")}
    good = write_dataset(tmp_path / "good.safetensors", emb, torch.arange(24) % 2)
    train(cfg, good, out=tmp_path / "m.safetensors", seed=0)
    assert checks and all(checks)
    for position, value in ((0, float("nan")), (13, float("inf")), (19, float("-inf"))):
        bad = emb.clone()
        bad[17, position, 2] = value
        path = write_dataset(tmp_path / f"bad{position}.safetensors", bad, torch.arange(24) % 2)
        with pytest.raises(InputError, match=rf"bad{position}\.safetensors: sample 17 contains NaN or inf"):
            train(cfg, path, out=tmp_path / "m.safetensors", seed=0, overwrite=True)


def test_the_memory_budget_option_rejects_a_non_size(tmp_path, tiny_data):
    from click.testing import CliRunner

    from feda2v_toolkit.cli import cli

    r = CliRunner().invoke(cli, ["train", "-d", str(tiny_data), "-o", str(tmp_path / "m.safetensors"),
                                 "--memory-budget", "lots"])
    assert r.exit_code == 2
    assert "--memory-budget" in r.output and "cannot read 'lots' as a size" in r.output


def test_train_lets_go_of_its_cache_file_when_it_ends(tiny_data, tmp_path, monkeypatch):
    from feda2v_toolkit.training import site as site_module
    from feda2v_toolkit.training.pipeline import train

    made: list[ReducedCache] = []
    original = site_module.ReducedCache
    monkeypatch.setattr(site_module, "ReducedCache", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    set_memory_budget(1024)
    train({"generator_type": "gaussian", "generator_training_sequence_length": 4, "generator_latent_dim": 8,
           "generator_checkpoint_dir": str(tmp_path / "ck")}, tiny_data, out=tmp_path / "m.safetensors", seed=1)
    assert len(made) == 1 and not made[0].in_memory and made[0]._file is None


def test_heldout_reconstruction_matches_float64_arithmetic(tmp_path):
    """The held-out errors are float32 differences summed in float64: against all-float64 arithmetic the sums
    agree to 1e-7, and so do the R^2 figures, whose total sum of squares subtracts a large positional pattern
    (as AST embeddings have) from the squared norms."""
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.writer import write_dataset
    from feda2v_toolkit.training.streams import heldout_reconstruction, reconstruction_metrics, squared_norm
    from feda2v_toolkit.upsamplers.interpolate import NearestUpsampler, interpolate_sequence

    g = torch.Generator().manual_seed(0)
    pattern = 30 * torch.randn(1, 40, 16, generator=g)
    emb = pattern + torch.randn(20, 40, 16, generator=g)
    ds = open_dataset(write_dataset(tmp_path / "d.safetensors", emb, torch.arange(20) % 2))
    reduced = torch.nn.functional.adaptive_avg_pool1d(emb.transpose(1, 2), 8).transpose(1, 2)
    rows = torch.tensor([1, 2, 3, 7, 11, 12, 19])
    sums = heldout_reconstruction(ds, rows, lambda r: reduced[r], NearestUpsampler(), torch.device("cpu"))
    x = emb[rows].double()
    near = interpolate_sequence(reduced[rows], 40, "nearest").double()
    lin = interpolate_sequence(reduced[rows], 40, "linear").double()
    sse, sse_lin = float((x - near).square().sum()), float((x - lin).square().sum())
    assert abs(sse - sse_lin) > 1e-3 * sse  # the two reconstructions differ: the sums cannot be swapped unseen
    assert float(sums["count"]) == 7
    assert float(sums["sse"]) == pytest.approx(sse, rel=1e-7)
    assert float(sums["sse_linear"]) == pytest.approx(sse_lin, rel=1e-7)
    assert float(sums["sumsq"]) == pytest.approx(float(x.square().sum()), rel=1e-7)
    sst = float((x - x.mean(0)).square().sum())
    assert sst < 0.01 * float(x.square().sum())  # the pattern dominates the squared norms
    metrics = reconstruction_metrics(sums, 40, 16)
    assert metrics["heldout_r2"] == pytest.approx(1 - sse / sst, rel=1e-7)
    assert metrics["heldout_r2_linear"] == pytest.approx(1 - sse_lin / sst, rel=1e-7)
    assert float(squared_norm(torch.full((3, 5), 2.0))) == pytest.approx(60.0, rel=1e-7)
