"""Ranks on GPUs: CUDA tensors travel through NCCL (``cpu:gloo,cuda:nccl``), trained generators train on CUDA.

Skipped without a CUDA GPU (CI has none); the two-rank run needs two GPUs (NCCL refuses two ranks on one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ONE_RANK_ON_NCCL = textwrap.dedent("""
    import socket
    import torch
    import torch.distributed as dist
    from feda2v_toolkit.runtime.ranks import TorchRanks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the group init_from_environment makes for --device cuda: gloo for CPU tensors, NCCL for CUDA ones
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    ranks = TorchRanks(owns_group=True)
    a = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    b = torch.full((4,), 0.5, dtype=torch.float64, device="cuda")
    ranks.sum_tensors([a, b])  # one NCCL all_reduce of the float64 concatenation
    assert a.device.type == "cuda" and torch.equal(a.cpu(), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(b.cpu(), torch.full((4,), 0.5, dtype=torch.float64))
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    p.grad = torch.full_like(p, 4.0)
    q = torch.nn.Parameter(torch.ones(2, device="cuda"))  # no gradient yet: zeros, on the parameter's device
    ranks.average_gradients([p, q], 0.25)
    assert torch.equal(p.grad.cpu(), torch.ones(3)) and q.grad.device.type == "cuda" and not q.grad.any()
    assert ranks.all_mean({"loss": 2.0}, 1.0) == {"loss": 2.0}  # CPU tensors: gloo
    assert ranks.all_strings("rank 0") == ["rank 0"]
    ranks.finish()
    print("nccl ok", torch.cuda.get_device_name(0))
""")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout importable first (also where it is not installed)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def test_the_collectives_of_cuda_training_run_on_nccl(tmp_path):
    """What a trained generator's ranks exchange on GPUs (gradients, DP-SGD's clipped sums) is CUDA tensors through
    NCCL; the loss terms and messages are CPU tensors through gloo. One rank: one GPU is enough."""
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK_ON_NCCL)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "nccl ok" in proc.stdout


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from feda2v_toolkit.data.demo import write_demo_dataset

    path = tmp_path_factory.mktemp("cuda") / "data.safetensors"
    write_demo_dataset(path, 64, seq_len=50, dim=16)
    return path


def feda2v(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(launcher or [sys.executable]), "-m", "feda2v_toolkit", *args], cwd=cwd,
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


VAE = ["train", "--seed", "3", "--training-length", "4", "--latent-dim", "8", "--generator-type", "vae",
       "--hidden-dim", "16", "--epochs", "2", "--upsampler", "linear", "--device", "cuda"]


def test_a_vae_trains_and_generates_on_cuda(small_data, tmp_path):
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.model.file import load_model

    trained = feda2v([*VAE, "-d", str(small_data), "-o", "vae.safetensors"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    model = load_model(tmp_path / "vae.safetensors")
    assert all(torch.isfinite(p).all() for p in model.generators["all"].parameters())
    made = feda2v(["generate", "vae.safetensors", "-o", "samples", "-k", "8", "--device", "cuda"], tmp_path)
    assert made.returncode == 0, made.stderr
    samples = open_dataset(tmp_path / "samples")
    assert len(samples) == 8 * len(samples.class_names)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two ranks need two GPUs (NCCL: one rank per GPU)")
def test_two_ranks_on_two_gpus_train_a_vae(small_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:0"]
    two = feda2v([*VAE, "-d", str(small_data), "-o", "vae.safetensors"], tmp_path, torchrun)
    assert two.returncode == 0, two.stderr
    assert "data-parallel: 2 ranks" in two.stderr
