"""Benchmark: start-up and throughput of `feda2v-tk validate` and `migrate --check` (no torch involved).

    python bench/bench_config.py [--runs 20] [--configs 1000]

Targets (issue 3): `validate` on one config at most 3x `python -c pass`; `validate` plus `migrate --check`
over a directory of 1,000 configs, one call each, under 5 s on a 2-core machine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = shutil.which("feda2v-tk", path=str(Path(sys.executable).parent)) or "feda2v-tk"
#: Byte-code caching on, as in any normal install (the warm-up run writes the .pyc files).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


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


def timed(cmd: list[str], runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system, seconds) of ``runs`` runs, after a warm-up.

    CPU time is the steadier figure on a busy machine; wall time is what a user waits.
    """
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=ENV)
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=ENV)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


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
        floor = timed([sys.executable, "-c", "import click, pluggy, importlib.metadata"], args.runs)
        help_ = timed([EXE, "--help"], args.runs)
        single = timed([EXE, "validate", str(one)], args.runs)
        directory_runs = max(3, args.runs // 5)
        validate_dir = timed([EXE, "validate", "-q", str(many)], directory_runs)
        migrate_dir = timed([EXE, "migrate", "--check", "-q", str(many)], directory_runs)

    rows = {
        "python -c pass": bare,
        "python -c 'import click, pluggy, importlib.metadata' (the CLI stack alone)": floor,
        "feda2v-tk --help": help_,
        "feda2v-tk validate one.json": single,
        f"feda2v-tk validate DIR ({args.configs} configs)": validate_dir,
        f"feda2v-tk migrate --check DIR ({args.configs} configs)": migrate_dir,
    }
    print(f"feda2v-tk config benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"Python {sys.version.split()[0]}, medians of {args.runs} runs ({directory_runs} for directories)\n")
    print("| command | wall (s) | CPU (s) | wall / `python -c pass` | CPU / `python -c pass` |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in rows.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {wall / bare[0]:.1f}x | {cpu / bare[1]:.1f}x |")
    total = validate_dir[0] + migrate_dir[0]
    ratio = single[0] / bare[0]
    print(f"\nvalidate start-up: {ratio:.1f}x `python -c pass` (target <= 3x: {'met' if ratio <= 3 else 'not met'}; "
          f"the CLI stack alone is {floor[0] / bare[0]:.1f}x)")
    print(f"validate + migrate --check over {args.configs} configs: {total:.2f} s "
          f"(target < 5 s: {'met' if total < 5 else 'not met'})")
    figures = {name: {"wall_s": wall, "cpu_s": cpu} for name, (wall, cpu) in rows.items()}
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
