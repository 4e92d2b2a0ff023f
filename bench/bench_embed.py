"""Clips/s of ``feda2v-tk embed`` with the full-size AST against the model's forward pass alone, same run.

    python bench/bench_embed.py [--clips 16] [--batch-size 8] [--clip-seconds 5] [--device cpu] [--read-workers 1] [--json OUT]

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
"""

from __future__ import annotations

import argparse
import json
import os
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
            t = np.arange(int(5.0 * 44100)) / 44100
            x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.shape)
            path = tmp / "clips" / ("dog" if i % 2 else "rain") / f"{i:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, x.astype(np.float32), 44100, subtype="PCM_16")
        source = open_source(tmp / "clips")
        policy = ClipPolicy(args.clip_seconds)
        embedder = ASTEmbedder(str(tmp / "ast"), device=args.device)
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


if __name__ == "__main__":
    main()
