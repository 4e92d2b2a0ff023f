"""Federated vs centralised training on the demo dataset: exactness, usefulness (TSTR) ratio, round overhead.

    .venv/bin/python bench/bench_federated.py [--per-class 24] [--rounds 6]

Splits a demo dataset over 4 nodes (class ownership, and Dirichlet(0.3) label skew), trains per granularity
centrally (`train`, rounds x local epochs epochs) and federated (`federate` in-process engine), evaluates both
on a held-out demo set (train-on-synthetic / test-on-real accuracy, as `evaluate` measures it), and prints one
JSON line per case. The realistic corpus (bench/corpus.py on the corpus branch) was not ready: demo data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=242)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--nodes", type=int, default=4)
    args = ap.parse_args()
    from feda2v_toolkit.analysis.evaluate import evaluate
    from feda2v_toolkit.demo import write_demo_dataset
    from feda2v_toolkit.federated.engine import federate_local
    from feda2v_toolkit.federated.split import split_dataset
    from feda2v_toolkit.training import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    data = write_demo_dataset(tmp / "train.safetensors", args.per_class, seq_len=args.seq_len, dim=args.dim, seed=0)
    test = write_demo_dataset(tmp / "test.safetensors", args.per_class, seq_len=args.seq_len, dim=args.dim, seed=0,
                              first_clip=10_000)
    base = {"generator_training_sequence_length": 16, "generator_hidden_dim": 128, "generator_latent_dim": 16,
            "generator_batch_size": 16, "generator_save_checkpoint": False, "generator_reducer": "pca",
            "generator_upsampler": "lstsq", "federated_rounds": args.rounds, "federated_local_epochs": 2,
            "generator_training_epochs": args.rounds * 2, "generator_validation_split": 0, "generator_seed": 0, "use_conditioned_vae": True}
    splits = {"class": split_dataset(data, tmp / "class", args.nodes, how="class", seed=0),
              "dirichlet0.3": split_dataset(data, tmp / "dir", args.nodes, how="dirichlet", alpha=0.3, seed=0)}
    for granularity in ("unified", "per_class"):
        cfg = {**base, "generator_granularity": granularity}
        t0 = time.perf_counter()
        central = train(cfg, data)
        central_s = time.perf_counter() - t0
        c_eval = evaluate(central, test, seed=0)
        for name, split in splits.items():
            nodes = [n["path"] for n in split["nodes"]]
            t0 = time.perf_counter()
            fed = federate_local(cfg, nodes, seed=0)
            fed_s = time.perf_counter() - t0
            f_eval = evaluate(fed, test, seed=0)
            exact = {comp: max(float((getattr(fed, comp).state_dict()[k].double()
                                      - getattr(central, comp).state_dict()[k].double()).abs().max())
                               for k in getattr(central, comp).state_dict() if
                               getattr(central, comp).state_dict()[k].is_floating_point())
                     for comp in ("reducer", "upsampler")}
            exact["normalization"] = max(float((fed.normalization[k] - central.normalization[k]).abs().max())
                                         for k in ("mean", "std"))
            hist = fed.metrics["federated"]["history"]
            overhead = [h["seconds"] - h["local_seconds"] for h in hist]
            print(json.dumps({
                "granularity": granularity, "split": name, "nodes": args.nodes, "rounds": args.rounds,
                "tstr_central": c_eval.downstream.tstr, "tstr_federated": f_eval.downstream.tstr,
                "ratio": f_eval.downstream.tstr / c_eval.downstream.tstr if c_eval.downstream.tstr else None,
                "real_only": c_eval.downstream.real_only, "max_abs_diff_exact_stages": exact,
                "overhead_s_per_round": sum(overhead) / len(overhead),
                "bytes_per_round": sum(h["bytes"] for h in hist) / len(hist),
                "central_s": central_s, "federated_s": fed_s}), flush=True)
    torch.set_num_threads(torch.get_num_threads())


if __name__ == "__main__":
    main()
