"""The peer's DP-CVAE (federated-dp-cvae, MICCAI 2025), re-implemented, correctly accounted and scored on our corpus.

    pip install -e '.[privacy]'       # opacus 1.6 and dp-accounting 0.6
    FEDA2V_BENCH_CACHE=/work/bench-cache nice -n 10 python bench/peer_dpcvae.py [--epochs 100] [--seeds 0,1,2]
        [--settings inf:1e-5,1:1e-5,1:1e-4] [--corpus PATH] [--train-per-class 100] [--json OUT.json]

What the peer trains ("Embedding-Based Federated Data Sharing via Differentially Private Conditional
VAEs"; repository ``federated-dp-cvae``, ``models/cvae.py`` and ``anonymizer/cvae.py``), reproduced here:

* a conditional VAE: encoder ``x (+) onehot(y)`` -> 3 x (Linear 256, ReLU) -> ``mu``, ``log sigma^2``
  (latent 100); decoder ``z (+) onehot(y)`` -> 3 x (Linear 256, ReLU) -> Linear ``d`` -> Sigmoid;
* inputs min-max scaled per feature to [0, 1] with the training data's minimum and maximum (not private,
  as in the peer), samples mapped back with the same numbers;
* loss ``mse_loss(recon, x)`` (mean over batch and features) ``+ 0.1 * KL``, the KL **summed** over the
  batch and the latent (the peer's ``torch.sum``); Adam at lr 1e-3 (constant: the peer's FedAvg path
  passes no learning-rate schedule); batch 256; DP-SGD by Opacus with ``max_grad_norm`` 1.5 (the peer's
  runs), Poisson sampling at ``q = 1 / ceil(N / 256)``;
* samples: ``z ~ N(0, I)``, as many per class as the class has training clips.

What differs from the peer, on purpose: the noise multiplier is calibrated (``make_private_with_epsilon``)
for the number of epochs actually trained, every optimiser step is accounted, and the epsilon actually
spent (``PrivacyEngine.get_epsilon(delta)``, PRV accountant; cross-checked with dp_accounting's RDP
accountant on the same steps) is reported. The peer calibrates for 20 epochs and trains 100 (250 over
FedAvg) and logs only its target; the script also reports what that miscalibration spends on this
data's sampling rate. Centralised training only (one site): the peer's FedAvg of the decoder adds
further steps, which would add further spend. Per-sample clipping uses Opacus' ghost clipping (exact
per-row gradient norms of the Linear layers, then a second backward pass of the clipped sum): the same
clipped gradient as the peer's hooks mode with the whole Poisson batch in one physical batch
(``tests/test_bench_peer_dpcvae.py`` checks it against clipping each row's gradient by hand), without
materialising 6.5 M parameters x 256 rows of per-sample gradients.

Features: the same the toolkit's generators see. Each clip ``[1214, 768]`` is reduced to 16 tokens by
``adaptive_avg`` (``feda2v_toolkit.reducers.adaptive_avg.AdaptiveAvgReducer``) and flattened (12,288
numbers); samples are mapped back to ``[1214, 768]`` by the ``lstsq`` upsampler fitted on the training
clips' (reduced, full) pairs, as ``feda2v-tk train`` fits it (not private either, like the scaling).

Usefulness, the standard protocol: the ridge classifier of ``feda2v_toolkit.analysis.classifier`` on
``pooled_features(x, 64)`` of full-length sequences, trained once on the real training clips and once on
the synthetic ones, both tested on the held-out real clips; usefulness ratio = synthetic accuracy / real
accuracy. Setting: the first ``--train-per-class`` clips of each class train (generator, scaling,
upsampler and the real classifier), the remaining clips of each class are held out. Two references
come with it: the real-only accuracy, and a classifier trained on each class's mean training clip alone
(what a generator that collapses onto its class means could reach at best). Each run also reports,
in the reduced space, the samples' within-class spread relative to the real clips' and how far the
samples' class means lie from the real ones.

Known limit: large target epsilons (10, 1000 tried) stall in Opacus' PRV calibration (overflow, 7 GB,
no result in 20 minutes); the script is meant for epsilon around 1 and for no DP.

Results are recorded in docs/performance.md ("Peer: DP-CVAE").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feda2v_toolkit.analysis.classifier import RidgeClassifier, pooled_features  # noqa: E402
from feda2v_toolkit.data import open_dataset  # noqa: E402
from feda2v_toolkit.reducers.adaptive_avg import AdaptiveAvgReducer  # noqa: E402
from feda2v_toolkit.upsamplers.lstsq import LeastSquaresUpsampler  # noqa: E402

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # opacus' PRV at q = 1
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # PRV's domain bound

REDUCED = 16
POOL = 64
HIDDEN, LATENT, BETA = 256, 100, 0.1
BATCH, LR, MAX_GRAD_NORM = 256, 1e-3, 1.5
PEER_CALIBRATED_EPOCHS, PEER_TRAINED_EPOCHS = 20, 100
NON_PRIVATE = ["per-feature min/max scaling from the training clips (as the peer)",
               "the lstsq upsampler, fitted on the training clips' (reduced, full) pairs",
               "the per-class sample counts (as the peer)"]


class CVAE(nn.Module):
    """The peer's conditional VAE (see the module docstring)."""

    def __init__(self, input_dim: int, classes: int, hidden: int = HIDDEN, latent: int = LATENT) -> None:
        super().__init__()
        self.classes, self.latent = classes, latent
        self.encoder = nn.Sequential(nn.Linear(input_dim + classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent + classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, input_dim), nn.Sigmoid())

    def decode(self, z: Tensor, y_onehot: Tensor) -> Tensor:
        return self.decoder(torch.cat([z, y_onehot], -1))

    def forward(self, x: Tensor, y_onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(torch.cat([x, y_onehot], -1))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, y_onehot), mu, logvar


def peer_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """MSE (mean) + 0.1 * KL (summed over the batch and the latent), as the peer's ``loss_function``."""
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return F.mse_loss(recon, x, reduction="mean") + BETA * kld


def per_sample_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``[B]`` terms whose mean is :func:`peer_loss`: ``mse_i + 0.1 * B * KL_i``.

    Their gradients are the per-sample gradients Opacus clips in the peer's code (hooks mode, loss
    reduction "mean", the whole Poisson batch in one physical batch: its ``max_physical_batch_size`` is
    256): the summed KL weighs ``B`` times more in each row's gradient than the mean MSE.
    """
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    return (recon - x).square().mean(1) + BETA * x.shape[0] * kld


def dp_loss(model: nn.Module, optimizer: Any, recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Any:
    """The peer's loss for Opacus' ghost clipping (its ``backward`` clips each row's gradient to 1.5)."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    return DPTensorFastGradientClipping(model, optimizer, per_sample_loss(recon, x, mu, logvar), "mean")


# -- data -----------------------------------------------------------------------------------------------

def load_features(path: Path, train_per_class: int, chunk: int = 64) -> dict[str, Any]:
    """Reduce every clip to 16 tokens, pool every clip for the classifier, fit ``lstsq`` on the training clips."""
    ds = open_dataset(path)
    train_idx, test_idx = [], []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        if idx.numel() <= train_per_class:
            raise SystemExit(f"peer_dpcvae: class {ds.class_names[c]!r} has {idx.numel()} clips; "
                             f"need more than --train-per-class {train_per_class}")
        train_idx.append(idx[:train_per_class])
        test_idx.append(idx[train_per_class:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    reducer = AdaptiveAvgReducer(length=REDUCED)
    upsampler = LeastSquaresUpsampler(reduced_length=REDUCED, full_length=ds.seq_len, dim=ds.dim)
    reduced = torch.empty(len(ds), REDUCED, ds.dim)
    pooled = torch.empty(len(ds), min(POOL, ds.seq_len) * ds.dim)
    t0 = time.perf_counter()
    train_set = set(tr.tolist())

    def pairs():  # one streaming pass: reduce and pool every clip, hand the training pairs to lstsq
        for batch in ds.batches(chunk):
            x, rows = batch.embeddings, batch.indices
            r = reducer(x)
            reduced[rows] = r
            pooled[rows] = pooled_features(x, POOL)
            keep = torch.tensor([int(i) in train_set for i in rows])
            if bool(keep.any()):
                yield r[keep], x[keep]

    with torch.no_grad():
        upsampler.fit(pairs)
    upsampler.eval()
    # R^2 of the held-out clips' round trip (about their per-position mean), computed directly: the fit's
    # own "train_r2" comes from sums of ~1e10 that cancel to ~1e8 and is not reliable at this scale
    sse, sum_x, sum_xx = 0.0, torch.zeros(ds.seq_len, ds.dim, dtype=torch.float64), 0.0
    with torch.no_grad():
        for batch in ds.batches(chunk, te):
            x = batch.embeddings
            sse += float((upsampler(reduced[batch.indices], ds.seq_len) - x).double().square().sum())
            sum_x += x.double().sum(0)
            sum_xx += float(x.double().square().sum())
    r2 = 1.0 - sse / (sum_xx - float(sum_x.square().sum()) / te.numel())
    return {"ds": ds, "train": tr, "test": te, "reduced": reduced, "pooled": pooled, "upsampler": upsampler,
            "upsampler_heldout_r2": r2, "read_seconds": time.perf_counter() - t0}


# -- accounting -----------------------------------------------------------------------------------------

def rdp_epsilon(noise: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's RDP epsilon of ``steps`` Poisson-sampled Gaussian steps (add/remove one record)."""
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
    return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def prv_epsilon(noise: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise, q, steps)]
    return float(acc.get_epsilon(delta))


def peer_miscalibration(q: float, steps_per_epoch: int, epsilon: float, delta: float) -> dict[str, float]:
    """The peer's noise (calibrated for 20 epochs) and what 100 epochs at it spend, on this sampling rate."""
    from opacus.accountants.utils import get_noise_multiplier

    noise = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 epochs=PEER_CALIBRATED_EPOCHS, accountant="prv")
    steps = PEER_TRAINED_EPOCHS * steps_per_epoch
    return {"target_epsilon": epsilon, "delta": delta, "noise_multiplier": noise,
            "calibrated_epochs": PEER_CALIBRATED_EPOCHS, "trained_epochs": PEER_TRAINED_EPOCHS,
            "epsilon_spent_prv": prv_epsilon(noise, q, steps, delta),
            "epsilon_spent_rdp": rdp_epsilon(noise, q, steps, delta)}


# -- one run ----------------------------------------------------------------------------------------------

def train_and_sample(data: dict[str, Any], epsilon: float, delta: float, epochs: int, seed: int) -> dict[str, Any]:
    ds, tr = data["ds"], data["train"]
    torch.manual_seed(seed)
    x = data["reduced"][tr].reshape(tr.numel(), -1)
    y = ds.labels[tr]
    lo, hi = x.min(0).values, x.max(0).values  # not private (the peer's _normalize)
    span = (hi - lo).clamp(min=1e-12)
    xs = (x - lo) / span
    classes = ds.num_classes
    model = CVAE(xs.shape[1], classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(xs, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    out: dict[str, Any] = {"epsilon_target": epsilon, "delta": delta, "seed": seed, "epochs": epochs,
                           "train_clips": int(tr.numel()), "steps_per_epoch": steps_per_epoch}
    engine = None
    if math.isfinite(epsilon):
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        # ghost clipping: exact per-sample gradient norms of the Linear layers without materialising the
        # per-sample gradients (6.5 M parameters x 256 rows), then a second backward pass of the clipped sum
        model, optimizer, _, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
            epochs=epochs, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True, grad_sample_mode="ghost",
            criterion=nn.MSELoss())
        q = float(loader.sample_rate)
        out.update(noise_multiplier=float(optimizer.noise_multiplier), sample_rate=q, max_grad_norm=MAX_GRAD_NORM)
    epoch_seconds, losses = [], []
    model.train()
    for _ in range(epochs):
        t0 = time.perf_counter()
        total, batches = 0.0, 0
        for xb, yb in loader:  # DP: Poisson batches (one optimiser step each, accounted)
            optimizer.zero_grad()
            recon, mu, logvar = model(xb, F.one_hot(yb, classes).float())
            if engine is None:
                loss = peer_loss(recon, xb, mu, logvar)
            else:
                loss = dp_loss(model, optimizer, recon, xb, mu, logvar)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.item()), batches + 1
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total}")
        epoch_seconds.append(time.perf_counter() - t0)
        losses.append(total / max(batches, 1))
    out["seconds_per_epoch"] = statistics.median(epoch_seconds)
    out["train_seconds"] = sum(epoch_seconds)
    out["loss_first_last"] = [losses[0], losses[-1]]
    if engine is not None:
        history = engine.accountant.history
        accounted = sum(h[2] for h in history)
        out["steps_accounted"] = accounted
        out["steps_expected"] = epochs * steps_per_epoch
        out["epsilon_spent"] = float(engine.get_epsilon(delta))
        out["epsilon_spent_rdp"] = rdp_epsilon(out["noise_multiplier"], out["sample_rate"], accounted, delta)
        model = model._module
    else:
        out["epsilon_spent"] = math.inf
    # samples: as many per class as the class has training clips, z ~ N(0, I), un-scaled, upsampled
    model.eval()
    counts = torch.bincount(y, minlength=classes)
    feats, labels, samples = [], [], []
    with torch.no_grad():
        for c in range(classes):
            n = int(counts[c])
            z = torch.randn(n, LATENT)
            s = model.decode(z, F.one_hot(torch.full((n,), c), classes).float()) * span + lo
            samples.append(s)
            full = data["upsampler"](s.reshape(n, REDUCED, ds.dim), ds.seq_len)
            feats.append(pooled_features(full, POOL))
            labels.append(torch.full((n,), c))
    te = data["test"]
    clf = RidgeClassifier(classes).fit(torch.cat(feats), torch.cat(labels))
    out["synthetic_accuracy"] = clf.accuracy(data["pooled"][te], ds.labels[te])
    out.update(sample_diagnostics(samples, x, y))
    return out


def sample_diagnostics(samples: list[Tensor], x: Tensor, y: Tensor) -> dict[str, float]:
    """In the flattened reduced space: how varied the samples of a class are and where their mean lies.

    ``spread_ratio``: mean within-class RMS deviation of the samples / that of the real training clips
    (0: every sample of a class is the same; 1: as varied as real clips). ``class_mean_error``: distance
    of the samples' class mean from the real class mean / distance of the real class mean from the real
    overall mean, averaged over classes (0: class means right; about 1 or more: the class information is lost).
    """
    overall = x.mean(0)
    spread, err = [], []
    for c, s in enumerate(samples):
        real = x[y == c]
        real_mean = real.mean(0)
        spread.append(float((s - s.mean(0)).square().sum(1).mean().sqrt())
                      / float((real - real_mean).square().sum(1).mean().sqrt()))
        err.append(float((s.mean(0) - real_mean).norm()) / float((real_mean - overall).norm()))
    return {"spread_ratio": statistics.fmean(spread), "class_mean_error": statistics.fmean(err)}


def class_mean_accuracy(data: dict[str, Any]) -> float:
    """Reference: a classifier trained on each class's real training mean (upsampled; as many copies as
    the class has clips) -- what a generator that returns its class's mean would score at best."""
    ds, tr, te = data["ds"], data["train"], data["test"]
    y = ds.labels[tr]
    feats, labels = [], []
    with torch.no_grad():
        for c in range(ds.num_classes):
            n = int((y == c).sum())
            mean = data["reduced"][tr][y == c].mean(0, keepdim=True)
            feats.append(pooled_features(data["upsampler"](mean, ds.seq_len), POOL).expand(n, -1))
            labels.append(torch.full((n,), c))
    clf = RidgeClassifier(ds.num_classes).fit(torch.cat(feats), torch.cat(labels))
    return clf.accuracy(data["pooled"][te], ds.labels[te])


# -- main -------------------------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """Strict JSON: infinite epsilons (no DP) as the string ``"inf"``."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def parse_settings(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        eps, _, delta = item.partition(":")
        out.append((math.inf if eps.strip().lower() in ("inf", "none") else float(eps), float(delta or 1e-5)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, help="shard directory (default: bench/corpus.py's 200-per-class corpus)")
    ap.add_argument("--per-class", type=int, default=200, help="clips per class of the default corpus")
    ap.add_argument("--train-per-class", type=int, default=100, help="first clips of each class that train")
    ap.add_argument("--epochs", type=int, default=PEER_TRAINED_EPOCHS,
                    help="epochs trained and calibrated for (default 100, as the peer trains)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default="inf:1e-5,1:1e-5,1:1e-4",
                    help="comma-separated EPSILON:DELTA (inf = no DP)")
    ap.add_argument("--json", type=Path, help="also write the full results here")
    args = ap.parse_args(argv)
    if args.corpus is None:
        from corpus import ensure_corpus

        args.corpus = ensure_corpus(per_class=args.per_class, seed=0)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = parse_settings(args.settings)
    t_start = time.perf_counter()
    data = load_features(args.corpus, args.train_per_class)
    ds, tr, te = data["ds"], data["train"], data["test"]
    real = RidgeClassifier(ds.num_classes).fit(data["pooled"][tr], ds.labels[tr])
    real_acc = real.accuracy(data["pooled"][te], ds.labels[te])
    mean_acc = class_mean_accuracy(data)
    print(f"corpus {args.corpus}: {len(ds)} clips, {ds.num_classes} classes; train {tr.numel()}, held out "
          f"{te.numel()}; reduced + pooled + lstsq fit in {data['read_seconds']:.0f}s "
          f"(lstsq round trip, held-out R^2 {data['upsampler_heldout_r2']:.3f}); real-only accuracy {real_acc:.3f} "
          f"(chance {1 / ds.num_classes:.3f}); trained on the class means alone {mean_acc:.3f}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    steps_per_epoch = math.ceil(tr.numel() / BATCH)
    q = 1.0 / steps_per_epoch
    results: dict[str, Any] = {
        "corpus": str(args.corpus), "clips": len(ds), "train_clips": int(tr.numel()), "heldout_clips": int(te.numel()),
        "reduced_length": REDUCED, "reducer": "adaptive_avg", "upsampler": "lstsq", "pool_positions": POOL,
        "upsampler_heldout_r2": data["upsampler_heldout_r2"],
        "real_accuracy": real_acc, "class_mean_accuracy": mean_acc, "chance": 1 / ds.num_classes, "epochs": args.epochs, "seeds": seeds,
        "batch": BATCH, "sample_rate": q, "steps_per_epoch": steps_per_epoch, "max_grad_norm": MAX_GRAD_NORM,
        "lr": LR, "non_private": NON_PRIVATE, "runs": [], "summary": {},
        "peer_miscalibration": [peer_miscalibration(q, steps_per_epoch, eps, d)
                                for eps, d in dict.fromkeys(s for s in settings if math.isfinite(s[0]))]}
    for m in results["peer_miscalibration"]:
        print(f"[peer] calibrated for {m['calibrated_epochs']} epochs at eps {m['target_epsilon']:g}, "
              f"delta {m['delta']:g} (q {q:.3f}): noise {m['noise_multiplier']:.3f}; trained "
              f"{m['trained_epochs']} epochs it spends eps {m['epsilon_spent_prv']:.2f} (PRV), "
              f"{m['epsilon_spent_rdp']:.2f} (RDP)", flush=True)
    for eps, delta in settings:
        key = f"eps={eps:g},delta={delta:g}" if math.isfinite(eps) else "no DP"
        runs = []
        for seed in seeds:
            run = train_and_sample(data, eps, delta, args.epochs, seed)
            run["ratio"] = run["synthetic_accuracy"] / real_acc
            runs.append(run)
            print(f"[run] {key} seed {seed}: {json.dumps(jsonable(run))}", flush=True)
        results["runs"].extend(runs)
        results["summary"][key] = {
            "epsilon_target": eps, "delta": delta,
            "ratio_mean": statistics.fmean(r["ratio"] for r in runs), "ratio_min": min(r["ratio"] for r in runs),
            "synthetic_accuracy_mean": statistics.fmean(r["synthetic_accuracy"] for r in runs),
            "spread_ratio_mean": statistics.fmean(r["spread_ratio"] for r in runs),
            "class_mean_error_mean": statistics.fmean(r["class_mean_error"] for r in runs),
            "epsilon_spent_max": max(r["epsilon_spent"] for r in runs),
            "noise_multiplier": runs[0].get("noise_multiplier"),
            "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs)}
    results["total_seconds"] = time.perf_counter() - t_start
    print(f"\n[summary] usefulness ratio (synthetic / real accuracy, real {real_acc:.3f}), {args.epochs} epochs, "
          f"seeds {seeds}; not private: {'; '.join(NON_PRIVATE)}")
    for key, s in results["summary"].items():
        noise = f"noise {s['noise_multiplier']:.3f}, " if s["noise_multiplier"] else ""
        print(f"  {key:22s} ratio {s['ratio_mean']:.3f} (min {s['ratio_min']:.3f}); {noise}eps spent "
              f"{s['epsilon_spent_max']:.3f}; spread {s['spread_ratio_mean']:.3f}, class-mean error "
              f"{s['class_mean_error_mean']:.2f}; {s['seconds_per_epoch']:.1f} s/epoch")
    print(json.dumps(jsonable(results["summary"] | {"real_accuracy": real_acc, "class_mean_accuracy": mean_acc,
                                                    "epochs": args.epochs,
                                                    "peer_miscalibration": results["peer_miscalibration"]})))
    if args.json:
        args.json.write_text(json.dumps(jsonable(results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
