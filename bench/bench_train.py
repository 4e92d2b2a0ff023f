"""Training and generation speed and memory, measured against in-run references.

Four measurements, each printed as a ratio taken in one run (these machines are noisy):

1. ``feda2v-tk train`` end to end (load, reduce, 20 epochs) on 240 x [1214, 768] float16 at training
   length 32 vs the original algorithm -- one sample at a time, per class, re-reducing the full sequence
   at every step -- with the same model size. The baseline's per-step cost is constant, so it is timed
   on ``--baseline-steps`` steps and scaled to the full 20 epochs (stated in the output).
2. Training throughput at length 32, hidden 1024, latent 256, D 768, batch 256, as a fraction of this
   machine's fp32 ``torch.mm`` rate measured in the same run.
3. ``generate`` writing [K, 1214, 768] float32 shards vs the disk's sequential write speed (a plain
   buffered write + fsync of the same number of bytes, same directory).
4. Peak resident memory of ``train`` on 2,000 x [1214, 768] float16 (3.7 GB on disk), in a subprocess.

Usage: python bench/bench_train.py [--only e2e,throughput,generate,memory] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _original import original_step  # noqa: E402  (bench/ is the script's directory)

EXE = str(Path(sys.executable).parent / "feda2v-tk")
L, D, H, Z = 1214, 768, 1024, 256


def mm_rate(n: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix-multiply rate of this machine in GFLOP/s (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def vae_flops_per_sample(length: int) -> float:
    """Matmul FLOPs of one VAE training sample (forward + backward = 3x forward)."""
    f = length * D
    macs = f * H + H * H + H * 2 * Z + Z * H + H * H + H * f
    return 3 * 2 * macs


def ensure_demo(path: Path, per_class: int) -> Path:
    if not path.exists():
        subprocess.run([EXE, "demo-data", str(path), "--per-class", str(per_class)], check=True)
    return path


def run_train(data: Path, out: Path, *, length: int, epochs: int, batch: int, workdir: Path) -> float:
    cfg = workdir / "bench-config.json"
    cfg.write_text(json.dumps({"feda2v": {
        "generator_training_sequence_length": length, "generator_training_epochs": epochs,
        "generator_batch_size": batch, "generator_validation_split": 0.0, "generator_save_checkpoint": False,
        "use_conditioned_vae": False, "generator_augmentation": True}}))
    t0 = time.perf_counter()
    subprocess.run([EXE, "train", "-c", str(cfg), "-d", str(data), "-o", str(out), "--seed", "0", "-q",
                    "--no-progress", "--checkpoint-dir", str(workdir / "ck")], check=True)
    return time.perf_counter() - t0


def baseline_seconds_per_step(data: Path, length: int, steps: int) -> float:
    """The original algorithm's step: read one full sequence, re-reduce it, batch-1 VAE step, AdamW."""
    from feda2v_toolkit.config import schema_defaults
    from feda2v_toolkit.data import open_dataset
    from feda2v_toolkit.generators.vae import VAEGenerator

    ds = open_dataset(data)
    cfg = {**schema_defaults(), "generator_augmentation": True}
    vae = VAEGenerator.from_config(cfg, seq_len=length, dim=D)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=1e-5)  # the original: plain AdamW
    per_class = {c: (ds.labels == c).nonzero().flatten() for c in range(ds.num_classes)}
    order = [int(i) for c in per_class for i in per_class[c]]
    vae.train()
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        x_full = ds.read([order[step % len(order)]]).embeddings  # [1, L, D]
        x = F.adaptive_avg_pool1d(x_full.transpose(1, 2), length).transpose(1, 2)
        original_step(vae, opt, x)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def bench_e2e(workdir: Path, baseline_steps: int) -> dict:
    data = ensure_demo(workdir / "demo240.safetensors", 60)
    epochs, length = 20, 32
    ours = run_train(data, workdir / "m32.safetensors", length=length, epochs=epochs, batch=32, workdir=workdir)
    per_step = baseline_seconds_per_step(data, length, baseline_steps)
    baseline = per_step * 240 * epochs
    return {"ours_s": ours, "baseline_s_per_step": per_step, "baseline_s_extrapolated": baseline,
            "speedup": baseline / ours, "baseline_steps_timed": baseline_steps}


def bench_throughput(batch: int = 256, steps: int = 6) -> dict:
    from feda2v_toolkit.components import TrainContext
    from feda2v_toolkit.config import schema_defaults
    from feda2v_toolkit.generators.vae import VAEGenerator

    cfg = {**schema_defaults(), "generator_augmentation": True}
    vae = VAEGenerator.from_config(cfg, seq_len=32, dim=D)
    opts = vae.configure_optimizers(cfg)
    x = torch.randn(batch, 32, D)
    vae.train()
    times = []
    for step in range(steps + 2):
        ctx = TrainContext(epoch=0, total_epochs=1, step=step, progress=0.5, config=cfg)
        t0 = time.perf_counter()
        vae.training_step(x, labels=None, conditions=None, optimizers=opts, ctx=ctx)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    achieved = vae_flops_per_sample(32) * batch / step_s / 1e9
    rate = mm_rate()
    return {"step_s": step_s, "samples_per_s": batch / step_s, "gflops": achieved, "mm_gflops": rate,
            "fraction_of_mm": achieved / rate}


def disk_write_rate(directory: Path, nbytes: int) -> float:
    """Sequential write + fsync of ``nbytes`` in 64 MiB blocks: bytes/s."""
    block = os.urandom(64 * 2**20)
    path = directory / "disk-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        written = 0
        while written < nbytes:
            fh.write(block)
            written += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return written / seconds


def bench_generate(workdir: Path, per_class: int = 128, rounds: int = 3) -> dict:
    """Generate vs the disk, interleaved over ``rounds`` (this virtual disk's speed swings several-fold).

    Steady state is generate's own timing (first sample to closed directory); the whole command adds
    process start-up (importing torch, loading the model).
    """
    model = workdir / "m32.safetensors"
    if not model.exists():
        data = ensure_demo(workdir / "demo240.safetensors", 60)
        run_train(data, model, length=32, epochs=2, batch=32, workdir=workdir)
    out = workdir / "gen"
    steady, command, disk = [], [], []
    nbytes = 0
    for _ in range(rounds):
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.perf_counter()
        proc = subprocess.run([EXE, "generate", str(model), "-o", str(out), "-k", str(per_class),
                               "--output-length", str(L), "--no-progress"], check=True, capture_output=True,
                              text=True)
        command.append(time.perf_counter() - t0)
        steady.append(float(re.search(r", ([0-9.]+)s\)", proc.stderr).group(1)))
        nbytes = sum(p.stat().st_size for p in out.iterdir())
        subprocess.run(["rm", "-rf", str(out)], check=True)
        disk.append(disk_write_rate(workdir, nbytes))
    med = statistics.median
    return {"bytes": nbytes, "rounds": rounds, "generate_s": med(steady), "command_s": med(command),
            "generate_MBps": nbytes / med(steady) / 1e6, "command_MBps": nbytes / med(command) / 1e6,
            "disk_MBps": med(disk) / 1e6, "disk_MBps_each": [d / 1e6 for d in disk],
            "fraction_of_disk": nbytes / med(steady) / med(disk),
            "command_fraction_of_disk": nbytes / med(command) / med(disk)}


def bench_memory(workdir: Path, n_per_class: int = 500) -> dict:
    data = workdir / "demo2000"
    if not data.exists():
        subprocess.run([EXE, "demo-data", str(data), "--per-class", str(n_per_class)], check=True)
    size = sum(p.stat().st_size for p in data.iterdir())
    code = (
        "import resource, sys; from feda2v_toolkit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    cfg = workdir / "mem-config.json"
    cfg.write_text(json.dumps({"generator_training_sequence_length": 32, "generator_training_epochs": 2,
                               "generator_batch_size": 32, "generator_save_checkpoint": False}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "train", "-c", str(cfg), "-d", str(data), "-o",
                           str(workdir / "mem.safetensors"), "--seed", "0", "-q", "--no-progress"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MAXRSS_KB"))
    peak = int(line.split()[1]) * 1024
    return {"data_bytes": size, "peak_rss_bytes": peak, "peak_rss_GB": peak / 1e9, "seconds": seconds,
            "returncode": proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="e2e,throughput,generate,memory")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--baseline-steps", type=int, default=40)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="feda2v-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, workdir {workdir}")
    results = {}
    if "e2e" in wanted:
        r = results["e2e"] = bench_e2e(workdir, args.baseline_steps)
        print(f"[e2e] train 240x[1214,768] fp16, l=32, 20 epochs: {r['ours_s']:.1f}s; original algorithm "
              f"{r['baseline_s_per_step'] * 1e3:.1f} ms/step x 4800 steps = {r['baseline_s_extrapolated']:.0f}s "
              f"(timed on {r['baseline_steps_timed']} steps) -> speedup {r['speedup']:.1f}x (target >= 20x)")
    if "throughput" in wanted:
        r = results["throughput"] = bench_throughput()
        print(f"[throughput] VAE l=32 H=1024 Z=256 D=768 batch 256: {r['samples_per_s']:.0f} samples/s, "
              f"{r['gflops']:.0f} GFLOP/s vs torch.mm {r['mm_gflops']:.0f} GFLOP/s -> "
              f"{100 * r['fraction_of_mm']:.0f}% (target >= 40%)")
    if "generate" in wanted:
        r = results["generate"] = bench_generate(workdir)
        print(f"[generate] {r['bytes'] / 1e6:.0f} MB of [K,1214,768] fp32: {r['generate_MBps']:.0f} MB/s steady "
              f"({r['generate_s']:.1f}s), {r['command_MBps']:.0f} MB/s for the whole command ({r['command_s']:.1f}s, "
              f"start-up included) vs disk {r['disk_MBps']:.0f} MB/s (medians of {r['rounds']} interleaved rounds; "
              f"disk each: {', '.join(f'{d:.0f}' for d in r['disk_MBps_each'])}) -> "
              f"{100 * r['fraction_of_disk']:.0f}% steady, "
              f"{100 * r['command_fraction_of_disk']:.0f}% whole command (target >= 50%)")
    if "memory" in wanted:
        r = results["memory"] = bench_memory(workdir)
        print(f"[memory] train on 2000x[1214,768] fp16 ({r['data_bytes'] / 1e9:.1f} GB on disk): peak RSS "
              f"{r['peak_rss_GB']:.2f} GB in {r['seconds']:.0f}s, exit {r['returncode']} (target < 2 GB)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
