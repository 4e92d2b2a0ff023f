"""What a launcher (``torchrun``) tells a process through its environment: its rank, the number of ranks, how
long a collective may wait, which device it runs on. No torch import at import time: commands read these before
deciding anything heavy (:func:`rank_device` imports torch when called)."""

from __future__ import annotations

import os

from feda2v_toolkit.errors import InputError, UsageError, spelled

#: environment variables torchrun (and other launchers) set
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


#: environment variable: seconds a rank waits in a collective for the others (default: 24 hours -- ranks of an
#: ``embed`` run may finish their shards hours apart; a rank that fails ends the run through torchrun)
ENV_TIMEOUT = "FEDA2V_RANKS_TIMEOUT"


def collective_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_TIMEOUT, "") or 86400))
    except ValueError:
        raise InputError(f"{ENV_TIMEOUT}={os.environ.get(ENV_TIMEOUT)!r} is not a number of seconds") from None


def launched_rank() -> int:
    """``RANK`` as a launcher set it (0 when not launched by one): rank 0 speaks and writes for the run."""
    try:
        return max(0, int(os.environ.get("RANK", "0") or 0))
    except ValueError:
        return 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` as a launcher set it (1 when not launched by one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number of processes") from None


def _local(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, "") or default))
    except ValueError:
        raise InputError(f"{name}={os.environ.get(name)!r} is not a number") from None


def rank_device(device: str) -> str:
    """``cpu`` or ``cuda`` (or ``cuda:N`` in one process) for this process from ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N``.

    One process: ``auto`` is ``cuda`` when a GPU is available. Under a launcher (``WORLD_SIZE`` > 1) each rank
    takes the GPU of its local rank (NCCL runs one rank per GPU): ``auto`` is ``cuda`` only when every rank of
    this machine (``LOCAL_WORLD_SIZE``) has a GPU of its own, else the CPU for all of them (never some ranks of
    a machine on GPUs and others not; the machines of a multi-machine run must have alike GPUs); ``cuda`` with
    fewer GPUs than ranks on the machine is a usage error on every rank, naming the counts, and so is ``cuda:N``
    (the rank's GPU is its local rank's)."""
    import torch

    flag, cpu = spelled("--device cuda", "device='cuda'"), spelled("--device cpu", "device='cpu'")
    index = device.partition(":")[2]
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and index.isdigit()):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device == "cpu":
        return device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = launched_world_size()
    if world == 1:
        if device == "auto":
            return "cuda" if gpus else "cpu"
        if not gpus:
            raise UsageError(f"{flag}: no CUDA device is available (use {cpu} or auto)")
        if index and int(index) >= gpus:
            raise UsageError(f"device {device!r}: this machine has {gpus} GPU{'' if gpus == 1 else 's'} "
                             f"(cuda:0{f' to cuda:{gpus - 1}' if gpus > 1 else ''})")
        return device
    if index:
        raise UsageError(f"device {device!r} under torchrun: each rank uses the GPU of its local rank; "
                         "use cuda or auto")
    local_world = _local("LOCAL_WORLD_SIZE", world)
    if device == "auto":
        return "cuda" if gpus >= local_world else "cpu"
    if gpus < local_world:
        have = f"{gpus} GPU" + ("" if gpus == 1 else "s") if gpus else "no GPU"
        start = (f"start at most {gpus} rank{'' if gpus == 1 else 's'} per machine (torchrun --nproc-per-node "
                 f"{gpus}), or use {cpu}") if gpus else f"use {cpu}"
        raise UsageError(f"{flag}: {local_world} ranks on this machine but {have} (NCCL runs one rank per GPU): "
                         f"{start}")
    return device
