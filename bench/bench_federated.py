"""Federated vs centralised training: exactness, usefulness (TSTR) ratio, round overhead, DP curve.

    .venv/bin/python bench/bench_federated.py --corpus [--types gaussian vae] [--rounds 4] [--dp 0.5 1 2 4]
    .venv/bin/python bench/bench_federated.py              # demo data (no corpus build)

Splits the training data over 4 nodes (class ownership, and Dirichlet(0.3) label skew), trains per generator
type and granularity centrally (``train``; rounds x local epochs epochs) and federated (``federate``'s
in-process engine), evaluates both on held-out real data (train-on-synthetic / test-on-real accuracy, as
``evaluate`` measures it) and prints one JSON line per case. ``--corpus`` uses the realistic corpus of
``bench/corpus.py`` (12 instrument families, AST-shaped ``[1214, 768]``; 32 clips per class to train on, 16
others per class to test on; built once into bench/.cache/). ``--dp`` adds, for the first trained
(not closed-form) type, per-class generators over the Dirichlet split with Flower's DP at each noise
multiplier (``--dp-clip``): the usefulness-against-epsilon curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point()),
               default=0.0)


def exactness(fed: Any, central: Any) -> dict[str, float]:
    """Max abs differences of the exact stages (and of closed-form generators: means and covariance)."""
    out = {comp: _max_diff(getattr(fed, comp).state_dict(), getattr(central, comp).state_dict())
           for comp in ("reducer", "upsampler")}
    out["normalization"] = max(float((fed.normalization[k] - central.normalization[k]).abs().max())
                               for k in ("mean", "std")) if central.normalization else 0.0
    if getattr(type(next(iter(central.generators.values()))), "fitted", False):
        means, cov, rel = 0.0, 0.0, 0.0
        for key, want in central.generators.items():
            got = fed.generators[key]
            means = max(means, float((got.means - want.means).abs().max()))
            cw, cg = (g.components.double().T @ g.components.double() for g in (want, got))
            cov = max(cov, float((cg - cw).abs().max()))
            rel = max(rel, float((cg - cw).norm() / cw.norm().clamp(min=1e-30)))
        out.update({"generator_means": means, "generator_covariance": cov, "generator_covariance_rel": rel})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", action="store_true", help="the realistic corpus (bench/corpus.py) instead of demo data")
    ap.add_argument("--per-class", type=int, default=None, help="training clips per class (corpus 32, demo 24)")
    ap.add_argument("--types", nargs="+", default=["gaussian", "vae"])
    ap.add_argument("--granularities", nargs="+", default=["unified", "per_class"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--dp", nargs="*", type=float, default=[], help="noise multipliers for the DP curve")
    ap.add_argument("--dp-clip", type=float, default=1.0)
    ap.add_argument("--dp-only", action="store_true", help="only the DP curve (and its centralised reference)")
    ap.add_argument("--simulate", type=int, default=0, metavar="N",
                    help="only: N virtual sites on Flower's Simulation Engine (Ray), Dirichlet(--alpha) deal; wall "
                         "time, peak memory of the process tree, and the model against the centralised one")
    ap.add_argument("--alpha", type=float, default=0.3)
    args = ap.parse_args()
    if args.simulate:
        return simulate(args)
    from feda2v_toolkit.analysis.evaluate import evaluate
    from feda2v_toolkit.data.split import split_dataset
    from feda2v_toolkit.federated.engine import federate_local
    from feda2v_toolkit.training.pipeline import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    if args.corpus:
        sys.path.insert(0, str(Path(__file__).parent))
        from corpus import ensure_corpus

        data = ensure_corpus(per_class=args.per_class or 32, seed=0)
        test = ensure_corpus(per_class=16, seed=0, first_clip=10_000)
        base: dict[str, Any] = {"generator_training_sequence_length": 16, "generator_hidden_dim": 256,
                                "generator_latent_dim": 64, "generator_batch_size": 32}
    else:
        from feda2v_toolkit.data.demo import write_demo_dataset

        per_class = args.per_class or 24
        data = write_demo_dataset(tmp / "train.safetensors", per_class, seq_len=242, dim=64, seed=0)
        test = write_demo_dataset(tmp / "test.safetensors", per_class, seq_len=242, dim=64, seed=0, first_clip=10_000)
        base = {"generator_training_sequence_length": 16, "generator_hidden_dim": 128, "generator_latent_dim": 16,
                "generator_batch_size": 16}
    base.update({"generator_save_checkpoint": False, "generator_reducer": "pca", "generator_upsampler": "lstsq",
                 "federated_rounds": args.rounds, "federated_local_epochs": args.local_epochs,
                 "generator_training_epochs": args.rounds * args.local_epochs, "generator_validation_split": 0,
                 "generator_seed": 0, "use_conditioned_vae": True})
    splits = {"class": split_dataset(data, tmp / "class", args.nodes, how="class", seed=0),
              "dirichlet0.3": split_dataset(data, tmp / "dir", args.nodes, how="dirichlet", alpha=0.3, seed=0)}
    source = "corpus" if args.corpus else "demo"
    centrals: dict[tuple[str, str], tuple[Any, Any]] = {}
    for gen_type in [] if args.dp_only else args.types:
        for granularity in args.granularities:
            cfg = {**base, "generator_type": gen_type, "generator_granularity": granularity}
            t0 = time.perf_counter()
            central = train(cfg, data)
            central_s = time.perf_counter() - t0
            c_eval = evaluate(central, test, seed=0)
            centrals[(gen_type, granularity)] = (central, c_eval)
            for name, split in splits.items():
                nodes = [n["path"] for n in split["nodes"]]
                t0 = time.perf_counter()
                fed = federate_local(cfg, nodes, seed=0)
                fed_s = time.perf_counter() - t0
                f_eval = evaluate(fed, test, seed=0)
                report = fed.metrics["run"]
                rounds = report["rounds"] or [{"seconds": sum(s["seconds"] for s in report["stages"].values())}]
                stages = report["stages"]
                print(json.dumps({
                    "data": source, "type": gen_type, "granularity": granularity, "split": name,
                    "nodes": args.nodes, "rounds": len(report["rounds"]),
                    "tstr_central": c_eval.downstream.tstr, "tstr_federated": f_eval.downstream.tstr,
                    "ratio": f_eval.downstream.tstr / c_eval.downstream.tstr if c_eval.downstream.tstr else None,
                    "real_only": c_eval.downstream.real_only, "max_abs_diff_exact": exactness(fed, central),
                    "truncated": bool(report["truncated"]),
                    "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
                    "bytes_by_stage": {k: v["sent"] + v["received"] for k, v in stages.items()},
                    "central_s": central_s, "federated_s": fed_s}), flush=True)
    trained = [t for t in args.types if t != "gaussian"]
    if args.dp and trained:
        gen_type, granularity = trained[0], "per_class"
        cfg = {**base, "generator_type": gen_type, "generator_granularity": granularity}
        if (gen_type, granularity) not in centrals:
            central = train(cfg, data)
            centrals[(gen_type, granularity)] = (central, evaluate(central, test, seed=0))
        c_eval = centrals[(gen_type, granularity)][1]
        nodes = [n["path"] for n in splits["dirichlet0.3"]["nodes"]]
        from feda2v_toolkit.federated.node_dp import dp_epsilon
        from feda2v_toolkit.training.pipeline import SiteError as FederationError

        for noise in args.dp:
            row = {"data": source, "type": gen_type, "granularity": granularity, "split": "dirichlet0.3", "dp": True,
                   "noise_multiplier": noise, "clipping_norm": args.dp_clip,
                   "epsilon": dp_epsilon(noise, args.rounds, 1e-5, nodes=len(nodes)), "delta": 1e-5,
                   "rounds": args.rounds, "tstr_central": c_eval.downstream.tstr}
            try:
                fed = federate_local({**cfg, "federated_dp_noise_multiplier": noise,
                                      "federated_dp_clipping_norm": args.dp_clip}, nodes, seed=0)
            except FederationError as e:  # the noise can make training diverge: no model, no usefulness
                print(json.dumps({**row, "failed": str(e)}), flush=True)
                continue
            f_eval = evaluate(fed, test, seed=0)
            row["epsilon"] = fed.metrics["privacy"]["node_level"]["epsilon"]
            print(json.dumps({**row, "tstr_federated": f_eval.downstream.tstr,
                              "ratio": f_eval.downstream.tstr / c_eval.downstream.tstr if c_eval.downstream.tstr
                              else None}), flush=True)


def simulate(args: argparse.Namespace) -> None:
    """``--simulate N``: the closed-form default over N virtual sites vs one process, on the corpus or demo data."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _memory import TreePeak

    from feda2v_toolkit.analysis.evaluate import evaluate
    from feda2v_toolkit.federated.simulation import federate_simulation
    from feda2v_toolkit.training.pipeline import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    if args.corpus:
        from corpus import ensure_corpus

        data = ensure_corpus(per_class=args.per_class or 200, seed=0)
        test = ensure_corpus(per_class=16, seed=0, first_clip=10_000)
    else:
        from feda2v_toolkit.data.demo import write_demo_dataset

        data = write_demo_dataset(tmp / "train.safetensors", args.per_class or 100, seq_len=242, dim=64, seed=0)
        test = write_demo_dataset(tmp / "test.safetensors", 16, seq_len=242, dim=64, seed=0, first_clip=10_000)
    cfg = {"generator_training_sequence_length": 16, "generator_save_checkpoint": False, "generator_validation_split": 0,
           "generator_seed": 0}
    t0 = time.perf_counter()
    with TreePeak() as central_peak:
        central = train(cfg, data)
    central_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with TreePeak() as sim_peak:
        fed = federate_simulation(cfg, data, sites=args.simulate, how="dirichlet", alpha=args.alpha, split_seed=0,
                                  seed=0)
    sim_s = time.perf_counter() - t0
    c_eval, f_eval = evaluate(central, test, seed=0), evaluate(fed, test, seed=0)
    sizes = sorted(sum(s["classes"].values()) for s in fed.metrics["sites"])
    print(json.dumps({"data": "corpus" if args.corpus else "demo", "sites": args.simulate, "alpha": args.alpha,
                      "clips": sum(sizes), "site_clips_min_median_max": [sizes[0], sizes[len(sizes) // 2], sizes[-1]],
                      "simulation_s": sim_s, "central_s": central_s,
                      "peak_rss_tree_gb": sim_peak.peak / 2**30, "central_peak_rss_gb": central_peak.peak / 2**30,
                      "tstr_central": c_eval.downstream.tstr, "tstr_simulation": f_eval.downstream.tstr,
                      "max_abs_diff_exact": exactness(fed, central),
                      "bytes_by_stage": {k: v["sent"] + v["received"] for k, v in fed.metrics["run"]["stages"].items()}}),
          flush=True)


if __name__ == "__main__":
    main()
