"""Generators on the realistic corpus: usefulness, privacy, the upsampler round trip and the stability grid.

Every figure is measured on embeddings of real recorded sound (``bench/corpus.py``: Fluid R3 GM
instrument notes through an AST-like front end), never on the demo data, and printed as a ratio against
an in-run reference:

1. ``usefulness``: train each generator (default settings; only the training/output lengths, the
   granularity and, for vae/gan, the conditioning switch are set) on the training half of the corpus,
   then ``evaluate`` it against the other half: train-on-synthetic / train-on-real accuracy (the ridge
   classifier of ``evaluate``) and the distance-to-closest-record ratio (synthetic vs held-out real, to
   the training clips). The original method -- per-class VAE, ``adaptive_avg`` + ``linear``, the
   original training loop (one raw sequence at a time, plain AdamW) -- is trained and scored in the same
   run as the reference.
2. ``upsamplers``: ``analyze`` on the whole corpus (half fits, half is scored): for every reducer/upsampler
   pair, the classifier trained on reconstructed sequences and tested on real held-out ones, relative to
   the classifier trained on the real sequences ("trained on reconstructions, tested on real").
3. ``stability``: every built-in generator type x granularity x training length x seed trains to
   completion with the defaults (a NaN/inf loss is a failure), on the corpus and on the demo data.

Usage::

    python bench/bench_generators.py [--only usefulness,upsamplers,stability] [--per-class 16]
        [--lengths 16] [--seeds 0,1,2] [--epochs-original 10] [--grid-lengths 4,16,64] [--grid-seeds 0,1,2,3,4]
        [--grid-epochs 50] [--json OUT.json]

Results are recorded in docs/evaluation.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _original import original_step  # noqa: E402

from feda2v_toolkit.analysis.analyze import analyze  # noqa: E402
from feda2v_toolkit.analysis.evaluate import evaluate  # noqa: E402
from feda2v_toolkit.config import schema_defaults  # noqa: E402
from feda2v_toolkit.data import (
    DatasetWriter,  # noqa: E402
    open_dataset,  # noqa: E402
)
from feda2v_toolkit.errors import InputError  # noqa: E402
from feda2v_toolkit.generators.vae import VAEGenerator  # noqa: E402
from feda2v_toolkit.model import GenerativeModel  # noqa: E402
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer  # noqa: E402
from feda2v_toolkit.training.pipeline import train  # noqa: E402
from feda2v_toolkit.upsamplers.interpolate import LinearUpsampler  # noqa: E402

FULL = 1214
#: (label, generator type, granularity, extra settings) of the usefulness table
CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("gaussian per_class", "gaussian", "per_class", {}),
    ("gaussian unified (conditioned)", "gaussian", "unified", {}),
    ("vae per_class", "vae", "per_class", {}),
    ("vae unified, conditioned", "vae", "unified", {"use_conditioned_vae": True}),
    ("gan per_class", "gan", "per_class", {}),
    ("gan unified, conditioned", "gan", "unified", {"gan_conditioned": True}),
]


def split_corpus(source: Path, workdir: Path) -> tuple[Path, Path]:
    """Write the first half of each class's clips to ``train/`` and the second half to ``test/``."""
    ds = open_dataset(source)
    out = (workdir / "train", workdir / "test")
    if all(p.is_dir() and any(p.glob("*.safetensors")) for p in out):
        return out
    first, second = [], []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        first.append(idx[: idx.numel() // 2])
        second.append(idx[idx.numel() // 2:])
    for path, parts in zip(out, (first, second), strict=True):
        rows = torch.cat(parts)
        with DatasetWriter(path, class_names=ds.class_names, dtype=torch.float16) as writer:
            for s in range(0, rows.numel(), 32):
                batch = ds.read(rows[s:s + 32])
                writer.add(batch.embeddings, batch.labels)
    return out


def config(gen_type: str, granularity: str, length: int, extra: dict[str, Any], workdir: Path) -> dict[str, Any]:
    return {"generator_type": gen_type, "generator_granularity": granularity,
            "generator_training_sequence_length": length, "generator_output_sequence_length": FULL,
            "generator_save_checkpoint": False, "generator_checkpoint_dir": str(workdir / "ck"), **extra}


# -- the original method ------------------------------------------------------------------------------

def train_original(data: Path, length: int, epochs: int, seed: int) -> GenerativeModel:
    """The original FedA2V generator training: one VAE per class, adaptive average pooling, one raw reduced
    sequence at a time (no normalisation), input noise 0.1, loss MSE + KL (summed over the latent) + 0.1 *
    (1 - cosine), plain AdamW (lr 1e-3, weight decay 1e-5), clipping at 5; linear upsampling."""
    torch.manual_seed(seed)
    ds = open_dataset(data)
    cfg = schema_defaults()
    reducer = AdaptiveAvgReducer(length=length)
    reduced = torch.cat([reducer(b.embeddings) for b in ds.batches(32)])
    generators = {}
    for c, name in enumerate(ds.class_names):
        rows = reduced[ds.labels == c]
        vae = VAEGenerator.from_config(cfg, seq_len=length, dim=ds.dim)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=1e-5)
        vae.train()
        for _ in range(epochs):
            for i in torch.randperm(rows.shape[0]).tolist():
                if not math.isfinite(original_step(vae, opt, rows[i:i + 1])):
                    raise InputError(f"the original loop diverged on class {name!r}")
        generators[name] = vae.eval()
    return GenerativeModel(
        generator_type="vae", generators=generators, granularity="per_class", class_names=list(ds.class_names),
        class_to_generator={c: c for c in ds.class_names}, reducer=reducer, reducer_name="adaptive_avg",
        upsampler=LinearUpsampler(), upsampler_name="linear", full_length=ds.seq_len, training_length=length,
        output_length=FULL, dim=ds.dim, normalization={}, class_counts=ds.class_counts(),
        config={**cfg, "generator_granularity": "per_class", "generator_training_sequence_length": length},
        seed=seed)


# -- 1. usefulness and privacy ------------------------------------------------------------------------

def score(model: GenerativeModel, train_path: Path, test_path: Path, seed: int) -> dict[str, float]:
    r = evaluate(model, test_path, train_data=train_path, seed=seed)
    d = r.downstream
    return {"tstr": d.tstr, "real_only": d.real_only, "ratio": d.tstr / d.real_only if d.real_only else math.nan,
            "augmented": d.augmented, "dcr_ratio": r.privacy["(all)"].ratio,
            "close_share": r.privacy["(all)"].close_share, "memorising": r.privacy["(all)"].memorising}


def bench_usefulness(train_path: Path, test_path: Path, lengths: list[int], seeds: list[int],
                     epochs_original: int, workdir: Path, only: list[str] | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = [("original method (reference)", None, None, {})] + list(CONFIGS)
    for length in lengths:
        for label, gen_type, granularity, extra in rows:
            if only and not any(o in label for o in only):
                continue
            runs = []
            for seed in seeds:
                t0 = time.perf_counter()
                try:
                    if gen_type is None:
                        model = train_original(train_path, length, epochs_original, seed)
                    else:
                        model = train(config(gen_type, granularity, length, extra, workdir), train_path, seed=seed)
                    fit_s = time.perf_counter() - t0
                    runs.append({**score(model, train_path, test_path, seed), "seconds": fit_s, "seed": seed})
                except Exception as exc:  # a failure is a result here
                    runs.append({"error": f"{type(exc).__name__}: {exc}", "seed": seed})
                print(f"[usefulness] {label} l={length} seed {seed}: {json.dumps(runs[-1])}", flush=True)
            ok = [r for r in runs if "error" not in r]
            summary: dict[str, float] = {}
            if ok:
                summary = {k: statistics.fmean(r[k] for r in ok)
                           for k in ("tstr", "real_only", "ratio", "dcr_ratio", "seconds")}
                summary["ratio_min"] = min(r["ratio"] for r in ok)
                summary["dcr_min"] = min(r["dcr_ratio"] for r in ok)
            results[f"{label} @ l={length}"] = {"runs": runs, "summary": summary, "length": length,
                                                 "epochs": epochs_original if gen_type is None else None}
    print(f"\n[usefulness] train-on-synthetic / train-on-real (TSTR ratio) and DCR ratio, mean over seeds "
          f"{seeds}, output length {FULL}:")
    print(f"{'generator':48s} {'TSTR':>7s} {'real':>7s} {'ratio':>7s} {'(min)':>7s} {'DCR':>6s} {'(min)':>6s} "
          f"{'fit s':>7s}")
    for label, res in results.items():
        s = res["summary"]
        if not s:
            print(f"{label:48s} failed: {res['runs'][0].get('error')}")
            continue
        print(f"{label:48s} {s['tstr']:7.3f} {s['real_only']:7.3f} {s['ratio']:7.3f} {s['ratio_min']:7.3f} "
              f"{s['dcr_ratio']:6.3f} {s['dcr_min']:6.3f} {s['seconds']:7.1f}")
    return results


# -- 2. upsampler round trip ----------------------------------------------------------------------------

def bench_upsamplers(corpus_path: Path, lengths: list[int], upsampler_epochs: int) -> dict[str, Any]:
    result = analyze(corpus_path, lengths, holdout=0.5, seed=0, upsampler_epochs=upsampler_epochs)
    print(f"\n[upsamplers] trained on reconstructions, tested on real held-out clips, relative to trained on "
          f"real ({result.baseline_accuracy:.3f}); R^2 about the per-position mean:")
    print(f"{'reducer':14s} {'upsampler':10s} " + " ".join(f"{'l=' + str(n):>14s}" for n in result.lengths))
    table: dict[str, dict[int, dict[str, float]]] = {}
    for p in result.pairs:
        table.setdefault(f"{p.reducer} + {p.upsampler}", {})[p.length] = {
            "acc_on_real": p.accuracy_on_real, "ratio": p.accuracy_on_real / result.baseline_accuracy,
            "r2": p.r2, "r2_about_sequence_mean": p.r2_about_sequence_mean}
    for o in result.optimum:
        table.setdefault("linear optimum (position PCA)", {})[o.length] = {
            "acc_on_real": o.accuracy_on_real, "ratio": o.accuracy_on_real / result.baseline_accuracy, "r2": o.r2}
    for name, per in table.items():
        red, _, ups = name.partition(" + ")
        cells = " ".join(f"{per[n]['ratio']:6.2f} ({per[n]['r2']:5.2f})" if n in per else f"{'-':>14s}"
                         for n in result.lengths)
        print(f"{red:14s} {ups:10s} {cells}")
    rec = {n: f"{p.reducer} + {p.upsampler}" for n, p in result.recommended.items()}
    print(f"recommended per length (best accuracy on real): {rec}; analyze took {result.seconds:.0f}s")
    return {"baseline_accuracy": result.baseline_accuracy, "pairs": table, "recommended": rec,
            "seconds": result.seconds}


# -- 3. stability grid ----------------------------------------------------------------------------------

def bench_stability(datasets: dict[str, Path], types: list[str], lengths: list[int], seeds: list[int],
                    epochs: int, workdir: Path, max_state_gb: float,
                    granularities: tuple[str, ...] = ("unified", "per_class")) -> dict[str, Any]:
    from feda2v_toolkit.config.migrations import vae_parameters

    cells = []
    for data_name, path in datasets.items():
        classes = open_dataset(path).num_classes
        for gen_type in types:
            for granularity in granularities:
                for length in lengths:
                    generators = classes if granularity == "per_class" else 1
                    state_gb = 0.0 if gen_type == "gaussian" else \
                        (2 if gen_type == "gan" else 1) * 16 * vae_parameters(length) * generators / 1e9
                    for seed in seeds:
                        cell = {"data": data_name, "type": gen_type, "granularity": granularity, "length": length,
                                "seed": seed, "epochs": epochs}
                        if state_gb > max_state_gb:
                            cell["status"] = f"skipped: ~{state_gb:.0f} GB of weights and optimiser state"
                        else:
                            extra = {"generator_training_epochs": epochs}
                            if granularity == "unified" and gen_type in ("vae", "gan"):
                                extra[{"vae": "use_conditioned_vae", "gan": "gan_conditioned"}[gen_type]] = True
                            t0 = time.perf_counter()
                            try:
                                model = train(config(gen_type, granularity, length, extra, workdir), path, seed=seed)
                                last = model.metrics.get("val") or {}
                                cell["status"] = "ok"
                                cell["val_loss"] = last.get("loss")
                            except InputError as exc:
                                cell["status"] = f"FAILED: {exc}"
                            except Exception as exc:
                                cell["status"] = f"FAILED: {type(exc).__name__}: {exc}"
                                traceback.print_exc()
                            cell["seconds"] = time.perf_counter() - t0
                        cells.append(cell)
                        print(f"[stability] {json.dumps(cell)}", flush=True)
    ran = [c for c in cells if not c["status"].startswith("skipped")]
    passed = [c for c in ran if c["status"] == "ok"]
    print(f"\n[stability] {len(passed)} of {len(ran)} runs trained to completion "
          f"({len(cells) - len(ran)} skipped for memory); failures: "
          f"{[(c['data'], c['type'], c['granularity'], c['length'], c['seed']) for c in ran if c['status'] != 'ok']}")
    return {"cells": cells, "passed": len(passed), "ran": len(ran)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="usefulness,upsamplers,stability")
    ap.add_argument("--per-class", type=int, default=32, help="clips per class in the corpus (half train, half test)")
    ap.add_argument("--corpus", type=Path, help="use this corpus instead of bench/corpus.py's cached one")
    ap.add_argument("--lengths", default="16", help="training lengths of the usefulness table")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="", help="comma-separated substrings of the usefulness rows to run")
    ap.add_argument("--epochs-original", type=int, default=10,
                    help="epochs of the original loop (it trains one sequence per step)")
    ap.add_argument("--analyze-lengths", default="4,8,16,32,64")
    ap.add_argument("--upsampler-epochs", type=int, default=5, help="epochs of trainable upsamplers in analyze")
    ap.add_argument("--grid-types", default="gaussian,vae,gan")
    ap.add_argument("--grid-lengths", default="4,16,64")
    ap.add_argument("--grid-seeds", default="0,1,2,3,4")
    ap.add_argument("--grid-epochs", type=int, default=50)
    ap.add_argument("--grid-granularities", default="unified,per_class")
    ap.add_argument("--grid-demo", action="store_true", help="also run the grid on the demo data")
    ap.add_argument("--grid-no-corpus", action="store_true", help="run the grid on the demo data only")
    ap.add_argument("--max-state-gb", type=float, default=6.0, help="skip grid cells needing more training state")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args()
    ints = lambda v: [int(x) for x in v.split(",") if x]  # noqa: E731
    only = set(args.only.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gen-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.corpus is not None:
        corpus_path = args.corpus
    else:
        from corpus import ensure_corpus

        corpus_path = ensure_corpus(per_class=args.per_class, seed=0)
    train_path, test_path = split_corpus(corpus_path, workdir / "split")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"corpus {corpus_path}: train {train_path} / test {test_path}; torch threads {torch.get_num_threads()}")
    results: dict[str, Any] = {"corpus": str(corpus_path)}
    if "usefulness" in only:
        results["usefulness"] = bench_usefulness(train_path, test_path, ints(args.lengths), ints(args.seeds),
                                                 args.epochs_original, workdir,
                                                 [c for c in args.configs.split(",") if c] or None)
    if "upsamplers" in only:
        results["upsamplers"] = bench_upsamplers(corpus_path, ints(args.analyze_lengths), args.upsampler_epochs)
    if "stability" in only:
        datasets = {} if args.grid_no_corpus else {"corpus": train_path}
        if args.grid_demo or args.grid_no_corpus:
            from feda2v_toolkit.data.demo import write_demo_dataset

            demo = workdir / "demo.safetensors"
            if not demo.exists():
                write_demo_dataset(demo, 24)
            datasets["demo"] = demo
        results["stability"] = bench_stability(datasets, args.grid_types.split(","), ints(args.grid_lengths),
                                               ints(args.grid_seeds), args.grid_epochs, workdir, args.max_state_gb,
                                               tuple(args.grid_granularities.split(",")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
