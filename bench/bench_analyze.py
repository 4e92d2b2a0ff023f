"""Wall time and peak memory of ``feda2v-tk analyze`` on the demo data at real AST shape.

    python bench/bench_analyze.py [--data PATH] [--per-class 60] [--lengths 4,8,16,32,64] [--json OUT]

Writes the demo dataset (4 classes x ``--per-class`` clips of [1214, 768] float16: 240 clips = 447 MB by
default) unless ``--data`` names one, then runs the same analysis as ``feda2v-tk analyze --data PATH
--lengths 4,8,16,32,64`` in this process: every registered reducer/upsampler pair, the linear optimum,
defaults otherwise. Prints the stage timings, the result table, the wall time and the peak resident
memory of the analysis (``VmHWM``, reset after the data are written; Linux), and the load average (the
machine's other work slows a 2-core run down).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _memory import reset_peak, status  # noqa: E402  (bench/ is the script's directory)

from feda2v_toolkit.analysis.analyze import analyze
from feda2v_toolkit.analysis.tables import analyze_text
from feda2v_toolkit.data.demo import write_demo_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--lengths", default="4,8,16,32,64")
    ap.add_argument("--json", type=Path, help="also write the analysis result as JSON here")
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = write_demo_dataset(Path(tmp) / "demo.safetensors", args.per_class)
            print(f"wrote demo data: {4 * args.per_class} x [1214, 768] float16 in {time.perf_counter() - t0:.1f}s")
        reset_peak()
        rss_before = status("VmRSS")
        t0 = time.perf_counter()
        result = analyze(data, lengths, log=lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
        wall = time.perf_counter() - t0
        peak = status("VmHWM")
        print()
        print(analyze_text(result))
        print()
        print(f"analyze: {result.sequences} sequences [{result.seq_len}, {result.dim}], lengths {args.lengths}, "
              f"{len(result.pairs)} pairs + linear optimum: {wall:.1f}s wall; peak RSS {peak / 2**30:.2f} GiB "
              f"(RSS before: {rss_before / 2**30:.2f} GiB); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(json.dumps(result.to_json(), indent=2, default=str))


if __name__ == "__main__":
    main()
