"""Throughput of ``VAEGenerator.training_step`` against this machine's fp32 ``torch.mm`` rate.

    python bench/bench_vae_step.py [--seq-len 32] [--batch 256] [--steps 5]

FLOPs counted: matmuls only. Forward is ``2 * B * (weight elements)``; backward is twice that, minus
the first encoder layer's input gradient (never computed: the data needs no gradient). The nominal
"3 x forward" count is printed too. The mm rate is measured in the same run on the layer shapes the
step multiplies (``[B, F] @ [F, H]`` and ``[B, H] @ [H, H]``), weighted by their FLOPs.
"""

from __future__ import annotations

import argparse
import time

import torch

from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.generators.vae import VAEGenerator


def timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def mm_rate(shapes: list[tuple[int, int, int]], steps: int) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` over ``shapes`` (total FLOPs / total time)."""
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds += timed(lambda a=a, b=b: torch.mm(a, b), steps)
        flops += 2.0 * m * k * n
    return flops / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    config = schema_defaults() | {"generator_training_sequence_length": args.seq_len}
    vae = VAEGenerator.from_config(config, seq_len=args.seq_len, dim=args.dim)
    opts = vae.configure_optimizers(config)
    x = torch.randn(args.batch, args.seq_len, args.dim)
    ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=0.5, config=config)
    step_s = timed(lambda: vae.training_step(x, labels=None, conditions=None, optimizers=opts, ctx=ctx),
                   args.steps)

    weights = [m.weight for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    fwd = 2.0 * args.batch * sum(w.numel() for w in weights)
    first = 2.0 * args.batch * vae.encoder[0].weight.numel()
    exact, nominal = 3 * fwd - first, 3 * fwd
    b, f, h, z = args.batch, args.seq_len * args.dim, vae.hidden_dim, vae.latent_dim
    mm = mm_rate([(b, f, h), (b, h, h), (b, h, 2 * z), (b, z, h), (b, h, f)], args.steps)

    params = sum(p.numel() for p in vae.parameters())
    print(f"VAE l={args.seq_len} D={args.dim} H={h} Z={z}: {params / 1e6:.2f} M params, batch {b}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"training_step: {step_s * 1e3:.1f} ms")
    print(f"  exact matmul FLOPs   {exact / 1e9:6.1f} GFLOP -> {exact / step_s / 1e9:6.1f} GFLOP/s")
    print(f"  nominal 3x forward   {nominal / 1e9:6.1f} GFLOP -> {nominal / step_s / 1e9:6.1f} GFLOP/s")
    print(f"torch.mm fp32 rate (same shapes): {mm:.1f} GFLOP/s")
    print(f"ratio (exact / mm): {exact / step_s / 1e9 / mm:.0%}   "
          f"(nominal / mm): {nominal / step_s / 1e9 / mm:.0%}")


if __name__ == "__main__":
    main()
