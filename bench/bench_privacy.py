"""Membership-inference audit and standard-protocol usefulness of default models on the realistic corpus.

Trains generators with default settings (only the type, the granularity, the training length and the
output length are set; the VAE also gets a number of epochs) on the first ``--per-class`` clips of each
class of the realistic corpus (``bench/corpus.py``: embeddings of real recorded instrument notes through an
AST-like front end; never the demo data), then runs ``evaluate`` with those clips as ``--train-data`` and the
next ``--non-members`` clips of each class as ``--data``. Reports, per model, every attack's AUC and TPR at
FPR 1% / 0.1% (bootstrap 95% intervals), the headline and the flag, and the usefulness ratio of the standard
protocol (trained on the model's training clips vs on as many synthetic ones, tested on the held-out clips;
AST-head features) over the synthetic draws, with the pooled-feature view next to it.

The corpus: the largest ``corpus-v*-s0-n*-f0`` under ``$FEDA2V_BENCH_CACHE`` (default ``/work/bench-cache``)
with enough clips, else ``bench/corpus.py``'s cached 32-per-class corpus (built on first use).

Usage::

    python bench/bench_privacy.py [--per-class 16] [--non-members 64] [--length 16] [--seed 0]
        [--configs gaussian-per-class,gaussian-conditioned,vae-per-class] [--vae-epochs 10] [--json OUT.json]

Results are recorded in docs/evaluation.md ("Membership inference on the realistic corpus").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feda2v_toolkit.analysis.evaluate import evaluate  # noqa: E402
from feda2v_toolkit.data import DatasetWriter, open_dataset  # noqa: E402
from feda2v_toolkit.training.pipeline import train  # noqa: E402

FULL = 1214
#: name -> (generator type, granularity, extra settings)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gaussian-per-class": ("gaussian", "per_class", {}),
    "gaussian-conditioned": ("gaussian", "unified", {}),  # gaussian_conditioned defaults to true
    "vae-per-class": ("vae", "per_class", {}),
    # AST's summary tokens kept through the reduction (generator_reducer_keep_tokens = 2)
    "gaussian-per-class-keep2": ("gaussian", "per_class", {"generator_reducer_keep_tokens": 2}),
    "gaussian-conditioned-keep2": ("gaussian", "unified", {"generator_reducer_keep_tokens": 2}),
    # the same with the data-independent pseudo-inverse of adaptive_avg (free under DP; docs/privacy.md)
    "gaussian-per-class-keep2-expand": ("gaussian", "per_class", {"generator_reducer_keep_tokens": 2,
                                                                   "generator_upsampler": "expand"}),
    "gaussian-conditioned-keep2-expand": ("gaussian", "unified", {"generator_reducer_keep_tokens": 2,
                                                                   "generator_upsampler": "expand"}),
    "vae-conditioned-keep2": ("vae", "unified", {"generator_reducer_keep_tokens": 2}),
    "vae-per-class-keep2-expand": ("vae", "per_class", {"generator_reducer_keep_tokens": 2,
                                                         "generator_upsampler": "expand"}),
    "vae-conditioned-keep2-expand": ("vae", "unified", {"generator_reducer_keep_tokens": 2,
                                                         "generator_upsampler": "expand"}),
}


def find_corpus(needed: int) -> Path:
    """The largest cached corpus with at least ``needed`` clips per class, else bench/corpus.py's 32-clip one."""
    root = Path(os.environ.get("FEDA2V_BENCH_CACHE", "/work/bench-cache"))
    best: tuple[int, Path] | None = None
    for path in root.glob("corpus-v*-s0-n*-f0") if root.is_dir() else []:
        try:
            n = int(path.name.split("-n")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if n >= needed and any(path.glob("*.safetensors")) and (best is None or n > best[0]):
            best = (n, path)
    if best is not None:
        return best[1]
    from corpus import ensure_corpus

    if needed > 32:
        raise SystemExit(f"no corpus with {needed} clips per class under {root}; build one with "
                         f"bench/corpus.py --per-class {needed} or lower --non-members")
    return ensure_corpus(per_class=32, seed=0)


def write_subset(source: Path, out: Path, first: int, count: int) -> Path:
    """Clips ``first .. first + count - 1`` of each class of ``source`` as a dataset at ``out`` (kept for reuse)."""
    if out.is_dir() and any(out.glob("*.safetensors")):
        return out
    ds = open_dataset(source)
    rows = []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        if idx.numel() < first + count:
            raise SystemExit(f"{source}: class {ds.class_names[c]!r} has {idx.numel()} clips, need {first + count}")
        rows.append(idx[first:first + count])
    picked = torch.cat(rows)
    with DatasetWriter(out, class_names=ds.class_names, dtype=torch.float16) as writer:
        for s in range(0, picked.numel(), 32):
            batch = ds.read(picked[s:s + 32])
            writer.add(batch.embeddings, batch.labels)
    return out


def run(name: str, train_path: Path, test_path: Path, length: int, seed: int, vae_epochs: int,
        workdir: Path, epsilon: float | None = None, delta: float = 1e-5, sites: int = 1,
        by: str = "class", public_data: Path | None = None) -> dict[str, Any]:
    gen_type, granularity, extra = CONFIGS[name]
    cfg = {"generator_type": gen_type, "generator_granularity": granularity,
           "generator_training_sequence_length": length, "generator_output_sequence_length": FULL,
           "generator_save_checkpoint": False, "generator_checkpoint_dir": str(workdir / "ck"), **extra}
    if gen_type == "vae":
        cfg["generator_training_epochs"] = vae_epochs
    if epsilon is not None:  # record-level DP (inf: the DP machinery, clipping included, without noise)
        cfg["generator_dp_epsilon"], cfg["generator_dp_delta"] = epsilon, delta
        if public_data is not None:
            cfg["generator_dp_public_data"] = str(public_data)
    t0 = time.perf_counter()
    if sites > 1:
        from feda2v_toolkit.data.split import split_dataset
        from feda2v_toolkit.federated.engine import federate_local

        how = "class" if by == "class" else "dirichlet"
        split = split_dataset(train_path, workdir / f"sites-{sites}-{by}", sites, how=how, alpha=0.3, seed=0,
                              overwrite=True)
        model = federate_local(cfg, [n["path"] for n in split["nodes"]], seed=seed)
    else:
        model = train(cfg, train_path, seed=seed)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = evaluate(model, test_path, train_data=train_path, seed=seed)
    eval_s = time.perf_counter() - t0
    a = r.membership
    assert a is not None and r.usefulness is not None
    u = r.usefulness
    privacy = model.metrics.get("privacy") or {}
    return {
        "config": cfg, "fit_seconds": fit_s, "sites": sites, "by": by if sites > 1 else None,
        "epsilon_spent": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
        "classes_dropped": privacy.get("classes_dropped"), "evaluate_seconds": eval_s,
        "members": a.members, "non_members": a.non_members, "headline": a.headline, "headline_auc": a.auc,
        "leaking": a.leaking, "unavailable": a.unavailable,
        "attacks": {x.name: {"auc": x.auc, "auc_ci": [x.auc_low, x.auc_high],
                             **{f"tpr@{t.fpr:g}": {"tpr": t.tpr, "ci": [t.low, t.high], "reliable": t.reliable}
                                for t in x.tpr_at}} for x in a.attacks},
        "usefulness": {"protocol": u.protocol, "seeds": u.seeds,
                       "summary": {"real": u.summary.real_accuracy, "synthetic": u.summary.synthetic_accuracy,
                                   "ratio_mean": u.summary.ratio_mean, "ratio_min": u.summary.ratio_min,
                                   "ratio_max": u.summary.ratio_max,
                                   "reduced_upsampled": u.summary.reconstructed_accuracy},
                       "pooled": None if u.pooled is None else {
                           "real": u.pooled.real_accuracy, "synthetic": u.pooled.synthetic_accuracy,
                           "ratio_mean": u.pooled.ratio_mean, "ratio_min": u.pooled.ratio_min,
                           "ratio_max": u.pooled.ratio_max, "reduced_upsampled": u.pooled.reconstructed_accuracy}},
        "split_protocol_tstr_ratio": (r.downstream.tstr / r.downstream.real_only if r.downstream.real_only
                                      else None),
        "dcr_ratio": r.privacy["(all)"].ratio if "(all)" in r.privacy else None,
        "collapsed": r.collapsed, "notes": r.notes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16, help="training clips per class (the first of each class)")
    ap.add_argument("--non-members", type=int, default=64, help="held-out clips per class (the next ones)")
    ap.add_argument("--length", type=int, default=16, help="training length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--vae-epochs", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "privacy")
    ap.add_argument("--epsilons", default="", help="record-level DP targets, e.g. 1,4,none (none: without DP, "
                    "the in-run reference); empty: no DP")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--public-data", type=Path, help="generator_dp_public_data for the DP runs (e.g. the corpus "
                    "built from other renderings: corpus-v1-s0-n16-f10000)")
    ap.add_argument("--sites", type=int, default=1, help="federate over this many sites (split of the training clips)")
    ap.add_argument("--by", choices=["class", "dirichlet"], default="class", help="how --sites splits (dirichlet: 0.3)")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args()
    corpus = find_corpus(args.per_class + args.non_members)
    base = args.workdir / f"{corpus.name}-train{args.per_class}-held{args.non_members}"
    train_path = write_subset(corpus, base / "train", 0, args.per_class)
    test_path = write_subset(corpus, base / "test", args.per_class, args.non_members)
    print(f"corpus {corpus}: {args.per_class} training clips per class ({train_path}), {args.non_members} held-out "
          f"per class ({test_path}); torch threads {torch.get_num_threads()}", flush=True)
    results: dict[str, Any] = {"corpus": str(corpus), "per_class": args.per_class, "non_members": args.non_members,
                               "length": args.length, "seed": args.seed, "runs": {}}
    epsilons: list[float | None] = [None if e == "none" else float(e) for e in args.epsilons.split(",") if e] or [None]
    for name, eps in [(c, e) for c in args.configs.split(",") if c for e in epsilons]:
        label = name + ("" if eps is None else f"@eps{eps:g}") + (f"@{args.sites}{args.by}" if args.sites > 1 else "")
        res = run(name, train_path, test_path, args.length, args.seed, args.vae_epochs, base, eps, args.delta,
                  args.sites, args.by, args.public_data)
        results["runs"][label] = res
        print(f"\n== {label}: fit {res['fit_seconds']:.0f}s, evaluate {res['evaluate_seconds']:.0f}s; "
              f"{res['members']} members vs {res['non_members']} non-members"
              + ("" if eps is None else f"; epsilon spent {res['epsilon_spent']} (dropped classes: "
                 f"{res['classes_dropped'] or 'none'})"), flush=True)
        for attack, v in res["attacks"].items():
            mark = "*" if attack == res["headline"] else " "
            tprs = "  ".join(f"TPR@{k[4:]} {d['tpr']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"
                             f"{'' if d['reliable'] else ' (too few non-members)'}"
                             for k, d in v.items() if k.startswith("tpr@"))
            print(f" {mark} {attack:34s} AUC {v['auc']:.3f} [{v['auc_ci'][0]:.3f}, {v['auc_ci'][1]:.3f}]  {tprs}")
        u = res["usefulness"]
        s, p = u["summary"], u["pooled"]
        print(f"   {'LEAKS MEMBERSHIP' if res['leaking'] else 'no leak flagged'}; usefulness ({u['protocol']}, "
              f"draws {u['seeds']}): AST head {s['ratio_mean']:.3f} (min {s['ratio_min']:.3f}, max "
              f"{s['ratio_max']:.3f}; real {s['real']:.3f}, reduced+upsampled real {s['reduced_upsampled']:.3f})"
              + (f"; pooled {p['ratio_mean']:.3f} (min {p['ratio_min']:.3f}, max {p['ratio_max']:.3f}; real "
                 f"{p['real']:.3f}, reduced+upsampled real {p['reduced_upsampled']:.3f})" if p else "")
              + f"; split-protocol TSTR ratio {res['split_protocol_tstr_ratio']:.3f}; DCR {res['dcr_ratio']:.3f}"
              + ("; COLLAPSED" if res["collapsed"] else ""),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
