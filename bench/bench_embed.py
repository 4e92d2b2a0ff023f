"""Clips/s of ``feda2v-tk embed`` with the full-size AST against the model's forward pass alone, same run.

    python bench/bench_embed.py [--clips 16] [--batch-size 8] [--clip-seconds 5] [--device cpu] [--read-workers 1] [--json OUT]
    python bench/bench_embed.py --ranks 1,2,4 [--clips 8] [--batch-size 1] [--threads-per-rank 1] [--json OUT]
    python bench/bench_embed.py --inputs 1,2,4 [--clips 64] [--batch-size 8] [--clip-seconds 10] [--json OUT]

Builds the full-size AST architecture from ``ASTConfig()`` defaults (max_length 1024: 1214 tokens of width
768, ~87 M parameters) with random weights (seed 0), saves it and its feature extractor with
``save_pretrained`` to a temporary directory (no download), synthesises ``--clips`` ESC-50-like WAV files
(44.1 kHz mono, 5 s, two classes) and then, in this process:

1. the forward pass alone: ``ASTModel`` on precomputed features, in batches of ``--batch-size``, same clips;
2. ``embed``: read, downmix, resample, pad, features, forward, float16 shards, through the real
   ``from_pretrained`` path;
3. the forward pass alone again (the mean of 1 and 3 is the baseline: other load on the machine drifts).

Prints clips/s of both, the pipeline's cost over the forward pass alone, the forward time inside ``embed``,
peak resident memory of ``embed`` (``VmHWM``, reset before it; Linux) and the load average (other work on the machine slows a run down).

``--ranks 1,2,4`` (data-parallel scaling, issue 18) instead runs the ``embed`` command on the same model and clips
under ``torchrun --nproc-per-node K`` for each K, ``--threads-per-rank`` intra-op threads per rank (1: what torchrun
sets; the one-rank run gets the same), shards of one batch (``--shard-size 1``: under torchrun each rank embeds
whole shards), and prints each K's wall time (process start to exit: start-up and every rank's model load
included), clips/s, speed-up over one rank and scaling efficiency (speed-up / K), and the same for the embedding
loop alone (rank 0's report: its own clips over its loop's seconds, times K -- the rate that matters at
VGGSound scale, where start-up is a constant); every K must write the bytes of one rank (checked).

``--inputs 1,2,4`` measures what feeds the model -- what ``embed``'s read workers (threads) do for each batch: read,
downmix, resample, pad and the filterbank features -- with 1, 2, 4 workers, once with the extractor's own numpy
path (transformers' ``spectrogram``, a Python loop over frames) and once a clip's frames at once
(``audio/fbank.py``, what ``embed`` uses): clips/s of each (to set against the forward pass's rate on a GPU) and
whether the features are the same bytes (checked). With torchaudio installed the extractor computes them with
torchaudio, which is measured alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from _memory import reset_peak, status  # noqa: E402  (bench/ is the script's directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clip-seconds", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--read-workers", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--ranks", help="data-parallel scaling instead: comma-separated rank counts, e.g. 1,2,4")
    ap.add_argument("--threads-per-rank", type=int, default=1, help="intra-op threads per rank (with --ranks)")
    ap.add_argument("--inputs", help="the input side alone instead: comma-separated read worker counts, e.g. 1,2,4")
    args = ap.parse_args()

    import warnings

    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from feda2v_toolkit.audio.embed import ASTEmbedder, embed
    from feda2v_toolkit.audio.sources import ClipPolicy, load_clip, open_source

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        model = ASTModel(ASTConfig())
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "ast")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ASTFeatureExtractor().save_pretrained(tmp / "ast")
        del model
        rng = np.random.default_rng(0)
        for i in range(args.clips):
            t = np.arange(int(max(5.0, args.clip_seconds) * 44100)) / 44100  # 5 s, or as long as kept
            x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.shape)
            path = tmp / "clips" / ("dog" if i % 2 else "rain") / f"{i:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, x.astype(np.float32), 44100, subtype="PCM_16")
        if args.ranks:
            result = scaling(args, tmp, params)
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
            return
        source = open_source(tmp / "clips")
        policy = ClipPolicy(args.clip_seconds)
        embedder = ASTEmbedder(str(tmp / "ast"), device=args.device)
        if args.inputs:
            result = inputs(args, source, policy, embedder)
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
            return
        print(f"full-size AST: {params / 1e6:.1f} M parameters, {embedder.tokens} tokens x {embedder.dim}; "
              f"{args.clips} clips, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")

        waves = [load_clip(source.open(c), policy)[0] for c in source.clips]
        feats = [embedder.features(waves[i:i + args.batch_size]) for i in range(0, len(waves), args.batch_size)]
        embedder(feats[0][:1])  # warm-up

        def forward_alone() -> float:
            t0 = time.perf_counter()
            for f in feats:
                embedder(f)
            return time.perf_counter() - t0

        before = forward_alone()
        reset_peak()  # peak memory of embed itself, not of building and saving the random model
        t0 = time.perf_counter()
        report = embed(source, tmp / "out", policy=policy, batch_size=args.batch_size, embedder=embedder,
                       read_workers=args.read_workers, progress=False)
        wall = time.perf_counter() - t0
        peak = status("VmHWM")
        after = forward_alone()  # before and after: the machine's other load drifts
        forward = (before + after) / 2

    result = {"clips": args.clips, "batch_size": args.batch_size, "device": args.device,
              "threads": torch.get_num_threads(), "parameters": params,
              "forward_only_clips_per_s": round(args.clips / forward, 3),
              "embed_clips_per_s": round(args.clips / wall, 3),
              "pipeline_overhead": round(wall / forward - 1, 4),
              "overhead_over_own_forward": round(wall / report.model_seconds - 1, 4),
              "forward_only_runs_s": [round(before, 2), round(after, 2)],
              "forward_inside_embed_s": round(report.model_seconds, 2), "embed_wall_s": round(wall, 2),
              "forward_only_s": round(forward, 2), "peak_rss_mb": round(peak / 2**20),
              "load_average": os.getloadavg()}
    print(f"forward alone : {result['forward_only_clips_per_s']:.3f} clips/s ({forward:.1f} s)")
    print(f"embed         : {result['embed_clips_per_s']:.3f} clips/s ({wall:.1f} s; forward inside "
          f"{report.model_seconds:.1f} s)")
    print(f"forward alone : runs before and after embed: {before:.1f} s, {after:.1f} s")
    print(f"pipeline cost : {100 * result['pipeline_overhead']:+.1f}% over the forward pass alone (goal < 10%); "
          f"{100 * result['overhead_over_own_forward']:+.1f}% over embed's own forward passes")
    print(f"peak RSS      : {result['peak_rss_mb']} MB; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def inputs(args: argparse.Namespace, source, policy, embedder) -> dict:
    """Clips/s of the read workers' work (``embed._prepare`` through ``embed._prefetch``) for each worker count,
    with the extractor's filterbank and a clip's frames at once; the features of both compared."""
    from transformers.utils import is_speech_available

    from feda2v_toolkit.audio.embed import _prefetch, _prepare

    featurizer = embedder.featurizer
    applies = featurizer.fast  # the extractor's numpy path, reproduced (else: torchaudio's, measured alone)
    own = "extractor (torchaudio)" if is_speech_available() else "extractor (numpy, a loop over frames)"
    batches = [(0, source.clips[i:i + args.batch_size]) for i in range(0, len(source.clips), args.batch_size)]
    print(f"input side of embed: {len(source.clips)} clips of {policy.seconds:g} s (44.1 kHz WAV), batches of "
          f"{args.batch_size}; {os.cpu_count()} cores")
    rows, features = [], {}
    for path, fast in [(own, False)] + ([("a clip's frames at once", True)] if applies else []):
        featurizer.fast = fast
        for workers in [int(w) for w in args.inputs.split(",")]:
            t0 = time.perf_counter()
            out = [prepared[0] for _, _, prepared in _prefetch(batches, lambda b: _prepare(source, b[1], policy,
                                                                                        embedder), workers)]
            seconds = time.perf_counter() - t0
            features[fast] = np.concatenate(out)
            rows.append({"path": path, "workers": workers, "seconds": round(seconds, 3),
                         "clips_per_s": round(len(source.clips) / seconds, 1)})
            print(f"  {path:40s} {workers} worker(s): {rows[-1]['clips_per_s']:7.1f} clips/s ({seconds:.2f} s)")
    featurizer.fast = applies
    same = bool(np.array_equal(features[False], features[True])) if applies else None
    print(f"  the same features (bytes): {same if applies else 'one path only'}; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return {"clips": len(source.clips), "clip_seconds": policy.seconds, "batch_size": args.batch_size,
            "cores": os.cpu_count(), "rows": rows, "same_bytes": same, "load_average": os.getloadavg()}


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file ``embed`` wrote, by name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def scaling(args: argparse.Namespace, tmp: Path, params: int) -> dict:
    """``embed`` under torchrun with each rank count of ``--ranks``; wall time, speed-up, same bytes."""
    counts = [int(k) for k in args.ranks.split(",") if k.strip()]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    print(f"full-size AST: {params / 1e6:.1f} M parameters; {args.clips} clips, batch {args.batch_size}, shards of "
          f"one batch, {args.device}, {args.threads_per_rank} intra-op thread(s) per rank; {os.cpu_count()} cores",
          flush=True)
    runs, reference = [], None
    for k in counts:
        out = tmp / f"out-{k}"
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:0", "-m", "feda2v_toolkit", "embed", str(tmp / "clips"), "-o", str(out),
                "--model", str(tmp / "ast"), "--device", args.device, "--batch-size", str(args.batch_size),
                "--clip-seconds", str(args.clip_seconds), "--shard-size", "1", "--read-workers",
                str(args.read_workers), "-q", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{k} ranks: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        files = digest(out)
        reference = reference or files
        report = json.loads(proc.stdout)  # rank 0's: its own loop over its shards, after start-up and model load
        batches = [min(args.batch_size, args.clips - s) for s in range(0, args.clips, args.batch_size)]
        own = sum(batches[0::k])  # rank 0's clips: shards of one batch dealt out in turn
        run = {"ranks": k, "wall_s": round(wall, 2), "clips_per_s": round(args.clips / wall, 3),
               "rank0_loop_s": report["seconds"], "rank0_clips": own,
               "startup_s": round(wall - report["seconds"], 2),
               "same_bytes_as_first": files == reference, "load_average": os.getloadavg()}
        runs.append(run)
        print(f"{k} rank(s): {wall:6.1f} s, {run['clips_per_s']:.3f} clips/s; rank 0 embedded its {own} clips in "
              f"{report['seconds']:.1f} s; same bytes as {counts[0]} rank(s): {run['same_bytes_as_first']}",
              flush=True)
    base = runs[0]
    for run in runs:
        run["speedup"] = round(base["wall_s"] / run["wall_s"] * base["ranks"], 3)
        run["efficiency"] = round(run["speedup"] / run["ranks"], 3)
        # the loop's rate: clips per second of one rank's own loop, times the ranks (steady state, start-up aside)
        run["loop_speedup"] = round(run["rank0_clips"] / run["rank0_loop_s"] * run["ranks"]
                                    / (base["rank0_clips"] / base["rank0_loop_s"] * base["ranks"]), 3)
    print("| ranks | wall (s) | clips/s | speed-up over one rank | efficiency | start-up + load + assembly (s) | "
          "rank 0's loop (s / clips) | loop speed-up (x ranks) | same bytes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for run in runs:
        print(f"| {run['ranks']} | {run['wall_s']:.1f} | {run['clips_per_s']:.3f} | {run['speedup']:.2f}x | "
              f"{100 * run['efficiency']:.0f}% | {run['startup_s']:.1f} | {run['rank0_loop_s']:.1f} / "
              f"{run['rank0_clips']} | {run['loop_speedup']:.2f}x | {run['same_bytes_as_first']} |")
    return {"clips": args.clips, "batch_size": args.batch_size, "device": args.device, "parameters": params,
            "threads_per_rank": args.threads_per_rank, "cores": os.cpu_count(), "runs": runs}


if __name__ == "__main__":
    main()
