"""Where each process runs: one process takes a GPU when there is one; torchrun's ranks take one GPU each or
all stay on the CPU (found on a one-GPU machine: two ranks with the default ``auto`` asked for a second GPU)."""

from __future__ import annotations

import pytest
import torch

from feda2v_toolkit.errors import InputError, UsageError, cli_caller
from feda2v_toolkit.runtime import ranks as ranks_module
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
    with pytest.raises(UsageError, match=r"device 'cuda:1': this machine has 1 GPU \(cuda:0\)"):
        rank_device("cuda:1")
    gpus(0)
    assert rank_device("auto") == "cpu"
    with pytest.raises(UsageError, match=r"device='cuda': no CUDA device is available \(use device='cpu' or auto"):
        rank_device("cuda")  # Python's spelling from Python, the options' from the command line
    with cli_caller(), pytest.raises(UsageError, match=r"--device cuda: no CUDA .* \(use --device cpu or auto"):
        rank_device("cuda")


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_on_a_machine_with_fewer_gpus_than_ranks_all_run_on_the_cpu(gpus, launched, rank):
    gpus(1)
    launched(rank, local=2)
    assert rank_device("auto") == "cpu"  # every rank alike: never one on the GPU and one on the CPU
    with cli_caller(), pytest.raises(UsageError, match=r"--device cuda: 2 ranks on this machine but 1 GPU .*: start "
                                                       r"at most 1 rank per machine .*--nproc-per-node 1\), or use "
                                                       r"--device cpu$") as refused:
        rank_device("cuda")
    assert "\n" not in str(refused.value)
    with pytest.raises(UsageError, match="each rank uses the GPU of its local rank; use cuda or auto"):
        rank_device("cuda:0")  # every rank would take GPU 0


def test_ranks_with_a_gpu_each_run_on_the_gpus(gpus, launched):
    gpus(2)
    launched(1, local=2, world=4)  # the second of two machines with two ranks each
    assert rank_device("auto") == "cuda" and rank_device("cuda") == "cuda"
    gpus(0)
    with cli_caller(), pytest.raises(UsageError, match="2 ranks on this machine but no GPU .*: use --device cpu$"):
        rank_device("cuda")


def test_without_local_world_size_the_ranks_count_as_on_one_machine(gpus, launched, monkeypatch):
    gpus(2)
    launched(0, local=2, world=4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not set it: the world size bounds it
    assert rank_device("auto") == "cpu"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")  # nonsense: at least this rank
    assert rank_device("auto") == "cuda"


def test_a_device_that_is_none_of_them_or_a_bad_launch_variable_is_one_line(gpus, launched, monkeypatch):
    gpus(0)
    for bad in ("tpu", "cudaX", "cuda:", "cuda:-1"):
        with pytest.raises(UsageError, match=f"unknown device '{bad}'"):
            rank_device(bad)
    launched(0, local=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(InputError, match="LOCAL_WORLD_SIZE='two' is not a number"):
        rank_device("auto")


def test_train_resolves_its_device_the_same_way(gpus, launched):
    from feda2v_toolkit.training.pipeline import resolve_device

    gpus(1)
    launched(1, local=4)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="4 ranks on this machine but 1 GPU"):
        resolve_device(torch.device("cuda"))  # a torch.device is checked too
    launched(0, local=1)
    assert resolve_device("auto") == torch.device("cuda")


def test_ranks_on_a_one_gpu_machine_make_a_gloo_group_and_take_no_gpu(gpus, launched, monkeypatch):
    """What failed on the H200: rank 1 of 2 asked for GPU 1 (``set_device``) and the group expected NCCL."""
    import torch.distributed as dist

    gpus(1)
    launched(1, local=2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set_device", i))
    monkeypatch.setattr("atexit.register", lambda f: None)
    monkeypatch.setattr(ranks_module, "TorchRanks", lambda owns_group: "ranks")
    assert ranks_module.init_from_environment("auto") == "ranks"
    assert seen == {"backend": "gloo"}
    gpus(2)  # a GPU each: NCCL for CUDA tensors, this rank on GPU 1
    seen.clear()
    ranks_module.init_from_environment("auto")
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "set_device": 1}


def test_the_embedder_resolves_its_device_the_same_way(gpus, launched, tmp_path):
    pytest.importorskip("transformers")
    from audio_fakes import save_tiny_ast

    from feda2v_toolkit.audio.embed import ASTEmbedder

    model = save_tiny_ast(tmp_path / "ast")
    gpus(1)
    launched(1, local=2)
    assert ASTEmbedder(str(model), device="auto").device == "cpu"
    with pytest.raises(UsageError, match="2 ranks on this machine but 1 GPU"):
        ASTEmbedder(str(model), device="cuda")
