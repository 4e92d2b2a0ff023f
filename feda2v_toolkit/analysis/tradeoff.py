"""``feda2v-tk privacy-tradeoff``: what differential privacy costs and buys on the user's own data.

For each target epsilon of a list (``inf`` = no differential privacy) and each seed, one model is trained
with the configured pipeline (:func:`feda2v_toolkit.training.pipeline.train`, ``generator_dp_epsilon`` set to
the target, ``generator_dp_delta`` to ``delta``) and evaluated (:func:`feda2v_toolkit.analysis.evaluate.evaluate`):

* **the split**: per seed, the data are split per class (stratified, seeded) into a *training part* and a
  *held-out part* (``test_fraction`` of each class, default one half). Every epsilon of one seed uses the
  same split, so the rows of one seed differ only by the privacy setting. The trainer is told to hold out
  nothing more (``generator_validation_split = 0``): the members of the audit are then exactly the clips of
  the training part, whatever the model file records about its class counts (noisy counts under DP);
* **usefulness**: the headline of ``evaluate`` by the standard protocol -- the ridge classifier trained on
  the training part vs on as many synthetic clips per class, both tested on the held-out part, on AST-head
  features; the ratio synthetic / real, its mean over ``usefulness_draws`` synthetic draws;
* **membership**: the audit's headline (the strongest attack, white-box or black-box): its AUC with the
  bootstrap 95% interval and its TPR at FPR 1% (Carlini et al. 2022), members the training part, non-members
  the held-out part;
* **the guarantee**: the spent (epsilon, delta) the model records (``model.metrics["privacy"]``,
  :func:`feda2v_toolkit.analysis.membership.dp_record`) and the largest AUC any attack can reach against it
  (:func:`~feda2v_toolkit.analysis.membership.dp_auc_bound` of the target);
* the seconds each training took.

A target the trainer refuses (:class:`~feda2v_toolkit.privacy.spec.PrivacyError`, e.g. "too few clips per
class for epsilon E") is a row with the reason, not a failure of the whole trade-off. Nothing is written
to disk by :func:`privacy_tradeoff`; the command writes the JSON report and the plot if asked.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from feda2v_toolkit.errors import InputError, UsageError

#: the headline TPR is read at this false-positive rate
TPR_FPR = 0.01
#: the default list of targets (``inf``: no differential privacy)
DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
#: share of each class held out by default (train on half, as the issue's targets do)
TEST_FRACTION = 0.5
#: the note of ``evaluate`` that does not apply here: the trainer holds out nothing (validation split 0), so
#: every clip of the training part is a member when the split cannot be recomputed from noisy counts
_NOT_APPLICABLE = "the trainer's train split could not be recomputed"


@dataclass
class TradeoffRun:
    """One trained and evaluated model: one target epsilon (``None`` = no DP) and one seed."""

    epsilon: float | None  # the target; None: trained without differential privacy
    delta: float | None  # the target delta (None without DP)
    seed: int
    spent_epsilon: float | None = None  # what the model records having spent (None: it records no DP)
    spent_delta: float | None = None
    usefulness: float | None = None  # train-on-synthetic / train-on-real, mean over the synthetic draws
    usefulness_min: float | None = None
    usefulness_max: float | None = None
    usefulness_pooled: float | None = None  # the second view (pooled full-length features)
    real_accuracy: float | None = None  # the classifier trained on the training part
    attack: str | None = None  # the audit's headline attack
    auc: float | None = None
    auc_low: float | None = None
    auc_high: float | None = None
    tpr_at_1pct: float | None = None  # the headline attack's TPR at FPR 1%
    tpr_reliable: bool | None = None  # False: fewer than 100 non-members, the TPR is interpolated
    leaking: bool | None = None  # headline AUC above the audit's flag (0.6)
    auc_bound: float | None = None  # the largest AUC the target (epsilon, delta) allows; None without DP
    train_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    refused: str | None = None  # the trainer's reason when it refused the target
    notes: list[str] = field(default_factory=list)


@dataclass
class TradeoffPoint:
    """One target epsilon over its seeds (refused runs left out): means and ranges."""

    epsilon: float | None
    runs: int
    refused: int
    spent_epsilon: float | None  # the largest spend recorded over the seeds
    usefulness: float | None
    usefulness_low: float | None  # the lowest and highest figure over seeds and synthetic draws
    usefulness_high: float | None
    auc: float | None
    auc_low: float | None  # one seed: the bootstrap 95% interval; several: the range of the seeds' intervals
    auc_high: float | None
    tpr_at_1pct: float | None
    auc_bound: float | None
    train_seconds: float | None


@dataclass
class TradeoffResult:
    """The trade-off of one config on one dataset (module docstring)."""

    data: str
    config: str
    generator_type: str
    delta: float
    epsilons: list[float | None]  # in order; None = no DP (``inf`` on the command line)
    seeds: list[int]
    test_fraction: float
    train_clips: dict[str, int]  # per class, of the first seed's split (every seed holds out the same counts)
    heldout_clips: dict[str, int]
    usefulness_draws: int
    classifier: str
    runs: list[TradeoffRun]
    points: list[TradeoffPoint]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- input ---------------------------------------------------------------------------------------------

def parse_epsilons(value: str | Iterable[float | str | None], option: str = "--epsilons") -> list[float]:
    """Target epsilons from ``"0.5,1,2,4,8,inf"`` (or a list): each a number > 0 or ``inf`` (no DP; also
    ``None``), sorted with ``inf`` last, duplicates dropped. A one-line :class:`UsageError` otherwise."""
    items: list[Any] = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    out: list[float] = []
    for item in items:
        if item is None:
            eps = math.inf
        elif isinstance(item, str):
            if not item:
                continue
            try:
                eps = float(item)
            except ValueError:
                raise UsageError(f"{option}: expected comma-separated numbers > 0 or 'inf' (no DP), got "
                                 f"{item!r}") from None
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            eps = float(item)
        else:
            raise UsageError(f"{option}: expected numbers > 0 or 'inf' (no DP), got {item!r}")
        if math.isnan(eps) or eps <= 0:
            raise UsageError(f"{option}: every epsilon must be > 0 (or 'inf' for no DP), got {item}")
        out.append(eps)
    if not out:
        raise UsageError(f"{option}: give at least one epsilon, e.g. 0.5,1,2,4,8,inf")
    return sorted(set(out))


def check_delta(delta: float, option: str = "--delta") -> float:
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise UsageError(f"{option} must be a number between 0 and 1, got {delta!r}") from None
    if not 0 < d < 1:
        raise UsageError(f"{option} must be between 0 and 1 (exclusive), got {delta}")
    return d


# -- the measurement -----------------------------------------------------------------------------------

def privacy_tradeoff(config: Any, data: str | os.PathLike[str] | Any, epsilons: str | Sequence[float | None] =
                     DEFAULT_EPSILONS, *, delta: float | None = None, seeds: int = 1, seed: int = 0,
                     test_fraction: float = TEST_FRACTION, usefulness_draws: int = 5, bootstrap: int | None = None,
                     device: str = "cpu", overrides: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] | None = None) -> TradeoffResult:
    """Train at each target epsilon (and seed) and measure usefulness and membership leakage side by side.

    Args:
        config: a config path, a full experiment config or a generator section (as :func:`train` takes);
            ``None``: the schema defaults.
        data: the user's dataset (path or open :class:`~feda2v_toolkit.data.dataset.Dataset`); it is split
            into a training and a held-out part per seed (module docstring).
        epsilons: target epsilons (numbers > 0; ``inf`` or ``None`` = no DP), or ``"0.5,1,2,inf"``.
        delta: the target delta of every DP run (default: the config's ``generator_dp_delta``, 1e-5).
        seeds: models per epsilon (seeds ``seed .. seed + seeds - 1``: training, split, synthetic draws).
        test_fraction: share of each class held out (non-members of the audit, test clips of usefulness).
        usefulness_draws: synthetic draws the usefulness ratio is averaged over.
        bootstrap: resamples of the audit's intervals (default: ``evaluate``'s).
        device: where training runs (``cpu``, ``cuda``, ``auto``).
        overrides: generator keys set on top of ``config`` (before the privacy keys).
        log: called with one line per phase (``epsilon E, seed S: ...``).
    """
    from feda2v_toolkit.analysis.evaluate import CLASSIFIER, evaluate
    from feda2v_toolkit.analysis.membership import BOOTSTRAP
    from feda2v_toolkit.config import load_config
    from feda2v_toolkit.data.dataset import Dataset
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.data.split import stratified_split
    from feda2v_toolkit.privacy.spec import PrivacyError
    from feda2v_toolkit.runtime.seeds import derive_seed
    from feda2v_toolkit.training.pipeline import train

    t_start = time.perf_counter()
    say = log or (lambda _m: None)
    targets = parse_epsilons(epsilons if isinstance(epsilons, str) else list(epsilons), option="epsilons")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    if usefulness_draws < 1 or (bootstrap is not None and bootstrap < 1):
        raise UsageError("usefulness draws and bootstrap resamples must be >= 1")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    base = dict(overrides or {})
    cfg = load_config(config if config is not None else {}, base)  # invalid configs fail before any work
    target_delta = check_delta(cfg["generator_dp_delta"] if delta is None else delta)
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    seed_list = [seed + i for i in range(seeds)]

    splits = {}
    counts = ds.class_counts()
    for s in seed_list:
        train_idx, test_idx = stratified_split(ds.labels, test_fraction, derive_seed(s, "privacy-tradeoff-split"))
        held = {ds.class_names[c]: int((ds.labels[test_idx] == c).sum()) for c in range(ds.num_classes)}
        few = [c for c, n in held.items() if counts[c] > 0 and n < 2]
        if few:
            raise UsageError(f"{ds.path}: class(es) {', '.join(few)} would have fewer than 2 held-out clips at "
                             f"--test-fraction {test_fraction:g}; give more clips per class or a larger fraction")
        splits[s] = (ds.subset(train_idx), ds.subset(test_idx))
    first_train, first_test = splits[seed_list[0]]
    train_clips = {c: n for c, n in first_train.class_counts().items() if n}
    heldout_clips = {c: n for c, n in first_test.class_counts().items() if n}

    runs: list[TradeoffRun] = []
    notes: list[str] = []
    for eps in targets:
        private = math.isfinite(eps)
        name = f"epsilon {eps:g}" if private else "no DP"
        for s in seed_list:
            train_part, test_part = splits[s]
            run = TradeoffRun(epsilon=eps if private else None, delta=target_delta if private else None, seed=s)
            keys = {**base, "generator_dp_epsilon": eps if private else None, "generator_dp_delta": target_delta,
                    "generator_validation_split": 0, "generator_save_checkpoint": False}
            say(f"{name}, seed {s}: training on {len(train_part)} clips")
            t0 = time.perf_counter()
            try:
                model = train(config if config is not None else {}, train_part, overrides=keys, seed=s,
                              device=device, progress=False)
            except PrivacyError as exc:
                run.refused = str(exc)
                run.train_seconds = time.perf_counter() - t0
                say(f"{name}, seed {s}: refused: {exc}")
                runs.append(run)
                continue
            run.train_seconds = time.perf_counter() - t0
            say(f"{name}, seed {s}: trained in {run.train_seconds:.1f}s; evaluating on {len(test_part)} held-out "
                f"clips")
            t0 = time.perf_counter()
            try:
                result = evaluate(model, test_part, train_data=train_part, seed=s, usefulness_seeds=usefulness_draws,
                                  bootstrap=bootstrap if bootstrap is not None else BOOTSTRAP)
            except (ValueError, InputError) as exc:  # e.g. a degenerate model's samples: a row with the reason
                run.refused = f"evaluation failed: {exc}"
                run.evaluate_seconds = time.perf_counter() - t0
                _fill_spend(run, model, private, eps, target_delta)
                say(f"{name}, seed {s}: {run.refused}")
                runs.append(run)
                continue
            run.evaluate_seconds = time.perf_counter() - t0
            _fill(run, model, result, private, eps, target_delta)
            runs.append(run)
            say(f"{name}, seed {s}: {_line(run)}")
    points = [_point(eps, [r for r in runs if r.epsilon == (eps if math.isfinite(eps) else None)])
              for eps in targets]
    unrecorded = sorted({r.epsilon for r in runs if r.epsilon is not None and r.refused is None
                         and r.spent_epsilon is None})
    if unrecorded:
        notes.append(f"NO GUARANTEE RECORDED: the models trained at epsilon {', '.join(f'{e:g}' for e in unrecorded)} "
                     f"record no differential-privacy spend (model.metrics['privacy']): this installation's trainer "
                     f"did not apply record-level DP, so those rows measure models without it")
    over = sorted({r.epsilon for r in runs if r.epsilon is not None and r.spent_epsilon is not None
                   and r.spent_epsilon > r.epsilon * (1 + 1e-6)})
    if over:
        notes.append(f"OVERSPENT: the spent epsilon is above the target at epsilon {', '.join(f'{e:g}' for e in over)}")
    broken = sorted({r.epsilon for r in runs if r.auc_bound is not None and r.auc_low is not None
                     and r.spent_epsilon is not None and r.auc_low > r.auc_bound})
    if broken:
        notes.append(f"BOUND EXCEEDED: at epsilon {', '.join(f'{e:g}' for e in broken)} the headline attack's AUC "
                     f"interval lies above what (epsilon, delta)-DP allows: the guarantee does not hold")
    model_type = str(cfg.get("generator_type"))
    return TradeoffResult(
        data=str(ds.path), config=str(config) if isinstance(config, (str, os.PathLike)) else "(mapping)"
        if config is not None else "(schema defaults)", generator_type=model_type, delta=target_delta,
        epsilons=[e if math.isfinite(e) else None for e in targets], seeds=seed_list, test_fraction=test_fraction,
        train_clips=train_clips, heldout_clips=heldout_clips, usefulness_draws=usefulness_draws,
        classifier=CLASSIFIER, runs=runs, points=points, seconds=time.perf_counter() - t_start, notes=notes)


def _fill_spend(run: TradeoffRun, model: Any, private: bool, eps: float, delta: float) -> None:
    from feda2v_toolkit.analysis.membership import dp_auc_bound, dp_record

    spent = dp_record(model.metrics)
    if spent is not None:
        run.spent_epsilon, run.spent_delta = spent["epsilon"], spent["delta"]
    if private:
        run.auc_bound = dp_auc_bound(eps, delta)


def _fill(run: TradeoffRun, model: Any, result: Any, private: bool, eps: float, delta: float) -> None:
    """Copy the figures of one evaluation into ``run``."""
    _fill_spend(run, model, private, eps, delta)
    u = result.usefulness
    if u is not None:
        run.usefulness = _finite(u.summary.ratio_mean)
        run.usefulness_min, run.usefulness_max = _finite(u.summary.ratio_min), _finite(u.summary.ratio_max)
        run.usefulness_pooled = _finite(u.pooled.ratio_mean) if u.pooled is not None else None
        run.real_accuracy = _finite(u.summary.real_accuracy)
    audit = result.membership
    if audit is not None and audit.headline is not None:
        best = audit.attack(audit.headline)
        run.attack, run.auc, run.auc_low, run.auc_high = best.name, best.auc, best.auc_low, best.auc_high
        rate = next((t for t in best.tpr_at if math.isclose(t.fpr, TPR_FPR)), None)
        if rate is not None:
            run.tpr_at_1pct, run.tpr_reliable = rate.tpr, rate.reliable
        run.leaking = audit.leaking
    run.notes = [n for n in result.notes if not n.startswith(_NOT_APPLICABLE)]


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _point(eps: float, runs: list[TradeoffRun]) -> TradeoffPoint:
    done = [r for r in runs if r.refused is None]
    lows = [r.usefulness_min for r in done if r.usefulness_min is not None]
    highs = [r.usefulness_max for r in done if r.usefulness_max is not None]
    auc_lows = [r.auc_low for r in done if r.auc_low is not None]
    auc_highs = [r.auc_high for r in done if r.auc_high is not None]
    spent = [r.spent_epsilon for r in done if r.spent_epsilon is not None]
    return TradeoffPoint(
        epsilon=eps if math.isfinite(eps) else None, runs=len(done), refused=len(runs) - len(done),
        spent_epsilon=max(spent) if spent else None, usefulness=_mean([r.usefulness for r in done]),
        usefulness_low=min(lows) if lows else None, usefulness_high=max(highs) if highs else None,
        auc=_mean([r.auc for r in done]), auc_low=min(auc_lows) if auc_lows else None,
        auc_high=max(auc_highs) if auc_highs else None, tpr_at_1pct=_mean([r.tpr_at_1pct for r in done]),
        auc_bound=next((r.auc_bound for r in runs if r.auc_bound is not None), None),
        train_seconds=_mean([r.train_seconds for r in done]))


def _line(run: TradeoffRun) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    spent = f"spent epsilon {run.spent_epsilon:.3g}" if run.spent_epsilon is not None else (
        "no DP" if run.epsilon is None else "NO DP SPEND RECORDED")
    return (f"usefulness {f(run.usefulness)}, membership AUC {f(run.auc)} ({run.attack or 'no attack'}), "
            f"TPR at FPR 1% {f(run.tpr_at_1pct)}; {spent}")


def epsilon_label(eps: float | None) -> str:
    """``"1"``, ``"0.5"``; ``"no DP"`` for ``None`` / ``inf``."""
    return "no DP" if eps is None or not math.isfinite(eps) else f"{eps:g}"
