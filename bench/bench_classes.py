"""`train`'s peak memory and closed-form fit time against the number of classes (the gaussian's statistics).

VGGSound has 309 classes. The default `gaussian` is one generator with a mean per class and a covariance pooled
over the classes; what `train` holds for its statistics must not grow with the classes beyond their means.
This script writes clips that are already at the training length (``[16, 768]`` float16: the reduce pass is
then trivial and the statistics are what is measured), ``--per-class`` of them per class, with a low-rank
structure per class, and runs ``feda2v-tk train`` on them in a fresh process per class count, reading its
peak resident set (``VmHWM``) and the fit time it reports.

    python bench/bench_classes.py [--classes 4,77,309] [--per-class 40]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

L, D = 16, 768


def class_clips(classes: int, per_class: int, seed: int = 0, generator: Any = None) -> Iterator[tuple[Any, Any]]:
    """Each class's ``per_class`` clips ``[per_class, 16, 768]`` (float32) and labels, in class order: a class mean
    plus 64 random directions and noise (a flat spectrum, the hard case for a streamed cut); drawn from
    ``generator`` if given (it goes on from there), else from ``seed``."""
    import torch

    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    base = torch.randn(L, D, generator=g)
    for c in range(classes):
        mean = base + 0.5 * torch.randn(L, D, generator=g)
        z = torch.randn(per_class, 64, generator=g) @ torch.randn(64, L * D, generator=g).div(8)
        yield mean + z.view(per_class, L, D) + 0.3 * torch.randn(per_class, L, D, generator=g), \
            torch.full((per_class,), c)


def make_data(path: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """:func:`class_clips` written as float16 shards."""
    import torch

    from feda2v_toolkit.data.writer import DatasetWriter

    with DatasetWriter(path, class_names=[f"class{c:03d}" for c in range(classes)], dtype=torch.float16) as w:
        for x, labels in class_clips(classes, per_class, seed):
            w.add(x.half(), labels)


PROBE = """
import runpy, sys, atexit
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            print('HWM', int(line.split()[1]) * 1024, file=sys.stderr)
atexit.register(hwm)
sys.argv = ['feda2v-tk', *sys.argv[1:]]
runpy.run_module('feda2v_toolkit', run_name='__main__')
"""


def run_train(data: Path, out: Path, timeout: float) -> dict:
    cfg = out.with_suffix(".json")
    cfg.write_text(json.dumps({"generator_training_sequence_length": L}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "-c", str(cfg), "-d", str(data), "-o", str(out),
                           "--seed", "0", "--no-progress", "--checkpoint-dir", str(out.parent / "ck")],
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    hwm = int(re.search(r"^HWM (\d+)", proc.stderr, re.M).group(1))
    fit = re.search(r"in closed form.* in ([\d.]+)s", proc.stderr)
    loss = re.search(r"held-out loss ([-\d.e]+)", proc.stderr)
    return {"peak_rss": hwm, "wall": wall, "fit_seconds": float(fit.group(1)) if fit else None,
            "heldout_loss": float(loss.group(1)) if loss else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="4,77,309", help="class counts, comma-separated")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="feda2v-classes-") as tmp:
        for classes in (int(c) for c in args.classes.split(",")):
            data = Path(tmp) / f"c{classes}"
            make_data(data, classes, args.per_class)
            row = {"classes": classes, "clips": classes * args.per_class,
                   **run_train(data, Path(tmp) / f"m{classes}.safetensors", args.timeout)}
            rows.append(row)
            print(f"{classes:4d} classes x {args.per_class} clips: peak RSS {row['peak_rss'] / 1e9:.2f} GB, "
                  f"fit {row['fit_seconds']} s, wall {row['wall']:.1f} s, held-out loss {row['heldout_loss']}",
                  flush=True)
            shutil.rmtree(data)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
