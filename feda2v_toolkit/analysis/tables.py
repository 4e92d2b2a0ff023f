"""Plain-text tables of plan, analyze and evaluate results (what the CLI prints without ``--json``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from feda2v_toolkit.runtime.sizes import format_bytes, format_count


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None) -> str:
    """A fixed-width table; ``align`` is one ``l``/``r`` per column (default: first left, rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%"


# -- plan ---------------------------------------------------------------------------------------------

def plan_text(result: Any) -> str:
    r = result
    gens = f"{r.generators} generator{'s' if r.generators != 1 else ''}"
    opts = "; ".join(f"{k}: {v}" for k, v in r.optimizers.items()) or "-"
    lines = [
        f"generator {r.generator_type} ({r.granularity}, {gens}); reducer {r.reducer}, upsampler {r.upsampler}",
        f"D = {r.dim}, full length {r.full_length}, {r.num_classes} classes"
        + (" (assumed: --data or --num-classes gives the real count)" if getattr(r, "classes_assumed", False) else "")
        + (f", conditions [{r.condition_dim}]" if r.condition_dim else "")
        + f"; batch {r.batch_size}, {r.dtype}; optimiser {opts}",
        f"runtime (Python + torch, measured in this process): {format_bytes(r.runtime)}"
        + (f"; data cache for {r.num_samples} sequences included" if r.num_samples else ""),
        "",
    ]
    configured = next(row for row in r.rows if row.length == r.configured_length)
    parts = ", ".join(f"{k} {v:,}" for k, v in configured.parameters.items())
    lines.append(f"parameters at the configured length {r.configured_length}: {parts}; "
                 f"{configured.parameters_per_generator:,} per generator")
    state = ", ".join(f"{k} {v:,}" for k, v in configured.component_state.items())
    lines.append(f"reducer/upsampler state (elements): {state}")
    lines.append("")
    headers = ["length", "params", "weights", "grads", "optimizer", "activations", "step peak", "train total",
               f"generate (n={configured.generate.samples})"]
    if r.budget is not None:
        headers.append("fits")
    rows = []
    for row in r.rows:
        t = row.train
        cells = [f"{row.length}{'*' if row.length == r.configured_length else ''}",
                 format_count(row.parameters_total), format_bytes(t.weights * t.generators),
                 format_bytes(t.gradients * t.generators), format_bytes(t.optimizer * t.generators),
                 format_bytes(t.activations), format_bytes(t.step_peak), format_bytes(t.total),
                 format_bytes(row.generate.total)]
        if r.budget is not None:
            cells.append("yes" if row.fits else "no")
        rows.append(cells)
    lines.append(table(headers, rows))
    out_len = r.output_length if r.output_length_set else "the training length"
    lines.append("* configured length. step peak: simulated tensors of one generator's training step. train total = "
                 "the larger of (step peak + other generators' weights/grads/optimizer) and the passes over "
                 "full-length sequences (read chunks and buffers), + reducer/upsampler state + data cache, "
                 f"+15% allocator allowance, + runtime. generate = all generators' weights + one batch upsampled to "
                 f"the output length ({out_len}; {configured.generate.upsampled} at a time within half the memory "
                 "budget) + the shard writer's rows in flight, +15%, + runtime.")
    if r.budget is not None:
        if r.largest_length is None:
            lines.append(f"memory budget {format_bytes(r.budget)} ({r.budget:,} bytes): no training length fits")
        else:
            best = r.largest_length_plan
            lines.append(f"memory budget {format_bytes(r.budget)} ({r.budget:,} bytes): largest training length "
                         f"that fits: {r.largest_length} (train total {format_bytes(best.train.total)}, "
                         f"{format_count(best.parameters_total)} parameters)")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _rank(p: Any) -> tuple[float, float]:
    from feda2v_toolkit.analysis.analyze import rank_key

    return rank_key(p)


# -- analyze ------------------------------------------------------------------------------------------

def analyze_text(result: Any) -> str:
    r = result
    lines = [
        f"{r.data}: {r.sequences} sequences [{r.seq_len}, {r.dim}], {len(r.class_names)} classes; "
        f"fitted on {r.train}, measured on {r.heldout} held out (seed {r.seed})",
        f"classifier: ridge on {r.pool_positions} pooled positions; on the original sequences: "
        f"{_pct(r.baseline_accuracy)}",
        "",
    ]
    headers = ["reducer", "upsampler", "length", "ratio", "acc. on real", "of original", "R^2", "of optimum",
               "cosine", "accuracy", ""]
    rows = []
    base = r.baseline_accuracy

    def of_base(v: float) -> str:
        return _pct(v / base) if base and not math.isnan(base) and not math.isnan(v) else "-"

    for o in r.optimum:
        rows.append(["linear optimum", "(position PCA)", o.length, f"{o.compression:.1f}x", _pct(o.accuracy_on_real),
                     of_base(o.accuracy_on_real), _num(o.r2, 4), "100%", _num(o.cosine), _pct(o.accuracy), ""])
    best = {(p.reducer, p.upsampler, p.length) for p in r.recommended.values()}
    for length in r.lengths:
        ranked = sorted((p for p in r.pairs if p.length == length), key=_rank, reverse=True)
        for p in ranked:
            rows.append([p.reducer, p.upsampler, p.length, f"{p.compression:.1f}x", _pct(p.accuracy_on_real),
                         of_base(p.accuracy_on_real), _num(p.r2, 4), _pct(p.r2_vs_optimum), _num(p.cosine),
                         _pct(p.accuracy), "<- best" if (p.reducer, p.upsampler, p.length) in best else ""])
    lines.append(table(headers, rows, align="llrrrrrrrrl"))
    lines.append("Pairs ranked per length by acc. on real: the classifier trained on reconstructed training "
                 "sequences, tested on the original held-out ones (what a perfect generator at this length gives "
                 "a model applied to real data); of original: that / the classifier trained on the originals. "
                 "R^2 about the held-out set's per-position mean (what is specific to each clip); accuracy: "
                 "trained and tested on reconstructions.")
    if r.recommended:
        lines.append("recommended: " + "; ".join(f"length {n}: {p.reducer} + {p.upsampler} "
                                                 f"({_pct(p.accuracy_on_real)} on real)"
                                                 for n, p in sorted(r.recommended.items())))
    lines += [f"note: {n}" for n in r.notes]
    lines.append(f"{r.seconds:.1f}s")
    return "\n".join(lines)


# -- evaluate -----------------------------------------------------------------------------------------

def evaluate_text(result: Any) -> str:
    r = result
    lines = [
        f"{r.model} against {r.data} (split {r.split}, seed {r.seed}); reduced space [{r.training_length}, {r.dim}]",
        "",
    ]
    headers = ["class", "real", "synth", "Frechet", "(real halves)", "FD pooled", "(real halves)", "mean gap",
               "cov gap", "diversity", "precision", "recall", "density", "coverage"]

    def g(v: float | None) -> str:
        """Distances: whole numbers with thousands separators from 1,000 up, one decimal from 1, else 3 digits."""
        if v is None or math.isnan(v):
            return "-"
        return f"{v:,.0f}" if abs(v) >= 999.95 else f"{v:.1f}" if abs(v) >= 0.995 else f"{v:.3g}"

    rows = []
    for name, m in [*r.per_class.items(), ("(all)", r.overall)]:
        rows.append([name, m.real, m.synthetic, g(m.frechet), g(m.frechet_real_halves), g(m.frechet_pooled),
                     g(m.frechet_pooled_real_halves),
                     _num(m.mean_gap), _num(m.covariance_gap), _num(m.diversity_ratio), _num(m.precision),
                     _num(m.recall), _num(m.density), _num(m.coverage)])
    lines.append(table(headers, rows))
    lines.append("Frechet, gaps, diversity and the k-NN metrics in the model's reduced space; FD pooled on the "
                 f"classifier's {r.pool_positions} pooled positions (comparable across models); diversity: mean "
                 "pairwise distance of synthetic / real samples; precision, recall, density, coverage with "
                 f"k = {r.overall.k} neighbours.")
    lines += _usefulness_lines(r)
    if r.membership is not None:
        lines += _membership_lines(r.membership)
    if r.privacy:
        lines += ["", f"copy detection: distance to the closest training sequence (DCR) in the model's normalised "
                      f"reduced space; training data {r.train_data}"]
        rows = [[c, m.training, _num(m.synthetic_dcr), _num(m.real_dcr), _num(m.ratio), _pct(m.close_share),
                 "COPIES" if m.memorising else "no copies"] for c, m in r.privacy.items()]
        lines.append(table(["class", "train", "synthetic DCR", "held-out DCR", "ratio", "close", "verdict"], rows,
                           align="lrrrrrl"))
        lines.append("DCR: median distance to the nearest training sequence of the class; ratio: synthetic / "
                     "held-out real (about 1: as far from the training clips as new clips are; well below 1: "
                     "copies or interpolations); close: share of synthetic samples nearer than 95% of held-out ones. "
                     "It detects copies; it does not measure privacy (a model can leak membership with a DCR "
                     "ratio above 1: see the membership inference section).")
    verdicts = []
    if r.collapsed:
        verdicts.append("COLLAPSED")
    if any(m.memorising for m in r.privacy.values()):
        verdicts.append("COPIES TRAINING DATA")
    if r.membership is not None and r.membership.leaking:
        verdicts.append("LEAKS MEMBERSHIP")
    lines += ["", "verdict: " + (", ".join(verdicts) if verdicts else
                                 "no collapse, no copies" + (", no membership leak flagged" if r.membership
                                                             else " (membership not audited)"))]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _ci(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _usefulness_lines(r: Any) -> list[str]:
    lines: list[str] = []
    u = r.usefulness
    if u is not None:
        v = u.summary
        how = ("standard protocol: trained on the model's training clips vs on as many synthetic clips per class, "
               "both tested on the held-out real clips" if u.protocol == "standard" else
               "FALLBACK protocol (no training data): the real data split into a train and a test part; pass "
               "--train-data for the standard protocol")
        lines += ["", f"usefulness (train-on-synthetic / train-on-real accuracy): {_num(v.ratio_mean)} "
                      f"(min {_num(v.ratio_min)}, max {_num(v.ratio_max)} over synthetic draws "
                      f"{', '.join(map(str, u.seeds))})",
                  f"  {how}; features: {v.features}; classifier: {u.classifier}",
                  f"  real-trained {_pct(v.real_accuracy)} ({v.real_train} clips), synthetic-trained "
                  + ", ".join(_pct(a) for a in v.synthetic_accuracy) + f" ({v.synthetic_train} each); "
                  f"tested on {v.test} real clips; reference: trained on the same real clips after the model's "
                  f"reducer and upsampler (what the reduction alone keeps) {_pct(v.reconstructed_accuracy)}"]
        p = u.pooled
        if p is not None:
            lines.append(f"  second view, {p.features}: ratio {_num(p.ratio_mean)} (min {_num(p.ratio_min)}, max "
                         f"{_num(p.ratio_max)}); real-trained {_pct(p.real_accuracy)} ({p.real_train} clips, "
                         f"tested on {p.test}); reduced and upsampled {_pct(p.reconstructed_accuracy)}")
    d = r.downstream
    lines += ["", f"split protocol, detail (ridge on {r.pool_positions} pooled positions, tested on {d.real_test} "
                  f"real sequences of the data): real-only {_pct(d.real_only)} ({d.real_train} real), "
                  f"train-on-synthetic {_pct(d.tstr)} ({d.synthetic} synthetic), real+synthetic {_pct(d.augmented)}"]
    rows = [[c, _pct(v.get("real_only")), _pct(v.get("tstr")), _pct(v.get("augmented"))]
            for c, v in d.per_class.items()]
    lines.append(table(["class", "real-only", "TSTR", "augmented"], rows))
    return lines


def _membership_lines(a: Any) -> list[str]:
    lines = ["", f"membership inference: {a.members} members ({a.member_source}) vs {a.non_members} held-out "
                 f"non-members of the same classes, scored together; 95% intervals from {a.bootstrap} bootstrap "
                 f"resamples"]
    rows = []
    for x in a.attacks:
        cells = [("* " if x.name == a.headline else "  ") + x.name, _ci(x.auc, x.auc_low, x.auc_high)]
        for t in x.tpr_at:
            cells.append(_ci(t.tpr, t.low, t.high) + ("" if t.reliable else " ~"))
        rows.append(cells)
    fprs = [t.fpr for t in a.attacks[0].tpr_at] if a.attacks else []
    if rows:
        lines.append(table(["attack", "AUC [95%]", *[f"TPR at FPR {f:.1%} [95%]" for f in fprs]], rows,
                           align="l" + "r" * (1 + len(fprs))))
    if a.headline is not None:
        best = a.attack(a.headline)
        verdict = "LEAKS MEMBERSHIP" if a.leaking else "no leak flagged"
        lines.append(f"headline (*, the highest AUC lower bound): {a.headline}, AUC {best.auc:.3f}: {verdict} "
                     f"(flagged above {a.threshold}; 0.5 = the attacker cannot tell)")
        shown = {c: v for c, v in best.per_class_auc.items() if v is not None}
        if shown:
            lines.append("  per class (detail; small classes are noisy): "
                         + ", ".join(f"{c} {v:.2f}" for c, v in shown.items()))
    if a.dp:
        lines.append(f"the model records (epsilon {a.dp['epsilon']:g}, delta {a.dp['delta']:g})-DP: no attack can "
                     f"exceed AUC {a.dp['auc_bound']:.3f}")
    lines += [f"  not run: {u}" for u in a.unavailable]
    lines += [f"  {n}" for n in a.notes]
    return lines


# -- privacy-tradeoff ---------------------------------------------------------------------------------

def tradeoff_text(result: Any) -> str:
    """Per target epsilon: the spend, usefulness and the audit's headline side by side."""
    from feda2v_toolkit.analysis.tradeoff import epsilon_label

    r = result
    several = len(r.seeds) > 1

    def clips(counts: dict[str, int]) -> str:
        values = sorted(set(counts.values()))
        return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"

    lines = [
        f"privacy trade-off of {r.generator_type} (config: {r.config}) on {r.data}: {len(r.train_clips)} classes, "
        f"{clips(r.train_clips)} training clips and {clips(r.heldout_clips)} held-out clips per class "
        f"(test fraction {r.test_fraction:g}); delta {r.delta:g}; seed{'s' if several else ''} "
        f"{', '.join(map(str, r.seeds))}",
        "",
    ]
    rows = []
    for p in r.points:
        if not p.runs:
            rows.append([epsilon_label(p.epsilon), "refused", "-", "-", "-", "-", "-", "see below"])
            continue
        spent = (f"{p.spent_epsilon:.3g}" if p.spent_epsilon is not None else
                 "-" if p.epsilon is None else "NOT RECORDED")
        use = _num(p.usefulness) + (f" [{_num(p.usefulness_low)}, {_num(p.usefulness_high)}]"
                                     if p.usefulness_low is not None else "")
        auc = _num(p.auc) + (f" [{_num(p.auc_low)}, {_num(p.auc_high)}]" if p.auc_low is not None else "")
        note = f"{p.refused} of {p.runs + p.refused} refused" if p.refused else ""
        rough = any(x.tpr_reliable is False for x in r.runs if x.epsilon == p.epsilon and not x.refused)
        rows.append([epsilon_label(p.epsilon), spent, use, auc, _pct(p.tpr_at_1pct) + (" ~" if rough else ""),
                     _num(p.auc_bound),
                     f"{p.train_seconds:.1f}" if p.train_seconds is not None else "-", note])
    headers = ["epsilon", "spent", "usefulness [range]", "membership AUC [95%]", "TPR at FPR 1%", "DP AUC bound",
               "train s", "refused"]
    if not any(p.refused for p in r.points):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    lines.append(table(headers, rows, align="lrrrrrrl"[:len(headers)]))
    attacks = sorted({x.attack for x in r.runs if x.attack})
    lines += [
        f"usefulness: train-on-synthetic / train-on-real accuracy ({r.classifier.split(',')[0]}, AST-head features, "
        f"tested on the held-out clips), mean over {r.usefulness_draws} synthetic draws"
        + (f" and {len(r.seeds)} seeds" if several else "") + "; range: lowest and highest draw.",
        "membership AUC: the audit's strongest attack (members: the training clips; non-members: the held-out "
        "ones), 95% bootstrap interval" + (" (from the lowest to the highest bound over the seeds)" if several else "")
        + "; 0.5 = the attacker cannot tell, above 0.6 flagged; headline attack(s): "
        + (", ".join(attacks) or "-") + ".",
        "TPR at FPR 1%: the headline attack's true-positive rate at 1% false positives (~: fewer than 100 held-out "
        "clips, interpolated towards the first false positive).",
        "DP AUC bound: the largest AUC any attack can reach against an (epsilon, delta)-DP model; spent: the epsilon "
        "the model file records.",
    ]
    refused = [x for x in r.runs if x.refused]
    lines += [f"refused: epsilon {epsilon_label(x.epsilon)}, seed {x.seed}: {x.refused}" for x in refused]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
