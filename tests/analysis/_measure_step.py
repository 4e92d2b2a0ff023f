"""Run in a fresh process: peak resident memory of a real training run's tensors (printed as JSON).

    python _measure_step.py '{"generator_type": "vae", ...}' LENGTH DIM

Warms the kernels up on a tiny model first (so their one-off buffers are not counted), records the
resident memory, then builds the generator and its optimisers and runs three training steps, all as the
trainer does; prints ``peak resident memory - resident memory before - library code paged in meanwhile``
(file-backed pages that kernels used for the first time fault in: not memory the plan is about).
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import torch

from feda2v_toolkit.analysis.plan import resolve_config
from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.plugins import get_registry


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ``ru_maxrss`` is no good here: after fork + exec
    it keeps the parent's resident size (pytest's), which can exceed this process's own peak."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def main() -> None:
    overrides, length, dim = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cfg = resolve_config(overrides)
    cls = get_registry().load("generator", cfg["generator_type"])
    batch = int(cfg["generator_batch_size"])
    torch.manual_seed(0)
    x = torch.randn(batch, length, dim)
    labels = torch.zeros(batch, dtype=torch.long)
    autocast = torch.bfloat16 if cfg["generator_autocast"] == "bfloat16" else None
    ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=0.5, config=cfg, autocast_dtype=autocast)
    small_cfg = {**cfg, "generator_hidden_dim": 8, "generator_latent_dim": 4}
    small = cls.from_config(small_cfg, seq_len=1, dim=dim, num_classes=4)
    opts = small.configure_optimizers(small_cfg)
    small.training_step(x[:, :1].contiguous(), labels=labels, conditions=None, optimizers=opts, ctx=ctx)
    del small, opts
    gc.collect()
    before, file_before = rss(), status("RssFile")
    reset_peak()
    gen = cls.from_config(cfg, seq_len=length, dim=dim, num_classes=4)
    opts = gen.configure_optimizers(cfg)
    for step in range(3):
        ctx.step = step
        gen.training_step(x, labels=labels, conditions=None, optimizers=opts, ctx=ctx)
    peak = status("VmHWM")
    code = status("RssFile") - file_before
    print(json.dumps({"before": before, "peak": peak, "library_pages": code, "delta": peak - before - code}))


if __name__ == "__main__":
    main()
