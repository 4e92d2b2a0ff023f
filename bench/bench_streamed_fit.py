"""The gaussian's statistics streamed block by block against its whole-data fit, on the realistic corpus.

``train`` takes the closed-form gaussian's statistics from its reduced cache one block at a time and keeps
what it holds bounded by cutting the within-class scatter's factor to its top directions as it streams
(``GeneratorStatisticsStage``). This script measures what the cut costs, for each way of streaming:

* ``per-class``: one exchange; per class, a factor of at most ``2 x rank`` rows, re-factored to ``rank``
  (memory grows with the number of classes; the form before the two exchanges);
* ``pooled xK``: two exchanges (the class means first); one pooled factor of at most ``2 x K x rank`` rows,
  re-factored to ``K x rank`` (memory independent of the number of classes; ``train`` streams with
  :data:`~feda2v_toolkit.training.stages.STREAM_KEEP`), in one stream in block order (``train`` until stop 33);
* ``x2, lanes``: ``train``'s way -- pooled x2, the blocks in :data:`~feda2v_toolkit.runtime.ranks.LANES` fixed
  lanes, merged up a fixed pairwise tree (since stop 35; in lane order at stop 34); the ranks share them out.

Against the whole-data fit (every row at once, exact): the held-out negative log-likelihood per element
(lower is better), the overlap of the components' subspace (mean squared cosine of the principal angles,
1 = the same) and the variance the components keep; and the largest factor held while streaming (rows).

    python bench/bench_streamed_fit.py [--per-class 32] [--rank 32] [--block 40]
    python bench/bench_streamed_fit.py --time [--rows 14400] [--block 460]
    python bench/bench_streamed_fit.py --sites 4

``--time``: the streamed statistics at ``train``'s real shape (``l x D = 16 x 768`` features, rank 256, blocks of
460 training rows: a 512-row block less its held-out tenth; 14,400 rows: 16,000 clips), on synthetic rows with a
decaying spectrum, for each way of cutting (the products' dtype, :data:`STREAM_DTYPE`, and how often,
:data:`REFACTOR`; float64 at 1.0 is about stop 29's, which stacked ``4 x rank`` rows exactly before its first
cut): seconds and their ratio to the first way's in the same run, the most memory the statistics added (the
peak resident set, ``VmHWM``, reset before each way), and the fit against the first way's (explained
variance, shrinkage, overlap of the components).

``--sites S``: the shrinkage (Ledoit-Wolf, which needs ``||S||_F^2``) when S sites each stream, cut and release
their statistics and the releases are merged (``federate``), against one site with every row and the
whole-data fit: with the estimate of what the sites left out (``_left_out_cross_terms``) and with the factors'
cross terms only (stop 29); sites of alternate clips and sites split by class; on ``bench_classes.py``'s flat
spectrum (77 classes x 40 clips, rank 256: the hard case) and the realistic corpus (rank 16).

The corpus (``bench/corpus.py``) is built once into the cache directory. The rank and the block are small
so that a corpus of a few hundred clips is cut many times, as VGGSound's ~200,000 clips would be at the
default rank 256 and 512-row blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def reduced_corpus(per_class: int, length: int, keep_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every corpus clip reduced by ``adaptive_avg`` to ``length`` tokens, and its label."""
    from corpus import ensure_corpus

    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer

    ds = open_dataset(ensure_corpus(per_class=per_class, seed=0, quiet=True))
    reducer = AdaptiveAvgReducer(length=length, keep=keep_tokens)
    out = []
    with torch.no_grad():
        for batch in ds.stream([torch.arange(s, min(s + 32, len(ds))) for s in range(0, len(ds), 32)]):
            out.append(reducer(batch.embeddings))
    return torch.cat(out), ds.labels.clone()


def streamed(gen, x, labels, block: int, keep: int | None, lanes: bool = False) -> tuple[dict, int]:
    """The statistics of ``x`` merged one block at a time; ``keep`` None: the per-class form. ``lanes``: as
    ``train`` merges them, in :data:`~feda2v_toolkit.runtime.ranks.LANES` fixed lanes (block ``b`` in lane
    ``b mod LANES``, then the lanes up a fixed tree: ``Ranks.combine_lanes``); else one stream in block order."""
    from feda2v_toolkit.generators.gaussian import GaussianGenerator
    from feda2v_toolkit.runtime.ranks import Ranks
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    stage = GeneratorStatisticsStage()
    blocks = [(x[s:s + block], labels[s:s + block]) for s in range(0, x.shape[0], block)]
    means = None
    if keep is not None:
        means = stage.means([stage.means_local(gen, xb, lb) for xb, lb in blocks])
    extra = {} if means is None else {"means": means}
    held = [0]

    def part(b: int) -> dict:
        return dict(gen.fit_statistics(blocks[b][0], labels=blocks[b][1], max_rank=None, **extra))

    def merge(acc: dict | None, p: dict) -> dict:
        acc = p if acc is None else GaussianGenerator.merge_statistics([acc, p], max_rank=gen.rank * (keep or 1))
        held[0] = max(held[0], int(acc["factors"].shape[0]))
        return acc

    combine = Ranks().combine_lanes if lanes else Ranks().combine
    acc = combine(len(blocks), part, merge)
    return GaussianGenerator.merge_statistics([acc], max_rank=gen.rank, compact=True), held[0]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of ``a`` and ``b``."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    return float(torch.linalg.svdvals(qa.T @ qb).square().mean())


def timing(rows: int, block: int, rank: int = 256, length: int = 16, dim: int = 768, classes: int = 4,
           repeats: int = 2) -> list[dict]:
    """The streamed statistics at ``train``'s shape for each (dtype, re-factor fraction); see the docstring."""
    from _memory import reset_peak, status

    import feda2v_toolkit.generators.gaussian as gaussian
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    g = torch.Generator().manual_seed(0)
    features = length * dim
    x = torch.empty(rows, length, dim)
    spectrum = torch.arange(1, 601, dtype=torch.float32).pow(-0.7) * 30  # 600 directions above a flat floor
    basis = torch.randn(600, features, generator=g) / features ** 0.5
    for s in range(0, rows, 1024):
        k = min(1024, rows - s)
        x[s:s + k] = ((torch.randn(k, 600, generator=g) * spectrum) @ basis
                      + 0.3 * torch.randn(k, features, generator=g)).view(k, length, dim)
    labels = torch.arange(rows) % classes
    stage = GeneratorStatisticsStage()
    blocks = [(x[s:s + block], labels[s:s + block]) for s in range(0, rows, block)]
    ways = ((torch.float64, 1.0), (torch.float64, 0.5), (torch.float32, 1.0), (torch.float32, 0.5))
    runs: list[dict] = []
    saved = gaussian.STREAM_DTYPE, gaussian.REFACTOR
    try:  # every way `repeats` times, interleaved: this machine's speed drifts within a process
        for dtype, fraction in [w for _ in range(repeats) for w in ways]:
            gaussian.STREAM_DTYPE, gaussian.REFACTOR = dtype, fraction
            gen = gaussian.GaussianGenerator(seq_len=length, dim=dim, rank=rank, num_classes=classes,
                                             conditioning="label")
            means = stage.means([stage.means_local(gen, xb, lb) for xb, lb in blocks])
            base = status("VmRSS") / 1e6
            reset_peak()  # VmHWM from here: the statistics' own peak
            t0 = time.perf_counter()
            acc = None
            for xb, lb in blocks:
                acc = stage.accumulate(gen, acc, stage.local(gen, xb, lb, None, means=means))
            release = stage.compact(gen, acc)
            seconds = time.perf_counter() - t0
            added = status("VmHWM") / 1e6 - base
            fit = stage.finish(gen, release)
            runs.append({"dtype": str(dtype).replace("torch.", ""), "refactor": fraction, "seconds": seconds,
                         "added_mb": added, "explained": fit["explained"], "shrinkage": fit["shrinkage"],
                         "components": gen.components.detach().clone()})
            del acc, release
    finally:
        gaussian.STREAM_DTYPE, gaussian.REFACTOR = saved
    out = []
    for i in range(len(ways)):
        mine = runs[i::len(ways)]
        out.append({**{k: v for k, v in mine[0].items() if k != "components"},
                    "seconds": [r["seconds"] for r in mine], "added_mb": [r["added_mb"] for r in mine],
                    "ratio": min(r["seconds"] for r in mine) / min(r["seconds"] for r in runs[0::len(ways)]),
                    "overlap": overlap(mine[0]["components"], runs[0]["components"])})
    return out


def site_merges(sites: int) -> list[dict]:
    """The shrinkage of merged site releases; see the docstring."""
    from bench_classes import L as length
    from bench_classes import class_clips

    from feda2v_toolkit.generators.gaussian import (
        GaussianGenerator,
        _left_out_cross_terms,
        ledoit_wolf_from_sums,
    )
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    stage = GeneratorStatisticsStage()
    g = torch.Generator().manual_seed(0)
    clips = list(class_clips(77, 40, generator=g))  # bench_classes.py's flat spectrum, in memory; g goes on
    x, labels = reduced_corpus(32, length, 2)
    datasets = [("flat spectrum, 77 classes x 40 clips", torch.cat([c for c, _ in clips]),
                 torch.cat([lab for _, lab in clips]), 256),
                ("realistic corpus", (x - x.mean(0)) / x.std(0).clamp(min=1e-6), labels, 16)]
    out = []
    for name, x, labels, rank in datasets:
        perm = torch.randperm(x.shape[0], generator=g)
        x, labels = x[perm], labels[perm]
        classes, n, features = int(labels.max()) + 1, x.shape[0], x.shape[1] * x.shape[2]

        def model(rank: int = rank, classes: int = classes) -> GaussianGenerator:
            return GaussianGenerator(seq_len=length, dim=768, rank=rank, num_classes=classes, conditioning="label")

        def release(rows: torch.Tensor, means: torch.Tensor, x: torch.Tensor = x, labels: torch.Tensor = labels) -> dict:
            gen, acc = model(), None
            for s in range(0, rows.numel(), 460):
                r = rows[s:s + 460]
                acc = stage.accumulate(gen, acc, stage.local(gen, x[r], labels[r], None, means=means))
            return stage.compact(gen, acc)

        means = stage.means([stage.means_local(model(), x, labels)])
        whole = model().fit(x, labels=labels)["shrinkage"]
        one = stage.finish(model(), release(torch.arange(n), means))["shrinkage"]
        for split in ("alternate clips", "by class"):
            rows = [torch.arange(i, n, sites) for i in range(sites)] if split == "alternate clips" else \
                [torch.nonzero(labels % sites == i).flatten() for i in range(sites)]
            parts = [release(r, means) for r in rows]
            merged = stage.merge(GaussianGenerator, parts)
            estimated = stage.finish(model(), merged)["shrinkage"]
            without = float(merged["scatter_norm2"]) - _left_out_cross_terms(parts, [p["factors"] for p in parts])
            factors_only = ledoit_wolf_from_sums(without, float(merged["square"].sum()), float(merged["quartic"].sum()),
                                                 features, int(float(merged["counts"].sum())))
            out.append({"data": name, "rank": rank, "split": split, "whole": whole, "one_site": one,
                        "factors_only": factors_only, "estimated": estimated})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--keep-tokens", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--time", action="store_true", help="time the streamed statistics at train's real shape")
    ap.add_argument("--rows", type=int, default=14400, help="--time: training rows")
    ap.add_argument("--sites", type=int, default=0, help="the shrinkage of this many sites' merged releases")
    args = ap.parse_args(argv)
    if args.sites:
        rows = site_merges(args.sites)
        print(f"Ledoit-Wolf shrinkage, {args.sites} sites each streaming and cutting, their releases merged")
        print(f"{'data':38s} {'rank':>4s} {'sites':16s} {'whole':>8s} {'one site':>8s} {'factors only':>12s} "
              f"{'estimated':>9s}")
        for r in rows:
            print(f"{r['data']:38s} {r['rank']:4d} {r['split']:16s} {r['whole']:8.5f} {r['one_site']:8.5f} "
                  f"{r['factors_only']:12.5f} {r['estimated']:9.5f}")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))
        return 0
    if args.time:
        block = 460 if args.block == 40 else args.block
        rows = timing(args.rows, block)
        print(f"streamed gaussian statistics: {args.rows} rows of 16 x 768, rank 256, blocks of {block}, "
              f"{torch.get_num_threads()} threads")
        print(f"{'dtype':8s} {'refactor':>8s} {'seconds (each run)':>20s} {'best vs first':>13s} "
              f"{'added MB':>12s} {'explained':>10s} {'shrinkage':>10s} {'overlap':>8s}")
        for r in rows:
            secs = " / ".join(f"{t:.2f}" for t in r["seconds"])
            mb = " / ".join(f"{m:.0f}" for m in r["added_mb"])
            print(f"{r['dtype']:8s} {r['refactor']:8.1f} {secs:>20s} {r['ratio']:13.2f} {mb:>12s} "
                  f"{r['explained']:10.6f} {r['shrinkage']:10.7f} {r['overlap']:8.5f}")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                            indent=1))
        return 0

    from feda2v_toolkit.components import TrainContext
    from feda2v_toolkit.generators.gaussian import GaussianGenerator

    x, labels = reduced_corpus(args.per_class, args.length, args.keep_tokens)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(x.shape[0], generator=g)
    held = order[: x.shape[0] // 5]
    train = order[x.shape[0] // 5:].sort().values  # on-disk order, as the blocks are
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    classes = int(labels.max()) + 1
    ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=1.0, config={}, autocast_dtype=None,
                       device=torch.device("cpu"))

    def model() -> GaussianGenerator:
        return GaussianGenerator(seq_len=args.length, dim=x.shape[2], rank=args.rank, num_classes=classes,
                                 conditioning="label")

    whole = model()
    whole.fit(x[train], labels=labels[train])
    ref_nll = whole.loss_terms(x[held], labels=labels[held], conditions=None, ctx=ctx)["loss"]
    ref_var = float(whole.components.double().square().sum())
    rows = [{"way": "whole data", "heldout_nll": ref_nll, "overlap": 1.0, "variance_kept": 1.0,
             "factor_rows_held": len(train), "seconds": None}]
    for name, keep, lanes in (("per-class", None, False), ("pooled x1", 1, False), ("pooled x2", 2, False),
                              ("pooled x4", 4, False), ("x2, lanes", 2, True)):
        gen = model()
        t0 = time.perf_counter()
        stats, most = streamed(gen, x[train], labels[train], args.block, keep, lanes)
        gen.fit_from_statistics(stats)
        seconds = time.perf_counter() - t0
        rows.append({"way": name, "heldout_nll": gen.loss_terms(x[held], labels=labels[held], conditions=None,
                                                                ctx=ctx)["loss"],
                     "overlap": overlap(gen.components, whole.components),
                     "variance_kept": float(gen.components.double().square().sum()) / ref_var,
                     "factor_rows_held": most, "seconds": seconds})
    print(f"realistic corpus: {x.shape[0]} clips, {classes} classes, l = {args.length}; rank {args.rank}, "
          f"blocks of {args.block} training clips ({len(train)}), {len(held)} held out")
    print(f"{'way':12s} {'held-out NLL':>13s} {'vs whole':>9s} {'overlap':>8s} {'variance':>9s} {'rows held':>9s}")
    for r in rows:
        print(f"{r['way']:12s} {r['heldout_nll']:13.5f} {r['heldout_nll'] - ref_nll:+9.5f} {r['overlap']:8.5f} "
              f"{r['variance_kept']:9.5f} {r['factor_rows_held']:9d}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
