"""The gaussian's statistics streamed block by block against its whole-data fit, on the realistic corpus.

``train`` takes the closed-form gaussian's statistics from its reduced cache one block at a time and keeps
what it holds bounded by cutting the within-class scatter's factor to its top directions as it streams
(``GeneratorStatisticsStage``). This script measures what the cut costs, for each way of streaming:

* ``per-class``: one exchange; per class, a factor of at most ``2 x rank`` rows, re-factored to ``rank``
  (memory grows with the number of classes; the form before the two exchanges);
* ``pooled xK``: two exchanges (the class means first); one pooled factor of at most ``2 x K x rank`` rows,
  re-factored to ``K x rank`` (memory independent of the number of classes; ``train`` streams with
  :data:`~feda2v_toolkit.training.stages.STREAM_KEEP`).

Against the whole-data fit (every row at once, exact): the held-out negative log-likelihood per element
(lower is better), the overlap of the components' subspace (mean squared cosine of the principal angles,
1 = the same) and the variance the components keep; and the largest factor held while streaming (rows).

    python bench/bench_streamed_fit.py [--per-class 32] [--rank 32] [--block 40]

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


def streamed(gen, x, labels, block: int, keep: int | None) -> tuple[dict, int]:
    """The statistics of ``x`` merged one block at a time as ``train`` does; ``keep`` None: the per-class form."""
    from feda2v_toolkit.generators.gaussian import GaussianGenerator
    from feda2v_toolkit.training.stages import GeneratorStatisticsStage

    stage = GeneratorStatisticsStage()
    blocks = [(x[s:s + block], labels[s:s + block]) for s in range(0, x.shape[0], block)]
    means = None
    if keep is not None:
        means = stage.means([stage.means_local(gen, xb, lb) for xb, lb in blocks])
    acc, held = None, 0
    for xb, lb in blocks:
        extra = {} if means is None else {"means": means}
        part = gen.fit_statistics(xb, labels=lb, max_rank=None, **extra)
        rank = gen.rank * (keep or 1)
        acc = part if acc is None else GaussianGenerator.merge_statistics([acc, part], max_rank=rank)
        held = max(held, int(acc["factors"].shape[0]))
    return GaussianGenerator.merge_statistics([acc], max_rank=gen.rank, compact=True), held


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of ``a`` and ``b``."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    return float(torch.linalg.svdvals(qa.T @ qb).square().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--keep-tokens", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

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
    for name, keep in (("per-class", None), ("pooled x1", 1), ("pooled x2", 2), ("pooled x4", 4)):
        gen = model()
        t0 = time.perf_counter()
        stats, most = streamed(gen, x[train], labels[train], args.block, keep)
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
