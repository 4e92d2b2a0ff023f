"""Membership-inference audit: can an attacker tell the clips that trained a model from other clips?

``evaluate`` runs it whenever the training data is known. *Members* are the rows the generators fitted on
(the trainer's train split, :func:`feda2v_toolkit.model.split.model_split`), *non-members* held-out real
clips of the same classes. Every attack gives each record a score (higher = "more likely a member"), in
the model's normalised reduced space (``model.normalize(model.reducer(x))``, flattened), and the scores of
all classes are pooled into one ROC curve.

Attacks:

* **white-box** (the model file): :meth:`Generator.membership_scores` -- the gaussian's exact
  log-likelihood, the VAE's ELBO, the GAN's discriminator, the negative validation loss of a plugin type
  -- and any :meth:`Generator.extra_membership_scores` (the gaussian's share of the record outside the span
  of its components);
* **black-box** (synthetic samples only): minus the distance to the closest synthetic sample of the
  record's class (:func:`nearest_sample_scores`); and a density-ratio attack in the style of DOMIAS (van
  Breugel et al., AISTATS 2023; :func:`density_ratio_scores`): ``log p_synthetic(x) - log p_reference(x)``
  with both densities Gaussian in the principal subspace of a *reference set* of other real clips.

Reporting follows Carlini et al. ("Membership Inference Attacks From First Principles", S&P 2022): the
AUC and the true-positive rate at false-positive rates of 1% and 0.1% on the interpolated ROC curve, each
with a seeded bootstrap 95% interval (members and non-members resampled separately). The strongest attack
(highest AUC lower bound) is the headline; a headline AUC above :data:`LEAK_AUC` flags the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.analysis.metrics import nearest_distances, principal_directions, project

#: a headline AUC above this flags the model as leaking membership
LEAK_AUC = 0.6
#: the false-positive rates the TPR is reported at (Carlini et al. 2022)
FPRS = (0.01, 0.001)
#: bootstrap resamples of the intervals
BOOTSTRAP = 1000
#: bootstrap matrix cells (resamples x records) held at once
BOOTSTRAP_CELLS = 2_000_000
#: principal directions of the reference set the density-ratio attack works in (at most)
DENSITY_DIMS = 16


@dataclass
class RateAtFPR:
    """TPR at one false-positive rate, with its bootstrap 95% interval. ``reliable`` is False when there
    are fewer than ``1 / fpr`` non-members: the ROC curve then has no point at or below that FPR other
    than (0, 0), and the figure interpolates towards the first false positive."""

    fpr: float
    tpr: float
    low: float
    high: float
    reliable: bool


@dataclass
class AttackResult:
    """One attack's pooled ROC summary (see the module docstring)."""

    name: str
    kind: str  # "white-box" or "black-box"
    description: str
    auc: float
    auc_low: float
    auc_high: float
    tpr_at: list[RateAtFPR]
    per_class_auc: dict[str, float | None]
    roc_fpr: list[float] = field(repr=False)
    roc_tpr: list[float] = field(repr=False)


@dataclass
class MembershipAudit:
    """The membership-inference audit of one evaluation."""

    members: int
    non_members: int
    members_per_class: dict[str, int]
    non_members_per_class: dict[str, int]
    member_source: str  # where the members come from, in words
    attacks: list[AttackResult]
    headline: str | None  # name of the strongest attack
    auc: float | None  # the headline's AUC
    leaking: bool
    threshold: float = LEAK_AUC
    bootstrap: int = BOOTSTRAP
    unavailable: list[str] = field(default_factory=list)
    dp: dict[str, float] | None = None  # {"epsilon", "delta", "auc_bound"} when the model records DP
    notes: list[str] = field(default_factory=list)

    def attack(self, name: str) -> AttackResult:
        for a in self.attacks:
            if a.name == name:
                return a
        raise KeyError(name)


# -- ROC ------------------------------------------------------------------------------------------


def _sorted_groups(members: Tensor, non_members: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order of all scores by decreasing value, whether each is a member, and the end of each tie group."""
    scores = torch.cat([members, non_members]).double()
    is_member = torch.cat([torch.ones(members.numel(), dtype=torch.bool),
                           torch.zeros(non_members.numel(), dtype=torch.bool)])
    order = torch.argsort(scores, descending=True, stable=True)
    s = scores[order]
    ends = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([s.numel() - 1])]) if s.numel() else s.long()
    return order, is_member[order], ends


def _roc_from_weights(weights: Tensor, is_member: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    """ROC points ``[B, K + 1]`` (from (0, 0), one per tie group) of per-record weights ``[B, n]`` (in
    sorted order): bootstrap counts, or ones for the plain curve."""
    w = weights.double()
    tp = torch.cumsum(w * is_member, 1)[:, ends]
    fp = torch.cumsum(w * ~is_member, 1)[:, ends]
    zero = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / tp[:, -1:].clamp(min=1e-300)], 1)
    fpr = torch.cat([zero, fp / fp[:, -1:].clamp(min=1e-300)], 1)
    return fpr, tpr


def _auc(fpr: Tensor, tpr: Tensor) -> Tensor:
    """Trapezoid area under each row's ROC curve (equals the Mann-Whitney AUC, ties counted half)."""
    return ((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(1)


def _tpr_at(fpr: Tensor, tpr: Tensor, target: float) -> Tensor:
    """TPR at FPR ``target`` on each row's interpolated ROC curve: the straight line between the last point
    with FPR <= target (the highest such TPR: the curve is monotone) and the next point (randomising between
    two thresholds achieves every point on it)."""
    k = (fpr <= target).sum(1, keepdim=True) - 1  # last index with fpr <= target (row 0 always qualifies)
    nxt = (k + 1).clamp(max=fpr.shape[1] - 1)
    f0, f1 = fpr.gather(1, k), fpr.gather(1, nxt)
    t0, t1 = tpr.gather(1, k), tpr.gather(1, nxt)
    span = f1 - f0
    frac = torch.where(span > 0, (target - f0) / span.clamp(min=1e-300), torch.zeros_like(span))
    return (t0 + frac.clamp(0, 1) * (t1 - t0)).squeeze(1)


def roc_curve(members: Tensor, non_members: Tensor) -> tuple[Tensor, Tensor]:
    """The ROC curve ``(fpr, tpr)`` of scores (higher = member): one point per distinct score, from (0, 0)
    to (1, 1)."""
    if members.numel() == 0 or non_members.numel() == 0:
        raise ValueError("an ROC curve needs at least one member and one non-member score")
    _, is_member, ends = _sorted_groups(members, non_members)
    fpr, tpr = _roc_from_weights(torch.ones(1, is_member.numel()), is_member, ends)
    return fpr[0], tpr[0]


def roc_auc(members: Tensor, non_members: Tensor) -> float:
    """Area under the ROC curve: the probability that a random member outscores a random non-member."""
    fpr, tpr = roc_curve(members, non_members)
    return float(_auc(fpr[None], tpr[None])[0])


def tpr_at_fpr(members: Tensor, non_members: Tensor, fpr: float) -> float:
    """TPR at false-positive rate ``fpr`` on the interpolated ROC curve (see :func:`_tpr_at`)."""
    f, t = roc_curve(members, non_members)
    return float(_tpr_at(f[None], t[None], fpr)[0])


def score_summary(name: str, kind: str, description: str, members: Tensor, non_members: Tensor, *,
                  member_classes: Sequence[str] | None = None, non_member_classes: Sequence[str] | None = None,
                  fprs: Sequence[float] = FPRS, bootstrap: int = BOOTSTRAP, seed: int = 0) -> AttackResult:
    """AUC and TPR at ``fprs`` of one attack's pooled scores, with seeded bootstrap 95% intervals; per-class
    AUCs when the records' class names are given (``None`` for a class without both kinds of record)."""
    members, non_members = members.double().cpu(), non_members.double().cpu()
    order, is_member, ends = _sorted_groups(members, non_members)
    fpr, tpr = _roc_from_weights(torch.ones(1, order.numel()), is_member, ends)
    auc = float(_auc(fpr, tpr)[0])
    point = {f: float(_tpr_at(fpr, tpr, f)[0]) for f in fprs}
    g = torch.Generator().manual_seed(seed)
    n_m, n_n = members.numel(), non_members.numel()
    aucs, tprs = [], {f: [] for f in fprs}
    chunk = max(1, BOOTSTRAP_CELLS // (n_m + n_n))  # resamples at once: memory bounded in n
    for start in range(0, bootstrap, chunk):
        b = min(chunk, bootstrap - start)
        counts = torch.zeros(b, n_m + n_n, dtype=torch.float64)
        counts[:, :n_m].scatter_add_(1, torch.randint(n_m, (b, n_m), generator=g),
                                     torch.ones(b, n_m, dtype=torch.float64))
        counts[:, n_m:].scatter_add_(1, torch.randint(n_n, (b, n_n), generator=g),
                                     torch.ones(b, n_n, dtype=torch.float64))
        bf, bt = _roc_from_weights(counts[:, order], is_member, ends)
        aucs.append(_auc(bf, bt))
        for f in fprs:
            tprs[f].append(_tpr_at(bf, bt, f))
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    auc_ci = torch.quantile(torch.cat(aucs), q).tolist()
    rates = []
    for f in fprs:
        lo, hi = torch.quantile(torch.cat(tprs[f]), q).tolist()
        rates.append(RateAtFPR(fpr=f, tpr=point[f], low=lo, high=hi, reliable=n_n * f >= 1))
    per_class: dict[str, float | None] = {}
    if member_classes is not None and non_member_classes is not None:
        mc, nc = list(member_classes), list(non_member_classes)
        for c in dict.fromkeys(mc + nc):
            m = members[torch.tensor([x == c for x in mc], dtype=torch.bool)] if mc else members[:0]
            n = non_members[torch.tensor([x == c for x in nc], dtype=torch.bool)] if nc else non_members[:0]
            per_class[c] = roc_auc(m, n) if m.numel() and n.numel() else None
    return AttackResult(name=name, kind=kind, description=description, auc=auc, auc_low=auc_ci[0],
                        auc_high=auc_ci[1], tpr_at=rates, per_class_auc=per_class,
                        roc_fpr=fpr[0].tolist(), roc_tpr=tpr[0].tolist())


def headline(attacks: Sequence[AttackResult]) -> AttackResult | None:
    """The strongest attack: the highest AUC lower bound (ties: the higher AUC)."""
    usable = [a for a in attacks if math.isfinite(a.auc)]
    return max(usable, key=lambda a: (a.auc_low, a.auc)) if usable else None


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC any attack can reach against an (epsilon, delta)-DP model: the area under
    ``TPR = min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))`` = ``(e^eps + 2 delta - delta^2) /
    (1 + e^eps)``, about ``sigmoid(eps)``."""
    e = math.exp(min(epsilon, 700.0))
    return min(1.0, (e + 2 * delta - delta * delta) / (1 + e))


def dp_record(metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """``{"epsilon", "delta"}`` of a model that records a DP guarantee in ``metrics["privacy"]`` (the total
    spend: ``{"epsilon": .., "delta": ..}`` at the top or under ``"total"``), else None."""
    privacy = metrics.get("privacy") if isinstance(metrics, Mapping) else None
    if not isinstance(privacy, Mapping) or privacy.get("unit") == "a whole node (site)":
        return None  # node-level DP (older files kept it here) bounds a site's weight updates, not a clip
    for doc in (privacy.get("total"), privacy):
        if isinstance(doc, Mapping):
            eps, delta = doc.get("epsilon"), doc.get("delta", 0.0)
            if isinstance(eps, (int, float)) and math.isfinite(eps) and isinstance(delta, (int, float)):
                return {"epsilon": float(eps), "delta": float(delta)}
    return None


# -- black-box attacks ------------------------------------------------------------------------------


def nearest_sample_scores(x: Tensor, synthetic: Tensor) -> Tensor:
    """Minus the Euclidean distance from each record ``x [n, ...]`` to its nearest synthetic sample
    (float64): a generator that reproduces its training records puts samples next to them."""
    return -nearest_distances(x, synthetic)


def _shrunk_covariance(dev: Tensor, dof: int) -> Tensor:
    """Covariance ``dev^T dev / dof`` (``[k, k]``) shrunk towards ``m I`` by the Ledoit-Wolf intensity."""
    from feda2v_toolkit.generators.gaussian import ledoit_wolf

    k = dev.shape[1]
    scatter = dev.T @ dev
    cov = scatter / max(dof, 1)
    a = ledoit_wolf(scatter, dev.square().sum(1), k) if dev.shape[0] > 1 else 1.0
    m = float(torch.diagonal(cov).mean()) or 1.0
    return (1 - a) * cov + a * m * torch.eye(k, dtype=cov.dtype)


def _class_gaussian(coords: Tensor, classes: Sequence[str]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-class means, the pooled within-class covariance (shrunk) and the overall mean of ``coords``."""
    names = list(dict.fromkeys(classes))
    idx = {c: torch.tensor([x == c for x in classes], dtype=torch.bool) for c in names}
    means = {c: coords[m].mean(0) for c, m in idx.items()}
    dev = torch.cat([coords[m] - means[c] for c, m in idx.items()])
    return means, _shrunk_covariance(dev, coords.shape[0] - len(names)), coords.mean(0)


def _log_gauss(x: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """``log N(x; mean, L L^T)`` up to the shared ``-k/2 log 2 pi``."""
    z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False)
    return -0.5 * z.square().sum(0) - torch.log(torch.diagonal(chol)).sum()


def density_ratio_scores(x: Tensor, x_classes: Sequence[str], synthetic: Mapping[str, Tensor],
                         reference: Tensor, reference_classes: Sequence[str], *,
                         dims: int = DENSITY_DIMS) -> Tensor:
    """DOMIAS-style scores ``log p_G(x) - log p_R(x)`` of the records ``x [n, ...]`` (float64).

    Both densities live in the top ``k = min(dims, reference rows - classes - 1)`` principal directions of
    the reference set (other real clips, none of them scored here), centred on its mean. Each is a
    Gaussian per class: the class's mean and the pooled within-class covariance (Ledoit-Wolf shrunk) of
    the synthetic samples (``p_G``) or of the reference clips (``p_R``); a class without reference clips
    uses the reference set's overall mean. A record the generator over-represents relative to the
    population -- as it does its training records when it memorises -- scores high.
    """
    ref = reference.reshape(reference.shape[0], -1)
    k = max(1, min(dims, ref.shape[0] - len(set(reference_classes)) - 1, ref.shape[1]))
    centre, basis = principal_directions(ref, k)  # [F], [F, k]
    ref_means, ref_cov, ref_mean_all = _class_gaussian(project(ref, centre, basis), reference_classes)
    syn_names = [c for c, s in synthetic.items() for _ in range(s.shape[0])]
    syn_coords = torch.cat([project(s, centre, basis) for s in synthetic.values()])
    syn_means, syn_cov, _ = _class_gaussian(syn_coords, syn_names)
    chol_r, chol_s = torch.linalg.cholesky(ref_cov), torch.linalg.cholesky(syn_cov)
    px = project(x, centre, basis)
    out = torch.empty(px.shape[0], dtype=torch.float64)
    for c in dict.fromkeys(x_classes):
        m = torch.tensor([y == c for y in x_classes], dtype=torch.bool)
        out[m] = (_log_gauss(px[m], syn_means[c], chol_s)
                  - _log_gauss(px[m], ref_means.get(c, ref_mean_all), chol_r))
    return out


def cross_fitted_density_ratio(members: Tensor, member_classes: Sequence[str], non_members: Tensor,
                               non_member_classes: Sequence[str], synthetic: Mapping[str, Tensor], *,
                               seed: int = 0, dims: int = DENSITY_DIMS) -> tuple[Tensor, Tensor]:
    """:func:`density_ratio_scores` of every member and non-member with a reference set that never holds the
    scored record: the non-members are split (per class, seeded) into two folds, each record is put in a
    fold (members too, alternately per class), and a record of fold ``f`` is scored with the non-members of
    the other fold as the reference. So every non-member is scored, and members and non-members against
    references of the same size and kind."""
    g = torch.Generator().manual_seed(seed + 7919)

    def folds(classes: Sequence[str]) -> Tensor:
        f = torch.zeros(len(classes), dtype=torch.long)
        for c in dict.fromkeys(classes):
            rows = torch.tensor([i for i, x in enumerate(classes) if x == c], dtype=torch.long)
            rows = rows[torch.randperm(rows.numel(), generator=g)]
            f[rows] = torch.arange(rows.numel()) % 2
        return f

    fm, fn = folds(member_classes), folds(non_member_classes)
    sm = torch.empty(members.shape[0], dtype=torch.float64)
    sn = torch.empty(non_members.shape[0], dtype=torch.float64)
    for fold in (0, 1):
        ref_rows = (fn != fold).nonzero().flatten()
        ref_classes = [non_member_classes[i] for i in ref_rows.tolist()]
        for scores, data, classes, f in ((sm, members, member_classes, fm), (sn, non_members, non_member_classes, fn)):
            rows = (f == fold).nonzero().flatten()
            if rows.numel():
                scores[rows] = density_ratio_scores(data[rows], [classes[i] for i in rows.tolist()], synthetic,
                                                    non_members[ref_rows], ref_classes, dims=dims)
    return sm, sn


# -- the audit --------------------------------------------------------------------------------------

#: records scored by a white-box attack at once
SCORE_ROWS = 256


def _white_box(model: Any, x: Tensor, classes: Sequence[str], conditions: Tensor | None,
               config: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """White-box scores of the records ``x`` (normalised), each scored by the generator serving its class:
    ``({attack: scores [n]}, {attack: description}, [what could not be scored, in words])``."""
    n = x.shape[0]
    out: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    unavailable: list[str] = []
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_key.setdefault(model.class_to_generator[c], []).append(i)
    for key, rows_list in by_key.items():
        gen = model.generators[key]
        rows = torch.tensor(rows_list, dtype=torch.long)
        kind = type(gen).__name__
        if not type(gen).membership_scores_available:
            unavailable.append(f"white-box: generator type {model.generator_type!r} ({kind}) declares it cannot "
                               f"score records")
            continue
        labels = torch.tensor([model.class_names.index(classes[i]) for i in rows_list], dtype=torch.long)
        main = f"white-box: {type(gen).membership_score_name}"
        try:
            for s in range(0, rows.numel(), SCORE_ROWS):
                part = rows[s:s + SCORE_ROWS]
                dev = model.device
                cond = conditions[part].to(dev) if conditions is not None and gen.needs_condition else None
                kw = {"labels": labels[s:s + SCORE_ROWS].to(dev), "conditions": cond, "config": config}
                xb = x[part].to(dev)
                found = {main: gen.membership_scores(xb, **kw), **{f"white-box: {k}": v for k, v in
                                                                   gen.extra_membership_scores(xb, **kw).items()}}
                for name, v in found.items():
                    out.setdefault(name, torch.full((n,), float("nan"), dtype=torch.float64))[part] = \
                        v.detach().double().cpu().reshape(-1)
                    names.setdefault(name, kind)
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # e.g. a plugin loss that needs a batch
            unavailable.append(f"white-box: {kind} could not score records ({type(exc).__name__}: {exc})")
            for name in [k for k, v in names.items() if v == kind]:
                out.pop(name, None)
                names.pop(name, None)
            out.pop(main, None)
    return out, names, unavailable


def run_audit(model: Any, members: Tensor, member_classes: Sequence[str], non_members: Tensor,
              non_member_classes: Sequence[str], synthetic: Mapping[str, Tensor], *, member_source: str,
              member_conditions: Tensor | None = None, non_member_conditions: Tensor | None = None,
              seed: int = 0, bootstrap: int = BOOTSTRAP, member_nearest: Tensor | None = None) -> MembershipAudit:
    """Every attack on ``members`` vs ``non_members`` (``[n, l, D]`` in the model's normalised reduced
    space, with their class names), the black-box ones from ``synthetic`` (class -> normalised samples).
    ``model`` is the :class:`~feda2v_toolkit.model.bundle.GenerativeModel`. ``member_nearest``: each
    member's distance to its class's nearest synthetic sample, when the caller has it already (``evaluate``
    takes it with the DCR, from the same distances); else it is computed here."""
    from feda2v_toolkit.config import schema_defaults

    config = {**schema_defaults(), **{k: v for k, v in model.config.items() if v is not None}}
    notes: list[str] = []
    per_m = {c: member_classes.count(c) for c in dict.fromkeys(member_classes)}
    per_n = {c: non_member_classes.count(c) for c in dict.fromkeys(non_member_classes)}
    scores: dict[str, tuple[str, str, Tensor, Tensor]] = {}  # name -> (kind, description, members, non-members)
    wm, kinds, unavailable = _white_box(model, members, member_classes, member_conditions, config)
    wn, _, _ = _white_box(model, non_members, non_member_classes, non_member_conditions, config)
    for name, sm in wm.items():
        sn = wn.get(name)
        if sn is None or bool(sm.isnan().any() or sn.isnan().any()):
            unavailable.append(f"{name}: not every generator of the model offers it")
            continue
        desc = ("minus the share of the record (minus its class mean) outside the span of the generator's "
                "covariance components" if name.endswith("span residual") else
                f"the generator's own per-record {name.split(': ', 1)[1]} ({kinds[name]}.membership_scores)")
        scores[name] = ("white-box", desc, sm, sn)
    classes = list(dict.fromkeys([*member_classes, *non_member_classes]))
    syn = {c: synthetic[c] for c in classes if c in synthetic}
    missing = [c for c in classes if c not in syn]
    if member_nearest is not None and member_nearest.shape != (members.shape[0],):
        raise ValueError(f"member_nearest must hold one distance per member ({members.shape[0]}), got "
                         f"{tuple(member_nearest.shape)}")
    if not missing:
        def nearest(x: Tensor, xc: Sequence[str]) -> Tensor:
            out = torch.empty(x.shape[0], dtype=torch.float64)
            for c in dict.fromkeys(xc):
                m = torch.tensor([y == c for y in xc], dtype=torch.bool)
                out[m] = nearest_sample_scores(x[m], syn[c])
            return out

        scores["black-box: nearest sample"] = (
            "black-box", "minus the distance to the closest synthetic sample of the record's class",
            -member_nearest if member_nearest is not None else nearest(members, member_classes),
            nearest(non_members, non_member_classes))
        if min(per_n.values(), default=0) >= 2 or len(non_member_classes) >= 4:
            dm, dn = cross_fitted_density_ratio(members, member_classes, non_members, non_member_classes, syn,
                                                seed=seed)
            scores["black-box: density ratio"] = (
                "black-box", f"DOMIAS-style log p_synthetic(x) / p_reference(x): Gaussians in the top "
                f"{DENSITY_DIMS} principal directions of a reference set of other held-out clips (2-fold "
                f"cross-fitted)", dm, dn)
        else:
            unavailable.append("black-box: density ratio: too few non-members for a reference set")
    else:
        unavailable.append(f"black-box: no synthetic samples of {', '.join(missing)}")
    attacks = [score_summary(name, kind, desc, sm, sn, member_classes=member_classes,
                             non_member_classes=non_member_classes, bootstrap=bootstrap, seed=seed)
               for name, (kind, desc, sm, sn) in scores.items()]
    best = headline(attacks)
    n_n = len(non_member_classes)
    for f in FPRS:
        if n_n * f < 1:
            notes.append(f"~ {n_n} non-members: too few for TPR at FPR {f:.1%} to be measured (it needs >= "
                         f"{math.ceil(1 / f)}); the figure interpolates from (0, 0) to the first false positive")
            break
    dp = dp_record(model.metrics)
    if dp is not None:
        dp["auc_bound"] = dp_auc_bound(dp["epsilon"], dp["delta"])
        if best is not None and best.auc_low > dp["auc_bound"]:
            notes.append(f"the {best.name} attack's AUC ({best.auc:.3f}, 95% interval from {best.auc_low:.3f}) is "
                         f"above the bound the model's recorded (epsilon {dp['epsilon']:g}, delta {dp['delta']:g})-DP "
                         f"allows ({dp['auc_bound']:.3f}): the recorded guarantee does not hold")
    return MembershipAudit(
        members=len(member_classes), non_members=n_n, members_per_class=per_m, non_members_per_class=per_n,
        member_source=member_source, attacks=attacks, headline=best.name if best else None,
        auc=best.auc if best else None, leaking=bool(best is not None and best.auc > LEAK_AUC),
        bootstrap=bootstrap, unavailable=unavailable, dp=dp, notes=notes)
