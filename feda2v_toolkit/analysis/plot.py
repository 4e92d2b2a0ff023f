"""PNG plots of analyze and evaluate results. Needs matplotlib (``pip install 'feda2v-tk[plot]'``),
imported only when a plot is asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.runtime.atomic import atomic_path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'feda2v-tk[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: the plot is written as PNG; name it *.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out


def plot_analysis(result: Any, path: str | os.PathLike[str]) -> Path:
    """Information kept (R^2, cosine) and accuracy vs length, one line per pair, the optimum dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 6))
    panels = [("r2", "R² about the per-position mean (held out)"), ("cosine", "token cosine (held out)"),
              ("accuracy_on_real", "accuracy on real (trained on reconstructions)")]
    pairs: dict[str, list[Any]] = {}
    for p in result.pairs:
        pairs.setdefault(f"{p.reducer} + {p.upsampler}", []).append(p)
    for ax, (attr, title) in zip(axes, panels, strict=True):
        for name, rows in pairs.items():
            rows = sorted(rows, key=lambda r: r.length)
            ax.plot([r.length for r in rows], [getattr(r, attr) for r in rows], marker="o", label=name)
        if result.optimum:
            rows = sorted(result.optimum, key=lambda r: r.length)
            ax.plot([r.length for r in rows], [getattr(r, attr) for r in rows], "k--", marker="s",
                    label="linear optimum")
        if attr == "accuracy_on_real":
            ax.axhline(result.baseline_accuracy, color="grey", linestyle=":", label="original sequences")
        if attr != "accuracy_on_real":
            # interpolating a non-positional reduction can be far below 0: keep the useful range visible
            tops = [getattr(r, attr) for r in [*result.pairs, *result.optimum]]
            top = max(tops) if tops else 1.0
            ax.set_ylim(bottom=min(0.0, -0.1 * abs(top)), top=top * 1.1 if top > 0 else 1.0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result.lengths, [str(v) for v in result.lengths])
        ax.set_xlabel("training length l")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle(f"{Path(result.data).name}: {result.sequences} x [{result.seq_len}, {result.dim}], "
                 f"{result.heldout} held out")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_evaluation(result: Any, path: str | os.PathLike[str]) -> Path:
    """Per class: Frechet distance next to the real-halves reference, manifold metrics, downstream accuracy."""
    plt = _pyplot()
    import numpy as np

    names = [*result.per_class, "(all)"]
    metrics = [*result.per_class.values(), result.overall]
    x = np.arange(len(names))
    audit = getattr(result, "membership", None)
    fig, axes = plt.subplots(1, 4 if audit is not None else 3, figsize=(21 if audit is not None else 16, 5))
    ax = axes[0]
    ax.bar(x - 0.2, [m.frechet_pooled or 0 for m in metrics], 0.4, label="synthetic vs real")
    ax.bar(x + 0.2, [m.frechet_pooled_real_halves or 0 for m in metrics], 0.4, label="real half vs half")
    ax.set_title(f"Fréchet distance (pooled to {result.pool_positions} positions)")
    ax.legend(fontsize=8)
    ax = axes[1]
    keys = ["precision", "recall", "density", "coverage"]
    for i, key in enumerate(keys):
        ax.bar(x + (i - 1.5) * 0.2, [getattr(m, key) for m in metrics], 0.2, label=key)
    ax.set_title(f"manifold metrics (k = {result.overall.k})")
    ax.legend(fontsize=8)
    for a in axes[:2]:
        a.set_xticks(x, names, rotation=30)
    ax = axes[2]
    d = result.downstream
    classes = list(d.per_class)
    xc = np.arange(len(classes) + 1)
    for i, key in enumerate(["real_only", "tstr", "augmented"]):
        vals = [d.per_class[c].get(key, float("nan")) for c in classes] + [getattr(d, key)]
        ax.bar(xc + (i - 1) * 0.27, vals, 0.27, label=key.replace("_", "-"))
    ax.set_xticks(xc, [*classes, "(all)"], rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_title("downstream accuracy on real test data (split protocol)")
    ax.legend(fontsize=8)
    if audit is not None:
        _roc_panel(axes[3], audit, np)
    title = f"{Path(result.model).name} vs {Path(result.data).name} (split {result.split})"
    u = getattr(result, "usefulness", None)
    if u is not None:
        title += (f"; usefulness ({u.protocol} protocol) {u.summary.ratio_mean:.2f} "
                  f"(min {u.summary.ratio_min:.2f})")
    if audit is not None and audit.headline is not None:
        title += f"; membership AUC {audit.auc:.2f}" + (" LEAKS" if audit.leaking else "")
    fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _roc_panel(ax: Any, audit: Any, np: Any) -> None:
    """The membership-inference ROC curves on a log FPR axis: the headline attack bold, chance dotted, and the
    DP bound ``TPR = e^eps FPR + delta`` dashed when the model records a DP guarantee."""
    floor = 1.0 / max(audit.non_members, 1)
    lo = min(1e-3, floor) / 2
    for a in audit.attacks:
        fpr, tpr = np.asarray(a.roc_fpr), np.asarray(a.roc_tpr)
        head = a.name == audit.headline
        ax.plot(np.clip(fpr, lo, 1), tpr, lw=2.5 if head else 1.2, label=f"{a.name} (AUC {a.auc:.2f})"
                + (" *" if head else ""))
    grid = np.logspace(np.log10(lo), 0, 200)
    ax.plot(grid, grid, "k:", lw=1, label="chance")
    if audit.dp:
        eps, delta = audit.dp["epsilon"], audit.dp["delta"]
        ax.plot(grid, np.minimum(1, np.exp(eps) * grid + delta), "r--", lw=1,
                label=f"DP bound (eps {eps:g}, delta {delta:g})")
    ax.axvline(floor, color="grey", lw=0.8, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"false-positive rate (log; grey: 1 / {audit.non_members} non-members)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"membership inference: {audit.members} members vs {audit.non_members} held out")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3, which="both")


def plot_tradeoff(result: Any, path: str | os.PathLike[str]) -> Path:
    """Usefulness and the membership audit's headline AUC against the target epsilon (log axis; no DP at the
    right end), and usefulness against AUC; the AUC panel has the chance line (0.5) and the largest AUC
    (epsilon, delta)-DP allows."""
    plt = _pyplot()
    import numpy as np

    from feda2v_toolkit.analysis.membership import LEAK_AUC, dp_auc_bound
    from feda2v_toolkit.analysis.tradeoff import epsilon_label

    points = [p for p in result.points if p.runs]
    finite = sorted(p.epsilon for p in result.points if p.epsilon is not None)
    lo = finite[0] if finite else 1.0
    hi = finite[-1] if finite else 1.0
    no_dp_x = hi * 4 if finite else 1.0  # "no DP" two octaves right of the largest epsilon

    def x_of(eps: float | None) -> float:
        return no_dp_x if eps is None else eps

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = [(axes[0], "usefulness", "usefulness_low", "usefulness_high",
               "usefulness (train-on-synthetic / train-on-real)"),
              (axes[1], "auc", "auc_low", "auc_high", "membership AUC (strongest attack)")]
    for ax, key, low, high, title in panels:
        for part in ([p for p in points if p.epsilon is not None], [p for p in points if p.epsilon is None]):
            if not part:
                continue
            xs = np.array([x_of(p.epsilon) for p in part])
            ys = np.array([np.nan if getattr(p, key) is None else getattr(p, key) for p in part], dtype=float)
            los = np.array([np.nan if getattr(p, low) is None else getattr(p, low) for p in part], dtype=float)
            his = np.array([np.nan if getattr(p, high) is None else getattr(p, high) for p in part], dtype=float)
            err = np.vstack([np.nan_to_num(ys - los), np.nan_to_num(his - ys)]).clip(min=0)
            no_dp = part[0].epsilon is None
            ax.errorbar(xs, ys, yerr=err, marker="s" if no_dp else "o", color="tab:grey" if no_dp else "tab:blue",
                        capsize=3, linestyle="none" if no_dp else "-", label="no DP" if no_dp else "DP target epsilon")
        ax.set_xscale("log")
        ticks = [*finite, no_dp_x] if finite else [no_dp_x]
        ax.set_xticks(ticks, [*(epsilon_label(e) for e in finite), "no DP"])
        ax.minorticks_off()
        if finite:
            ax.axvline(np.sqrt(hi * no_dp_x), color="grey", lw=0.6, linestyle=":")
            ax.set_xlim(lo / 1.6, no_dp_x * 1.6)
        ax.set_xlabel("target epsilon")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax = axes[0]
    ax.axhline(1.0, color="grey", lw=0.8, linestyle=":", label="as useful as the real clips")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.axhline(0.5, color="k", lw=1, linestyle=":", label="0.5: the attacker cannot tell")
    ax.axhline(LEAK_AUC, color="tab:orange", lw=0.8, linestyle="--", label=f"{LEAK_AUC}: flagged as leaking")
    if finite:
        grid = np.logspace(np.log10(lo / 1.6), np.log10(hi * 1.6), 100)
        ax.plot(grid, [dp_auc_bound(float(e), result.delta) for e in grid], "r--", lw=1,
                label=f"largest AUC under DP (delta {result.delta:g})")
    ax.set_ylim(0.4, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    for p in points:
        if p.auc is None or p.usefulness is None:
            continue
        ax.plot(p.auc, p.usefulness, "s" if p.epsilon is None else "o",
                color="tab:grey" if p.epsilon is None else "tab:blue")
        ax.annotate(epsilon_label(p.epsilon), (p.auc, p.usefulness), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axvline(0.5, color="k", lw=1, linestyle=":")
    ax.set_xlabel("membership AUC (lower: more private)")
    ax.set_ylabel("usefulness (higher: more useful)")
    ax.set_title("the trade-off (labels: target epsilon)")
    ax.grid(True, alpha=0.3)
    seeds = len(result.seeds)
    fig.suptitle(f"{Path(result.data).name}: {result.generator_type}, {len(result.train_clips)} classes, "
                 f"{sum(result.train_clips.values())} training / {sum(result.heldout_clips.values())} held-out clips, "
                 f"delta {result.delta:g}, {seeds} seed{'s' if seeds != 1 else ''}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
