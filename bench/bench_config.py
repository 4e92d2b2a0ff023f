"""Benchmark: start-up and throughput of `feda2v-tk validate` and `migrate --check` (no torch involved).

    python bench/bench_config.py [--runs 20] [--configs 1000]

Targets (issue 3): `validate` on one config at most 3x `python -c pass`; `validate` plus `migrate --check`
over a directory of 1,000 configs, one call each, under 5 s on a 2-core machine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = shutil.which("feda2v-tk", path=str(Path(sys.executable).parent)) or "feda2v-tk"


def config(i: int) -> dict:
    """A realistic full experiment config (about 60 lines), varied by ``i``."""
    return {
        "experiment": {"name": f"esc50-run-{i}", "seed": i},
        "federation": {"num_nodes": 3, "rounds": 10 + i % 5},
        "training": {"batch_size": 16, "learning_rate": 1e-4},
        "feda2v": {
            "schema_version": 2,
            "_comment_mode": "generated for the benchmark",
            "use_generator": True,
            "generator_training_mode": True,
            "generator_type": "vae" if i % 2 else "gan",
            "use_conditioned_vae": bool(i % 3),
            "generator_training_sequence_length": [4, 8, 16, 32][i % 4],
            "generator_output_sequence_length": 1214 if i % 2 else None,
            "generator_training_epochs": 50 + i % 50,
            "synthetic_samples_per_class": "auto" if i % 5 == 0 else 10,
            "generator_granularity": "per_group",
            "generator_class_groups": {"animals": ["dog", "rooster", "cow"], "nature": ["rain", "sea_waves"]},
            "generator_learning_rate": 0.001,
            "generator_hidden_dim": 1024,
            "adapter_hidden_dim": 512,
            "diffusion_steps": 50,
        },
        "nodes": {str(n): {"dataset_split": f"train_{n}", "generator_class_group": ["animals", "nature"][n % 2]}
                  for n in range(3)},
        "model": {"audio_encoder": "ast"},
        "dataset": {"name": "esc50"},
        "wandb": {"enabled": False, "project": "feda2v"},
    }


def timed(cmd: list[str], runs: int) -> float:
    """Median wall time (seconds) of ``runs`` runs, after one warm-up run."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per start-up measurement (median)")
    parser.add_argument("--configs", type=int, default=1000, help="configs in the directory benchmark")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = root / "one.json"
        one.write_text(json.dumps(config(1), indent=2) + "\n")
        many = root / "many"
        many.mkdir()
        for i in range(args.configs):
            (many / f"config_{i:04d}.json").write_text(json.dumps(config(i), indent=2) + "\n")

        check = subprocess.run([EXE, "validate", one], capture_output=True, text=True)
        if check.returncode != 0:
            print(check.stdout, check.stderr, file=sys.stderr)
            return 1
        bare = timed([sys.executable, "-c", "pass"], args.runs)
        help_ = timed([EXE, "--help"], args.runs)
        single = timed([EXE, "validate", str(one)], args.runs)
        directory_runs = max(3, args.runs // 5)
        validate_dir = timed([EXE, "validate", "-q", str(many)], directory_runs)
        migrate_dir = timed([EXE, "migrate", "--check", "-q", str(many)], directory_runs)

    figures = {
        "python -c pass (s)": bare, "feda2v-tk --help (s)": help_, "validate one config (s)": single,
        "validate / python -c pass": single / bare,
        f"validate {args.configs} configs (s)": validate_dir,
        f"migrate --check {args.configs} configs (s)": migrate_dir,
        f"validate + migrate --check {args.configs} configs (s)": validate_dir + migrate_dir,
    }
    print(f"feda2v-tk config benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"median of {args.runs} runs (directory: {directory_runs})\n")
    print("| measurement | value |\n|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value:.3f}{'x' if '/' in name else ''} |")
    ratio_ok = single / bare <= 3
    dir_ok = validate_dir + migrate_dir < 5
    print(f"\nvalidate start-up target (<= 3x python -c pass): {'met' if ratio_ok else 'NOT met'}")
    print(f"1,000-config target (< 5 s for validate + migrate --check): {'met' if dir_ok else 'NOT met'}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
