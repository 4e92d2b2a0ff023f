"""Differential privacy on the realistic corpus: usefulness and membership leakage per epsilon, and the cost.

Composes the mechanisms of :mod:`feda2v_toolkit.privacy` end to end, outside the training pipeline, on the
realistic corpus (``bench/corpus.py``; 200 clips per class, found in ``$FEDA2V_BENCH_CACHE`` when another
run built it, else built into ``bench/.cache/``): per class ``--train`` clips train (default 100), as many
others are held out. For each epsilon in ``--epsilons`` and each granularity:

1. plan the budget of every release (class counts, normalisation, the ``gaussian`` statistics, the ``lstsq``
   normal-equation sums) for ``(epsilon, --delta)`` before anything is computed;
2. reduce with ``adaptive_avg`` to ``--length`` (16; data-independent, spends nothing), then release noisy
   class counts, the DP normalisation (``--normalization dp``) or a fixed one (``fixed``: mean 0, std 1), the
   gaussian's basis, class sums, scatter and square in that basis, and the ``lstsq`` sums (DP; the
   non-private ``lstsq`` is used for ``--upsampler exact``), each with the noise of its planned multiplier,
   from a secret generator, every one recorded in a ledger;
3. fit a ``GaussianGenerator`` per key from the noisy statistics, draw as many samples per class as it
   trained on, de-normalise, upsample to the full length with the fitted ``lstsq``;
4. score. **Usefulness**: ridge classifier (``feda2v_toolkit.analysis.classifier``) trained on the synthetic
   sequences vs on the real training clips, both tested on the held-out clips -- on ``pooled_features(x,
   64)`` and on the mean of tokens 0 and 1 (AST's head pooling); ratio = synthetic / real accuracy.
   **Membership**: white-box attacks on the model's own numbers, members = the training clips, non-members
   = the held-out clips: the gaussian's per-clip log-likelihood, and the share of the clip's deviation from
   its class mean outside the span of the model's components; AUC and TPR at FPR 1% / 0.1%; the best
   (highest-AUC) attack is the headline.

``epsilon inf`` is run twice: the non-private fit (the toolkit's standard ``gaussian`` + standardisation +
``lstsq``: the reference) and the DP machinery with the noise off (clipping, basis and all: what the
machinery itself costs). Also timed: the closed-form fit (normalisation + gaussian + lstsq) with and without
DP on the same data.

Usage::

    python bench/bench_dp.py [--epsilons 0.5,1,2,4,8,inf] [--delta 1e-5] [--train 100] [--length 16]
        [--granularity per_class,unified] [--normalization dp] [--upsampler dp] [--seeds 0] [--json OUT]

Results are recorded in docs/privacy.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feda2v_toolkit.analysis.classifier import RidgeClassifier, pooled_features  # noqa: E402
from feda2v_toolkit.data import open_dataset  # noqa: E402
from feda2v_toolkit.data.dataset import Dataset  # noqa: E402
from feda2v_toolkit.generators.gaussian import GaussianGenerator  # noqa: E402
from feda2v_toolkit.privacy import PrivacyError, PrivacyLedger, plan_budget, row_norms, secret_generator  # noqa: E402
from feda2v_toolkit.privacy.audit import gaussian_scores  # noqa: E402
from feda2v_toolkit.privacy.statistics import (  # noqa: E402
    DPClassCounts,
    DPGaussian,
    DPLeastSquares,
    DPNormalization,
    privatize,
)
from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
PER_CLASS = 200
RANK = 256  # generator_latent_dim default
POOL = 64


# -- data ------------------------------------------------------------------------------------------

def corpus_path(per_class: int) -> Path:
    """The shared 200-per-class corpus (``$FEDA2V_BENCH_CACHE``) if present, else built here."""
    name = f"corpus-v1-s0-n{per_class}-f0"
    for root in filter(None, [os.environ.get("FEDA2V_BENCH_CACHE"), "/work/bench-cache", str(CACHE)]):
        p = Path(root) / name
        if p.is_dir() and any(p.glob("*.safetensors")):
            return p
    from corpus import ensure_corpus

    return ensure_corpus(per_class=per_class, seed=0)


def features(ds: Dataset, length: int) -> dict[str, Tensor]:
    """Per clip: reduced ``[l, D]`` (adaptive_avg), pooled real features, tokens 0/1 mean, norms (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"dp-features-{ds.path.name}-l{length}.pt"
    if path.exists():
        return torch.load(path)
    n = len(ds)
    out = {"reduced": torch.empty(n, length, ds.dim), "pooled": torch.empty(n, min(POOL, ds.seq_len) * ds.dim),
           "tokens": torch.empty(n, ds.dim), "full_norms": torch.empty(n, dtype=torch.float64)}
    pos = 0
    for batch in ds.batches(16):
        x = batch.embeddings
        k = x.shape[0]
        out["reduced"][pos:pos + k] = F.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2)
        out["pooled"][pos:pos + k] = pooled_features(x, POOL)
        out["tokens"][pos:pos + k] = x[:, :2].mean(1)
        out["full_norms"][pos:pos + k] = row_norms(x)
        pos += k
    out["labels"] = ds.labels.clone()
    torch.save(out, path)
    return out


def split(labels: Tensor, train: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        tr.append(idx[:train])
        te.append(idx[train:2 * train])
    return torch.cat(tr).sort().values, torch.cat(te).sort().values


def pairs_stream(ds: Dataset, idx: Tensor, length: int, rows: int = 16):
    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for batch in ds.batches(rows, idx):
            x = batch.embeddings
            yield F.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2), x
    return pairs


# -- scoring ---------------------------------------------------------------------------------------

def auc(members: Tensor, non_members: Tensor) -> float:
    """P(score of a member > score of a non-member) (ties count half)."""
    s = torch.cat([members, non_members]).double()
    ranks = torch.empty_like(s)
    order = torch.argsort(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for v in torch.unique(s[torch.cat([s[1:] == s[:-1], torch.tensor([False])])]):  # average tied ranks
        tied = s == v
        ranks[tied] = ranks[tied].mean()
    m = members.numel()
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * non_members.numel()))


def tpr_at(members: Tensor, non_members: Tensor, fpr: float) -> float:
    """TPR at the threshold whose FPR on the non-members is at most ``fpr``."""
    srt = torch.sort(non_members.double(), descending=True).values
    k = int(math.floor(fpr * srt.numel()))
    thr = srt[k] if k < srt.numel() else srt[-1] - 1
    return float((members.double() > thr).double().mean())


def attack_report(members: Tensor, non_members: Tensor) -> dict[str, float]:
    return {"auc": auc(members, non_members), "tpr@1%": tpr_at(members, non_members, 0.01),
            "tpr@0.1%": tpr_at(members, non_members, 0.001)}


def usefulness(synth_pooled: Tensor, synth_tokens: Tensor, synth_y: Tensor, real: dict[str, Tensor],
               tr: Tensor, te: Tensor, reference: dict[str, float]) -> dict[str, float]:
    y = real["labels"]
    num = int(y.max()) + 1
    acc_p = RidgeClassifier(num).fit(synth_pooled, synth_y).accuracy(real["pooled"][te], y[te])
    acc_t = RidgeClassifier(num).fit(synth_tokens, synth_y).accuracy(real["tokens"][te], y[te])
    return {"tstr_pooled": acc_p, "ratio_pooled": acc_p / reference["pooled"],
            "tstr_tokens": acc_t, "ratio_tokens": acc_t / reference["tokens"]}


# -- fitting ---------------------------------------------------------------------------------------

def generator_keys(granularity: str, classes: int) -> list[list[int]]:
    return [[c] for c in range(classes)] if granularity == "per_class" else [list(range(classes))]


def new_generators(keys: list[list[int]], length: int, dim: int, classes: int) -> list[GaussianGenerator]:
    return [GaussianGenerator(seq_len=length, dim=dim, rank=RANK, num_classes=classes, conditioning="label")
            for _ in keys]


def fit_nonprivate(red: Tensor, y: Tensor, keys: list[list[int]], ds: Dataset, tr: Tensor,
                   length: int) -> tuple[dict[str, Tensor], list[GaussianGenerator], LeastSquaresUpsampler]:
    from feda2v_toolkit.training.stages import NormalizationStage

    stage = NormalizationStage()
    norm = stage.finish(stage.local(red, torch.arange(red.shape[0])))
    z = (red - norm["mean"]) / norm["std"]
    gens = new_generators(keys, length, red.shape[2], int(y.max()) + 1)
    for gen, rows in zip(gens, keys, strict=True):
        m = torch.isin(y, torch.tensor(rows))
        gen.fit(z[m], labels=y[m])
    ups = LeastSquaresUpsampler(reduced_length=length, full_length=ds.seq_len, dim=ds.dim)
    ups.fit(pairs_stream(ds, tr, length))
    return norm, gens, ups


def dp_specs(args: argparse.Namespace, classes: int, length: int, dim: int,
             upsampler: str) -> tuple[list[Any], DPClassCounts, DPNormalization, DPGaussian, DPLeastSquares]:
    w: dict[str, dict[str, float]] = {}
    for item in filter(None, args.weights.split(",")):
        name, value = item.split("=")
        stage, key = name.split(".")
        w.setdefault(stage, {})[key] = float(value)
    counts = DPClassCounts(classes, **({"weight": w["classes"]["counts"]} if "counts" in w.get("classes", {}) else {}))
    normal = DPNormalization(args.normalization, clip=args.norm_clip, scale=args.norm_scale,
                             weights=w.get("normalization"))
    gauss = DPGaussian(length, dim, clip=args.clip, max_features=args.max_features,
                       shared_scatter=not args.own_scatter, normalized=args.normalization == "dp",
                       weights=w.get("gaussian"))
    lsq = DPLeastSquares(clip=args.lstsq_clip, weights=w.get("lstsq"))
    specs = counts.releases() + normal.releases() + gauss.releases() + (lsq.releases() if upsampler == "dp" else [])
    return specs, counts, normal, gauss, lsq


def fit_dp(args: argparse.Namespace, epsilon: float, red: Tensor, y: Tensor, keys: list[list[int]], ds: Dataset,
           tr: Tensor, length: int, upsampler: str, lstsq_cache: dict[str, Any]
           ) -> tuple[dict[str, Tensor], list[GaussianGenerator], LeastSquaresUpsampler, PrivacyLedger, dict]:
    classes = int(y.max()) + 1
    specs, counts_st, normal, gauss, lsq = dp_specs(args, classes, length, red.shape[2], upsampler)
    plan = plan_budget(specs, epsilon, args.delta, int(red.shape[0]))
    for name in filter(None, args.exact_releases.split(",")):  # diagnosis only: that release without noise
        from feda2v_toolkit.privacy import PlannedRelease

        plan.releases[name] = PlannedRelease(plan.releases[name].spec, 0.0)
    rng = secret_generator()
    ledger = PrivacyLedger(args.delta)
    counts = counts_st.finish(privatize(counts_st.local(y), plan, "classes", rng, ledger), plan)
    norm = normal.run(red, counts, plan, rng, ledger)
    z = (red - norm["mean"]) / norm["std"]
    names = [str(c) for c in range(classes)]
    fits, info = gauss.run(z, y, counts, keys, plan, rng, ledger, conditioned=True, class_names=names)
    gens = new_generators(keys, length, red.shape[2], classes)
    for gen, fit in zip(gens, fits, strict=True):
        if fit is not None:  # else all its classes were dropped by the noisy counts
            gen.set_parameters(fit.means, fit.counts, fit.directions, fit.variances, fit.total)
    ups = LeastSquaresUpsampler(reduced_length=length, full_length=ds.seq_len, dim=ds.dim)
    if upsampler == "dp":
        full_norms = lstsq_cache["full_norms"]
        reduced_norms = row_norms(red)
        clips = lsq.clip_norms(privatize(lsq.local_norms(full_norms, reduced_norms), plan, "lstsq", rng, ledger),
                               max(plan.noise_std("lstsq.full_histogram"), plan.noise_std("lstsq.reduced_histogram")))
        part = lsq.local_stats(pairs_stream(ds, tr, length), clips[0], clips[1], length, ds.seq_len, ds.dim)
        noisy = privatize(part, plan, "lstsq", rng, ledger, sensitivities=lsq.sensitivities(*clips))
        ups.fit_from_statistics(lsq.statistics(noisy, counts.records))
        info["lstsq_clip"] = list(clips)
    else:
        ups.load_state_dict(lstsq_cache["exact"].state_dict())
    info["plan_scale"] = plan.scale
    info["kept_classes"] = int((counts.kept > 0).sum())
    return norm, gens, ups, ledger, info


def synthesize(gens: list[GaussianGenerator], keys: list[list[int]], per_class: int, norm: dict[str, Tensor],
               ups: LeastSquaresUpsampler, full_length: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    pooled, tokens, ys = [], [], []
    for gen, rows in zip(gens, keys, strict=True):
        for c in rows:
            if int(gen.counts[c]) == 0:
                continue
            for s in range(0, per_class, 50):
                k = min(50, per_class - s)
                lab = torch.full((k,), c, dtype=torch.long)
                x = gen.sample(k, labels=lab, generator=g) * norm["std"] + norm["mean"]
                with torch.no_grad():
                    full = ups(x, full_length)
                pooled.append(pooled_features(full, POOL))
                tokens.append(full[:, :2].mean(1))
                ys.append(lab)
    return torch.cat(pooled), torch.cat(tokens), torch.cat(ys)


def membership(gens: list[GaussianGenerator], keys: list[list[int]], norm: dict[str, Tensor], red: Tensor,
               y: Tensor, tr: Tensor, te: Tensor) -> dict[str, dict[str, float]]:
    scores: dict[str, list[Tensor]] = {}
    for gen, rows in zip(gens, keys, strict=True):
        for part, idx in (("in", tr), ("out", te)):
            sel = idx[torch.isin(y[idx], torch.tensor(rows)) & (gen.counts[y[idx]] > 0)]
            z = (red[sel] - norm["mean"]) / norm["std"]
            for name, s in gaussian_scores(gen, z, y[sel]).items():
                scores.setdefault(f"{name}:{part}", []).append(s)
    out = {}
    for name in ("loglik", "span"):
        out[name] = attack_report(torch.cat(scores[f"{name}:in"]), torch.cat(scores[f"{name}:out"]))
    best = max(out, key=lambda k: out[k]["auc"])
    out["best"] = {**out[best], "attack": best}
    return out


# -- DP-SGD cost -------------------------------------------------------------------------------------

def sgd_cost(args: argparse.Namespace, red: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """Seconds per epoch of the built-in trained generators with and without DP-SGD, same config and data:
    without = shuffled batches of ``generator_batch_size``; with = as many Poisson batches of that expected
    size (ghost engine; Opacus' engine too, where it fits in memory)."""
    from feda2v_toolkit.components import TrainContext
    from feda2v_toolkit.config import schema_defaults
    from feda2v_toolkit.generators.gan import GANGenerator
    from feda2v_toolkit.generators.vae import VAEGenerator
    from feda2v_toolkit.privacy.sgd import PoissonSampler, make_private
    from feda2v_toolkit.training.stages import NormalizationStage

    stage = NormalizationStage()
    norm = stage.finish(stage.local(red, torch.arange(red.shape[0])))
    z = (red - norm["mean"]) / norm["std"]
    out = []
    for gtype, cls, extra in (("vae", VAEGenerator, {"use_conditioned_vae": True}),
                              ("gan", GANGenerator, {"gan_r1_weight": 0.0, "gan_conditioned": True})):
        for hidden in (int(h) for h in args.sgd_hidden.split(",")):
            cfg = schema_defaults() | {"generator_training_sequence_length": z.shape[1], "generator_hidden_dim": hidden,
                                       **extra}
            batch = int(cfg["generator_batch_size"])
            n = z.shape[0]
            steps = math.ceil(n / batch)
            row: dict[str, Any] = {"generator": gtype, "hidden": hidden, "batch": batch, "clips": n, "steps": steps}
            for mode in ("plain", "ghost", "opacus"):
                if mode == "opacus" and hidden > args.sgd_opacus_max_hidden:
                    continue
                torch.manual_seed(0)
                gen = cls.from_config(cfg, seq_len=z.shape[1], dim=z.shape[2], num_classes=int(y.max()) + 1)
                opts = gen.configure_optimizers(cfg)
                run = make_private(gen, opts, 1.0, 1.0, batch, config=cfg, engine=mode) if mode != "plain" else None
                times = []
                for epoch in range(args.sgd_epochs + 1):  # the first epoch warms up
                    t0 = time.perf_counter()
                    if run is None:
                        perm = torch.randperm(n)
                        batches = [perm[i:i + batch] for i in range(0, n, batch)]
                    else:
                        batches = list(PoissonSampler(torch.arange(n), batch / n, steps))
                    for b, idx in enumerate(batches):
                        ctx = TrainContext(epoch=epoch, total_epochs=args.sgd_epochs + 1, step=b,
                                           progress=(epoch + b / steps) / (args.sgd_epochs + 1), config=cfg)
                        if run is None:
                            gen.training_step(z[idx], labels=y[idx], conditions=None, optimizers=opts, ctx=ctx)
                        else:
                            run.step(z[idx], labels=y[idx], conditions=None, ctx=ctx)
                    if epoch:
                        times.append(time.perf_counter() - t0)
                if run is not None:
                    run.close()
                row[f"{mode}_s_per_epoch"] = sum(times) / len(times)
            for mode in ("ghost", "opacus"):
                if f"{mode}_s_per_epoch" in row:
                    row[f"{mode}_ratio"] = row[f"{mode}_s_per_epoch"] / row["plain_s_per_epoch"]
            print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                  flush=True)
            out.append(row)
    return out


# -- closed-form fit time ------------------------------------------------------------------------------

def fit_time(args: argparse.Namespace, ds: Dataset, real: dict[str, Tensor], repeats: int = 3) -> dict[str, Any]:
    """Median seconds of the closed-form fit (normalisation + gaussian per key + lstsq, the full sequences
    streamed from the dataset as the pipeline does) without and with DP, alternating runs."""
    y_all = real["labels"]
    tr, _ = split(y_all, args.train, 0)
    red, y = real["reduced"][tr], y_all[tr]
    classes = int(y.max()) + 1
    out: dict[str, Any] = {}
    for gran in args.granularity.split(","):
        keys = generator_keys(gran, classes)
        times: dict[str, list[float]] = {"nonprivate": [], "dp": []}
        cache = {"full_norms": real["full_norms"][tr]}
        for _ in range(repeats):
            t0 = time.perf_counter()
            fit_nonprivate(red, y, keys, ds, tr, args.length)
            times["nonprivate"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fit_dp(args, 1.0, red, y, keys, ds, tr, args.length, "dp", cache)
            times["dp"].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out[gran] = {**{f"{k}_s": v for k, v in med.items()}, "ratio": med["dp"] / med["nonprivate"], "runs": times}
        print(f"  fit time {gran}: non-private {med['nonprivate']:.1f}s, DP {med['dp']:.1f}s, "
              f"ratio {med['dp'] / med['nonprivate']:.2f} (median of {repeats}, alternating)", flush=True)
    return out


# -- main ------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="0.5,1,2,4,8,inf")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--train", type=int, default=100, help="training clips per class (as many are held out)")
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--granularity", default="per_class,unified")
    ap.add_argument("--normalization", choices=["dp", "fixed"], default="dp")
    ap.add_argument("--upsampler", choices=["dp", "exact"], default="dp")
    ap.add_argument("--clip", type=float, default=1.0, help="gaussian clip, times the typical norm")
    ap.add_argument("--norm-clip", type=float, default=1.5)
    ap.add_argument("--norm-scale", choices=DPNormalization.SCALES, default="global")
    ap.add_argument("--lstsq-clip", type=float, default=1.2)
    ap.add_argument("--max-features", type=int, default=32)
    ap.add_argument("--own-scatter", action="store_true", help="per-class generators' scatter from their own "
                    "class only (default: pooled over every class, like the unified model's)")
    ap.add_argument("--weights", default="", help="budget weights, e.g. normalization.sum=3,gaussian.sums=4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--exact-releases", default="", help="diagnosis: comma-separated releases left without noise "
                    "(the run is then NOT private; the ledger says inf)")
    ap.add_argument("--only", default="tradeoff,fit-time,sgd",
                    help="tradeoff (usefulness/AUC per epsilon), fit-time (closed-form fit), sgd (DP-SGD cost)")
    ap.add_argument("--sgd-hidden", default="1024,256", help="generator_hidden_dim values for the DP-SGD cost")
    ap.add_argument("--sgd-epochs", type=int, default=2)
    ap.add_argument("--sgd-opacus-max-hidden", type=int, default=256,
                    help="Opacus' engine forms B copies of every gradient: only up to this hidden size")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    ds = open_dataset(corpus_path(PER_CLASS))
    real = features(ds, args.length)
    y_all = real["labels"]
    classes = int(y_all.max()) + 1
    epsilons = [float(e) for e in args.epsilons.split(",")]
    grans = args.granularity.split(",")
    results: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    sgd: list[dict[str, Any]] = []
    fit: dict[str, Any] = {}
    if "fit-time" in only:
        print("closed-form fit time (streaming the full sequences for lstsq, as the pipeline does):", flush=True)
        fit = fit_time(args, ds, real)
    if "sgd" in only:
        tr, _ = split(y_all, args.train, 0)
        print(f"DP-SGD cost per epoch ({tr.numel()} clips, length {args.length}):", flush=True)
        sgd = sgd_cost(args, real["reduced"][tr], y_all[tr])
    for seed in (int(s) for s in args.seeds.split(",")) if "tradeoff" in only else ():
        tr, te = split(y_all, args.train, seed)
        red, y = real["reduced"][tr], y_all[tr]
        num = classes
        reference = {"pooled": RidgeClassifier(num).fit(real["pooled"][tr], y).accuracy(real["pooled"][te], y_all[te]),
                     "tokens": RidgeClassifier(num).fit(real["tokens"][tr], y).accuracy(real["tokens"][te],
                                                                                          y_all[te])}
        print(f"seed {seed}: real-only accuracy pooled {reference['pooled']:.3f}, tokens 0/1 "
              f"{reference['tokens']:.3f} ({tr.numel()} training, {te.numel()} held-out clips)", flush=True)
        lstsq_cache: dict[str, Any] = {"full_norms": real["full_norms"][tr]}
        for gran in grans:
            keys = generator_keys(gran, classes)
            t0 = time.perf_counter()
            norm, gens, ups = fit_nonprivate(red, y, keys, ds, tr, args.length)
            timing.setdefault(f"fit_nonprivate_{gran}", time.perf_counter() - t0)
            lstsq_cache["exact"] = ups
            rows = [("non-private", math.inf, norm, gens, ups, None, {})]
            for eps in epsilons:
                t0 = time.perf_counter()
                try:
                    fitted = fit_dp(args, eps, red, y, keys, ds, tr, args.length, args.upsampler, lstsq_cache)
                except PrivacyError as exc:  # refused up front (e.g. too few clips per class at this epsilon)
                    print(f"  {gran:9s} dp             eps {eps:>4g}: refused: {exc}", flush=True)
                    results.append({"seed": seed, "granularity": gran, "model": "dp", "epsilon": eps,
                                    "refused": str(exc)})
                    continue
                timing.setdefault(f"fit_dp_{gran}_eps{eps:g}", time.perf_counter() - t0)
                rows.append(("dp" if math.isfinite(eps) else "dp, noise off", eps, *fitted[:3], fitted[3], fitted[4]))
            for label, eps, norm_, gens_, ups_, ledger, info in rows:
                sp, st, sy = synthesize(gens_, keys, args.train, norm_, ups_, ds.seq_len, seed)
                use = usefulness(sp, st, sy, real, tr, te, reference)
                mia = membership(gens_, keys, norm_, real["reduced"], y_all, tr, te)
                spent = ledger.summary() if ledger is not None else None
                row = {"seed": seed, "granularity": gran, "model": label, "epsilon": eps,
                       "spent_epsilon": spent["epsilon"] if spent else None,
                       "spent_rdp_epsilon": spent["rdp_epsilon"] if spent else None, **use,
                       "mia": mia, "info": info, "ledger": spent}
                results.append(row)
                print(f"  {gran:9s} {label:14s} eps {eps:>4g} (spent {row['spent_epsilon'] if spent else '-'}): "
                      f"ratio pooled {use['ratio_pooled']:.3f} tokens {use['ratio_tokens']:.3f} | "
                      f"AUC loglik {mia['loglik']['auc']:.3f} span {mia['span']['auc']:.3f} | "
                      f"TPR@1% {mia['best']['tpr@1%']:.3f} | {json.dumps(info)}", flush=True)
    print("timing (s):", json.dumps({k: round(v, 2) for k, v in timing.items()}))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "timing": timing, "sgd": sgd, "fit_time": fit}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
