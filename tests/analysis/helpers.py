"""Shared helpers for the analysis tests: tiny structured data and running the CLI in-process."""

from __future__ import annotations

import json
from typing import Any

import torch

from feda2v_toolkit.cli import main

L, D = 50, 16


def structured(n: int, seed: int = 0, length: int = L, dim: int = D, rank: int = 3,
               noise: float = 0.1) -> torch.Tensor:
    """Sequences ``[n, length, dim]`` = shared mean + ``rank`` smooth position patterns with random
    feature coefficients + small noise: a linear reduction to ``rank`` positions can keep almost all."""
    g = torch.Generator().manual_seed(1234)  # the structure is fixed; only the draws depend on seed
    t = torch.linspace(0, 1, length)
    patterns = torch.stack([torch.cos(torch.pi * (k + 1) * t + k) for k in range(rank)], 1)  # [L, rank]
    mean = torch.randn(length, dim, generator=g)
    draw = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(n, rank, dim, generator=draw)
    return mean + patterns @ coeffs + noise * torch.randn(n, length, dim, generator=draw)


def run_main(capsys: Any, *args: str) -> tuple[int, str, str]:
    """Run ``feda2v-tk ARGS`` in this process; return (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: Any, *args: str) -> dict[str, Any]:
    code, out, err = run_main(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(capsys: Any, *args: str) -> tuple[int, str]:
    """Run a command expected to fail; check it fails with one line on stderr and no traceback."""
    code, _out, err = run_main(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("feda2v-tk: ") or
             line.startswith("feda2v-tk: error")]
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("feda2v-tk: error")]
    assert len(errors) == 1, err
    return code, errors[0]
