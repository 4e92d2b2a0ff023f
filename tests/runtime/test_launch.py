"""Where each process runs: one process takes a GPU when there is one; torchrun's ranks take one GPU each or
all stay on the CPU (found on a one-GPU machine: two ranks with the default ``auto`` asked for a second GPU)."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.errors import InputError, UsageError
from feda2v_toolkit.runtime.launch import rank_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


@pytest.fixture
def launched(monkeypatch):
    """Pretend torchrun started this process as local rank ``rank`` of ``local`` ranks on this machine."""
    def set_launch(rank: int, local: int, world: int | None = None) -> None:
        for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world or local,
                            "LOCAL_WORLD_SIZE": local}.items():
            monkeypatch.setenv(name, str(value))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return set_launch


def test_one_process_takes_a_gpu_when_there_is_one(gpus, launched):
    gpus(1)
    assert rank_device("auto") == "cuda" and rank_device("cuda") == "cuda" and rank_device("cpu") == "cpu"
    assert rank_device("cuda:0") == "cuda:0"
    gpus(0)
    assert rank_device("auto") == "cpu"
    with pytest.raises(UsageError, match="no CUDA device is available"):
        rank_device("cuda")


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_on_a_machine_with_fewer_gpus_than_ranks_all_run_on_the_cpu(gpus, launched, rank):
    gpus(1)
    launched(rank, local=2)
    assert rank_device("auto") == "cpu"  # every rank alike: never one on the GPU and one on the CPU
    with pytest.raises(UsageError, match=r"2 ranks on this machine but 1 GPU .*--nproc-per-node 1\), or --device cpu"):
        rank_device("cuda")


def test_ranks_with_a_gpu_each_run_on_the_gpus(gpus, launched):
    gpus(2)
    launched(1, local=2, world=4)  # the second of two machines with two ranks each
    assert rank_device("auto") == "cuda" and rank_device("cuda") == "cuda"
    gpus(0)
    with pytest.raises(UsageError, match="2 ranks on this machine but no GPU .*: use --device cpu"):
        rank_device("cuda")


def test_a_device_that_is_none_of_them_or_a_bad_launch_variable_is_one_line(gpus, launched, monkeypatch):
    gpus(0)
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        rank_device("tpu")
    launched(0, local=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(InputError, match="LOCAL_WORLD_SIZE='two' is not a number"):
        rank_device("auto")


def test_train_resolves_its_device_the_same_way(gpus, launched):
    from feda2v_toolkit.training.pipeline import resolve_device

    gpus(1)
    launched(1, local=4)
    assert resolve_device("auto") == torch.device("cpu")
    launched(0, local=1)
    assert resolve_device("auto") == torch.device("cuda")
