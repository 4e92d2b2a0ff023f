"""``feda2v-tk evaluate``: synthetic samples of a trained model measured against held-out real data.

Which real data (``split``):

* ``all`` (default): every sequence of REAL is held-out real data (pass data the model never saw);
* ``heldout``: REAL is the model's training data; only the sequences its trainer held out are used (the
  same stratified split, recomputed from the model's seed and ``generator_validation_split``).

Per class present in both the model and the real data, ``n_c`` synthetic samples are drawn (default: as
many as the class has real sequences; ``samples_per_class`` overrides) with
:func:`feda2v_toolkit.model.generate.sample_class_reduced` -- the same stream ``feda2v-tk generate --seed
SEED`` writes. Nothing is written to disk.

Distribution metrics compare synthetic and real sequences in the model's **reduced space** (real data
reduced by the model's reducer; synthetic samples de-normalised at the training length, before
upsampling), flattened to ``l * D`` numbers, per class and over all classes pooled
(:mod:`.metrics`): Frechet distance (and the same distance between two random halves of the real data,
the sampling-noise reference), mean and covariance gaps, diversity, precision/recall, density/coverage.
The Frechet distance is also computed on the pooled full-length features of the downstream classifier
(``frechet_pooled``): that space is the same for every model, so it compares models with different
reducers or training lengths.

Collapse: samples whose recall is below :data:`COLLAPSE_RECALL` or whose diversity is below
:data:`COLLAPSE_DIVERSITY` of the real one's (over all classes or per class) are flagged (``collapsed``).

With the training data (``split="heldout"``, or ``train_data``), the *members* are the rows the generators
fitted on (:func:`feda2v_toolkit.model.split.model_split`: the trainer's train split, not its validation
rows) and the held-out real sequences are the non-members:

* ``membership``: the membership-inference audit of :mod:`.membership` -- white-box attacks through
  :meth:`Generator.membership_scores`, black-box ones from the synthetic samples; AUC and TPR at FPR 1% and
  0.1% with bootstrap intervals; the strongest attack as the headline; ``leaking`` above AUC 0.6;
* ``privacy``: copy detection, the **distance to the closest record** (DCR) in the model's normalised
  reduced space: per class, the median distance from each synthetic sample to its nearest training
  sequence, divided by the same median for the held-out real sequences (about 1 when synthetic samples
  are as far from the training clips as new real clips are; well below 1 when the generator copies or
  interpolates training rows, or collapses onto their mean); ``close_share`` is the share of synthetic
  samples nearer to a training sequence than 95% of the held-out ones. A ratio below
  :data:`MEMORISATION_RATIO` is flagged (``memorising``). DCR detects copies; it does not measure privacy.

Usefulness (``usefulness``), the headline of the downstream section: train-on-synthetic / train-on-real
accuracy of the ridge classifier on held-out real clips, over ``usefulness_seeds`` synthetic draws. The
standard protocol (training data known): trained on the model's training clips vs on as many synthetic
clips per class, both tested on the held-out real clips; the fallback (no training data): the real data
split into a train part and a test part. Features: the mean of the two summary tokens of the full-length
sequence (AST's classification head); a second view on pooled features; next to each, the classifier
trained on the training clips after the model's reducer and upsampler (what the reduction keeps).

Downstream detail (``downstream``), the split protocol on pooled features (synthetic samples upsampled by
the model's upsampler to the real length): the real data are split per class into a train part and a test
part (``test_fraction``, default 0.5, stratified by ``seed``), and the classifier is trained on (a) the
real train part -- ``real_only`` --, (b) all synthetic samples -- ``tstr`` --, (c) both -- ``augmented``
--, each tested on the real test part.

Memory: real and training sequences are read once, streaming; only a seeded uniform subset of at most
:func:`row_caps` rows per class is kept (the output says when it subsamples), so memory does not grow with
the data.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.analysis.classifier import (
    DEFAULT_POOL_POSITIONS,
    RidgeClassifier,
    pooled_features,
    summary_features,
)
from feda2v_toolkit.analysis.membership import BOOTSTRAP, MembershipAudit, run_audit
from feda2v_toolkit.analysis.metrics import nearest_both_ways, nearest_distances, pair_figures
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.errors import InputError, UsageError, short_list
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.generate import DEFAULT_BATCH, is_class_agnostic, sample_class_reduced
from feda2v_toolkit.model.split import model_split
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.training.streams import read_chunk_rows

MAX_SAMPLES_PER_CLASS = 10_000
SPLITS = ("all", "heldout")
#: a DCR ratio below this flags the samples as (near-)copies of training data
MEMORISATION_RATIO = 0.8
#: real rows kept per class for the reduced-space metrics, the DCR and the audit (members and non-members
#: alike): at most MAX_ROWS_PER_CLASS, at most MAX_ROWS over all classes, but never fewer than
#: MIN_ROWS_PER_CLASS; beyond, a seeded uniform subset (the output says so)
MAX_ROWS_PER_CLASS = 2000
MAX_ROWS = 4096
MIN_ROWS_PER_CLASS = 32
#: the same for the pooled full-length features (64 x 768 numbers a row: 16 times the reduced ones at l = 16)
MAX_POOLED_ROWS = 512
MIN_POOLED_ROWS_PER_CLASS = 16
#: synthetic samples upsampled to full length at once (a [16, 1214, 768] float32 batch is 60 MB)
UPSAMPLE_ROWS = 16
#: synthetic draws (seeds SEED .. SEED + n - 1) the usefulness ratio is measured over
USEFULNESS_SEEDS = 5
#: collapse: recall below this, or synthetic / real diversity below COLLAPSE_DIVERSITY
COLLAPSE_RECALL = 0.05
COLLAPSE_DIVERSITY = 0.5
CLASSIFIER = ("ridge regression on one-hot targets, penalty chosen by exact leave-one-out "
              "(feda2v_toolkit.analysis.classifier.RidgeClassifier)")


@dataclass
class DistributionMetrics:
    """Synthetic vs real in the reduced space (see ``docs/evaluation.md`` for how to read each)."""

    real: int
    synthetic: int
    frechet: float
    frechet_real_halves: float | None
    frechet_pooled: float | None  # on pooled full-length features: comparable across reducers and lengths
    frechet_pooled_real_halves: float | None
    mean_gap: float
    covariance_gap: float
    diversity_synthetic: float
    diversity_real: float
    diversity_ratio: float
    precision: float
    recall: float
    density: float
    coverage: float
    k: int


@dataclass
class DownstreamResult:
    """Classifier accuracy on the real test part, per training set; ``per_class``: recall per class."""

    real_only: float
    tstr: float
    augmented: float
    per_class: dict[str, dict[str, float]]
    real_train: int
    real_test: int
    synthetic: int


@dataclass
class UsefulnessView:
    """Accuracy on held-out real clips of the classifier trained on real clips and on synthetic ones
    (one figure per synthetic draw), on one feature view."""

    features: str
    real_accuracy: float
    synthetic_accuracy: list[float]
    ratio: list[float]  # synthetic / real, per draw
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    real_train: int
    synthetic_train: int  # per draw
    test: int
    #: trained on the same real training clips after the model's own reducer and upsampler (reduced, then
    #: upsampled to full length): what the reduction alone keeps on this view (synthetic samples pass through
    #: the same upsampler, so this is the reference a generator is held back by)
    reconstructed_accuracy: float = float("nan")


@dataclass
class UsefulnessResult:
    """Train-on-synthetic over train-on-real accuracy (module docstring, "Usefulness").

    ``protocol``: ``standard`` -- trained on the model's own training clips vs on as many synthetic clips
    per class, tested on the held-out real clips -- or ``fallback`` (no training data: the real data are
    split into a train and a test part)."""

    protocol: str
    classifier: str
    seeds: list[int]
    summary: UsefulnessView  # AST-head features: the headline
    pooled: UsefulnessView | None  # pooled full-length features: the second view


@dataclass
class PrivacyMetrics:
    """Distance to closest record (module docstring): synthetic vs held-out real, to the training data."""

    training: int
    synthetic_dcr: float  # median distance of a synthetic sample to its nearest training sequence
    real_dcr: float  # the same for held-out real sequences
    ratio: float  # synthetic_dcr / real_dcr
    close_share: float  # share of synthetic samples nearer than the held-out 5th percentile
    memorising: bool


@dataclass
class EvaluationResult:
    model: str
    data: str
    split: str
    seed: int
    training_length: int
    full_length: int
    dim: int
    classes: list[str]
    per_class: dict[str, DistributionMetrics]
    overall: DistributionMetrics
    downstream: DownstreamResult
    pool_positions: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    privacy: dict[str, PrivacyMetrics] = field(default_factory=dict)  # DCR (copy detection) per class and "(all)"
    train_data: str | None = None
    usefulness: UsefulnessResult | None = None
    membership: MembershipAudit | None = None  # None when the training data is unknown
    collapsed: bool = False
    subsampled: bool = False
    rows_per_class: int = 0  # the cap of rows kept per class (reduced space)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def distribution_metrics(synthetic: Tensor, real: Tensor, *, k: int = 5, seed: int = 0,
                         pooled: tuple[Tensor, Tensor] | None = None) -> DistributionMetrics:
    """All distribution metrics of ``synthetic`` vs ``real`` (``[n, ...]`` each, flattened); ``pooled``:
    the same samples as pooled full-length features ``(synthetic, real)`` for the reducer-independent
    Frechet distance. Every figure comes from the sets' centred Gram matrices, one held at a time
    (:func:`~feda2v_toolkit.analysis.metrics.pair_figures`), so memory is about two ``n x n`` float64
    matrices, not float64 copies of the samples."""
    fd_pooled = fd_pooled_halves = None
    if pooled is not None:
        p = pair_figures(*pooled, halves_seed=seed)
        fd_pooled, fd_pooled_halves = p.frechet, p.r.halves
        del p
    g = pair_figures(synthetic, real, k=k, halves_seed=seed)
    manifold = g.manifold
    assert manifold is not None
    div_s, div_r = g.s.diversity, g.r.diversity
    return DistributionMetrics(
        real=g.r.n, synthetic=g.s.n, frechet=g.frechet, frechet_real_halves=g.r.halves,
        frechet_pooled=fd_pooled, frechet_pooled_real_halves=fd_pooled_halves,
        mean_gap=g.mean_gap, covariance_gap=g.covariance_gap, diversity_synthetic=div_s,
        diversity_real=div_r, diversity_ratio=div_s / div_r if div_r > 0 else float("nan"),
        precision=manifold.precision, recall=manifold.recall, density=manifold.density,
        coverage=manifold.coverage, k=manifold.k)


def privacy_metrics(synthetic_d: Tensor, real_d: Tensor, training: int) -> PrivacyMetrics:
    """DCR summary from nearest-training distances of synthetic and of held-out real samples."""
    syn, real = float(synthetic_d.median()), float(real_d.median())
    ratio = syn / real if real > 0 else float("nan")
    low = float(torch.quantile(real_d, 0.05)) if real_d.numel() > 1 else float(real_d.min())
    close = float((synthetic_d < low).double().mean())
    return PrivacyMetrics(training=training, synthetic_dcr=syn, real_dcr=real, ratio=ratio, close_share=close,
                          memorising=bool(ratio < MEMORISATION_RATIO))


def _privacy(model: GenerativeModel, members: _Rows, real: _Rows,
             synth_reduced: dict[str, Tensor]) -> tuple[dict[str, PrivacyMetrics], Tensor]:
    """Per-class and pooled DCR (copy detection) in the model's normalised reduced space, and each member's
    distance to its class's nearest synthetic sample (the audit's nearest-sample attack; NaN for a member of
    a class without samples): both from one pass over the member-to-synthetic distances."""
    out: dict[str, PrivacyMetrics] = {}
    member_near = torch.full((members.index.numel(),), float("nan"), dtype=torch.float64)
    syn_all, real_all, n_all = [], [], 0
    for c in synth_reduced:
        rows = members.of(c)
        if not bool(rows.any()):
            continue
        ref = model.normalize(members.reduced[rows])
        member_near[rows], syn_d = nearest_both_ways(ref, model.normalize(synth_reduced[c]))
        real_d = nearest_distances(model.normalize(real.reduced[real.of(c)]), ref)
        out[c] = privacy_metrics(syn_d, real_d, int(rows.sum()))
        syn_all.append(syn_d)
        real_all.append(real_d)
        n_all += int(rows.sum())
    if out:
        out["(all)"] = privacy_metrics(torch.cat(syn_all), torch.cat(real_all), n_all)
    return out, member_near


def _real_indices(model: GenerativeModel, ds: Dataset, split: str) -> Tensor:
    if split == "all":
        return torch.arange(len(ds))
    if split != "heldout":
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        _, val_idx = model_split(model, ds)
    except UsageError as exc:
        raise UsageError(f"--split heldout needs the dataset the model was trained on: {exc}") from None
    if val_idx.numel() == 0:
        raise UsageError("--split heldout: the model was trained without a held-out split "
                         "(generator_validation_split = 0); evaluate against other real data")
    return val_idx


def budget_rows(budget: int) -> int:
    """Real rows (all classes together) whose reduced-space Gram matrices -- synthetic, real and cross, ``n x n``
    float64 each, the largest thing ``evaluate`` holds -- fit a quarter of ``budget`` bytes."""
    return math.isqrt(max(0, int(budget)) // 4 // 24)


def row_caps(num_classes: int, max_per_class: int | None = None, *, budget: int | None = None) -> tuple[int, int]:
    """Rows kept per class: ``(reduced space, pooled features)`` -- bounded per class and in total, so the
    memory of ``evaluate`` does not grow with the data (see :data:`MAX_ROWS`); with a memory ``budget`` the total
    is also at most :func:`budget_rows` (never below :data:`MIN_ROWS_PER_CLASS` a class). ``max_per_class``
    overrides both."""
    c = max(1, num_classes)
    total = MAX_ROWS if budget is None else min(MAX_ROWS, budget_rows(budget))
    cap = max_per_class or min(MAX_ROWS_PER_CLASS, max(MIN_ROWS_PER_CLASS, total // c))
    return cap, min(cap, max(MIN_POOLED_ROWS_PER_CLASS, MAX_POOLED_ROWS // c))


def reservoir(indices: Tensor, labels: Tensor, cap: int, seed: int) -> tuple[Tensor, bool]:
    """A seeded uniform subset of at most ``cap`` of ``indices`` per label, in random order per label (so a
    prefix is again a uniform subset), labels in order; and whether anything was left out. Labels are
    known without reading the sequences, so this is the reservoir of a streaming pass, drawn up front."""
    g = torch.Generator().manual_seed(seed + 104_729)
    parts, cut = [], False
    for c in torch.unique(labels).tolist():
        rows = indices[labels == c]
        rows = rows[torch.randperm(rows.numel(), generator=g)]
        cut |= rows.numel() > cap
        parts.append(rows[:cap])
    return (torch.cat(parts) if parts else indices[:0]), cut


@dataclass
class _Rows:
    """Real rows read once, streaming: reduced (raw, float32), AST-head features and, for the first
    ``pooled`` rows of each class, pooled features."""

    index: Tensor  # dataset rows, sorted
    classes: list[str]  # class name per row
    reduced: Tensor  # [n, l, D]
    summary: Tensor  # [n, D]
    pooled_mask: Tensor  # [n] bool
    pooled: Tensor  # [pooled_mask.sum(), P * D]

    def of(self, c: str) -> Tensor:
        return torch.tensor([x == c for x in self.classes], dtype=torch.bool)


def _read_rows(model: GenerativeModel, ds: Dataset, chosen: Tensor, pooled_cap: dict[str, int],
               pool_positions: int) -> _Rows:
    """Read ``chosen`` rows (per class in random order, see :func:`reservoir`) in one streaming pass."""
    taken: dict[str, int] = {}
    in_pool = torch.zeros(len(ds), dtype=torch.bool)
    for r in chosen.tolist():
        c = ds.class_names[int(ds.labels[r])]
        if taken.get(c, 0) < pooled_cap.get(c, 0):
            in_pool[r] = True
        taken[c] = taken.get(c, 0) + 1
    index = chosen.sort().values
    n = index.numel()
    reduced = torch.empty(n, model.training_length, model.dim)
    summary = torch.empty(n, ds.dim)
    pooled_mask = in_pool[index]
    pooled = torch.empty(int(pooled_mask.sum()), min(pool_positions, ds.seq_len) * ds.dim)
    pos = ppos = 0
    with torch.no_grad():
        for batch in ds.batches(read_chunk_rows(ds), index):
            b = batch.embeddings.shape[0]
            reduced[pos:pos + b] = model.reducer(batch.embeddings)
            summary[pos:pos + b] = summary_features(batch.embeddings)
            sel = pooled_mask[pos:pos + b]
            k = int(sel.sum())
            if k:
                pooled[ppos:ppos + k] = pooled_features(batch.embeddings[sel], pool_positions)
            pos, ppos = pos + b, ppos + k
    classes = [ds.class_names[int(v)] for v in ds.labels[index].tolist()]
    return _Rows(index, classes, reduced, summary, pooled_mask, pooled)


def _synthetic(model: GenerativeModel, c: str, n: int, *, seed: int, seq_len: int, pool_positions: int,
               pooled: int, conditions: Tensor | None, reduced: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """``n`` synthetic samples of class ``c`` (the stream ``generate --seed`` writes): reduced (de-normalised,
    or None), AST-head features of the upsampled samples, and pooled features of the first ``pooled``."""
    red, summ, pool = [], [], []
    done = 0
    for r, _ in sample_class_reduced(model, c, n, seed=seed, batch_size=DEFAULT_BATCH, conditions=conditions):
        if reduced:
            red.append(r.float())
        for s in range(0, r.shape[0], UPSAMPLE_ROWS):  # full-length sequences: a few at a time
            full = model.upsample(r[s:s + UPSAMPLE_ROWS], seq_len)
            summ.append(summary_features(full))
            k = max(0, min(full.shape[0], pooled - done))
            if k:
                pool.append(pooled_features(full[:k], pool_positions))
            done += full.shape[0]
    width = min(pool_positions, seq_len) * model.dim
    return (torch.cat(red) if reduced else None, torch.cat(summ),
            torch.cat(pool) if pool else torch.empty(0, width))


def evaluate(model: GenerativeModel | str | os.PathLike[str], data: str | os.PathLike[str] | Dataset, *,
             split: str = "all", train_data: str | os.PathLike[str] | Dataset | None = None,
             test_fraction: float = 0.5, samples_per_class: int | None = None, seed: int = 0,
             neighbours: int = 5, pool_positions: int = DEFAULT_POOL_POSITIONS,
             usefulness_seeds: int = USEFULNESS_SEEDS, max_per_class: int | None = None,
             bootstrap: int = BOOTSTRAP, memory_budget: int | None = None,
             log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Measure ``model``'s synthetic samples against real data (module docstring).

    Args:
        model: a :class:`GenerativeModel` or a model file path.
        data: real data with the model's sequence shape and (some of) its classes.
        split: ``all`` or ``heldout`` (see the module docstring).
        train_data: the model's training data, for the membership audit, the DCR and the standard
            usefulness protocol when ``split="all"`` (with ``heldout`` the training rows are the rest of ``data``).
        test_fraction: share of each class's real sequences the fallback (and detail) classifiers are tested on.
        samples_per_class: synthetic samples per class (default: the class's real count).
        seed: seeds the synthetic draws, the real train/test split, the subsets and the bootstrap.
        neighbours: ``k`` of precision/recall/density/coverage.
        pool_positions: ``P`` of the classifier's pooled features.
        usefulness_seeds: synthetic draws the usefulness ratio is measured over.
        max_per_class: real rows kept per class (default: :func:`row_caps`).
        bootstrap: resamples of the audit's 95% intervals.
        memory_budget: bytes (default: :func:`~feda2v_toolkit.runtime.resources.memory_budget`): without
            ``max_per_class``, the real rows kept are at most those whose Gram matrices fit a quarter of it
            (:func:`budget_rows`; the default 2 GiB allows the 4,096 of :data:`MAX_ROWS`).
    """
    from feda2v_toolkit.runtime.threads import settle_vector_math

    settle_vector_math()  # the same bytes on every run (runtime.threads)
    t_start = time.perf_counter()
    say = log or (lambda _m: None)
    model_path = "(in memory)"
    if not isinstance(model, GenerativeModel):
        from feda2v_toolkit.model.file import load_model

        model_path = str(model)
        model = load_model(model)
    if not model.sampleable_classes:  # a model file like this is refused when it is read
        raise UsageError("the model has no generator for any of its classes: it cannot be evaluated")
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    if (ds.seq_len, ds.dim) != (model.full_length, model.dim):
        raise InputError(f"{ds.path}: sequences are [{ds.seq_len}, {ds.dim}], the model's are "
                         f"[{model.full_length}, {model.dim}]")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if samples_per_class is not None and not 1 <= samples_per_class <= MAX_SAMPLES_PER_CLASS:
        raise UsageError(f"--samples-per-class must be in 1..{MAX_SAMPLES_PER_CLASS}, got {samples_per_class}")
    if usefulness_seeds < 1 or bootstrap < 1 or (max_per_class is not None and max_per_class < 2):
        raise UsageError("usefulness seeds and bootstrap resamples must be >= 1, rows per class >= 2")
    train_ds: Dataset | None = None
    if split != "heldout" and train_data is not None:
        train_ds = train_data if isinstance(train_data, Dataset) else open_dataset(train_data)
        if (train_ds.seq_len, train_ds.dim) != (model.full_length, model.dim):
            raise InputError(f"{train_ds.path}: sequences are [{train_ds.seq_len}, {train_ds.dim}], the "
                             f"model's are [{model.full_length}, {model.dim}]")
    notes: list[str] = []
    idx = _real_indices(model, ds, split)
    labels_all = ds.labels[idx]
    present = [ds.class_names[c] for c in torch.unique(labels_all).tolist()]
    classes = [c for c in model.class_names if c in present and c in model.class_to_generator]
    missing = [c for c in present if c not in classes]
    if missing:
        notes.append(f"real classes the model cannot sample were left out: {', '.join(missing)}")
    if not classes:
        named = "" if model_path == "(in memory)" else f" {model_path}"
        raise InputError(f"{ds.path}: none of its classes ({short_list(present)}) can be sampled by the model"
                         f"{named} (it samples {short_list(model.sampleable_classes)})")
    keep = torch.isin(labels_all, torch.tensor([ds.class_names.index(c) for c in classes]))
    idx, labels_all = idx[keep], labels_all[keep]
    small = [c for c in classes if int((labels_all == ds.class_names.index(c)).sum()) < 2]
    if small:
        raise InputError(f"{ds.path}: class(es) {', '.join(small)} have fewer than 2 real sequences in the "
                         f"{split!r} split; need at least 2 per class")
    if is_class_agnostic(model) and len(classes) > 1:
        notes.append("the model is unified and unconditioned: its samples do not depend on the class, so "
                     "per-class metrics compare one distribution with each class, and TSTR labels are arbitrary")
    model.to("cpu")
    model.reducer.eval()
    from feda2v_toolkit.runtime.resources import memory_budget as default_budget

    budget = default_budget() if memory_budget is None else int(memory_budget)
    cap, pooled_cap = row_caps(len(classes), max_per_class, budget=budget)
    by_budget = max_per_class is None and cap < row_caps(len(classes))[0]

    # -- real: a bounded seeded subset per class, reduced and pooled in one streaming pass -------------
    t0 = time.perf_counter()
    chosen, cut = reservoir(idx, labels_all, cap, seed)
    real = _read_rows(model, ds, chosen, {c: pooled_cap for c in classes}, pool_positions)
    masks = {c: real.of(c) for c in classes}
    counts = {c: int(m.sum()) for c, m in masks.items()}
    pooled_counts = {c: int((m & real.pooled_mask).sum()) for c, m in masks.items()}
    pooled_cut = any(pooled_counts[c] < counts[c] for c in classes)
    subsampled = cut or pooled_cut
    if cut:
        notes.append(f"subsampled: at most {cap} real sequences per class (a seeded uniform subset of the "
                     f"{idx.numel()}) for every figure, so memory does not grow with the data"
                     + (" (fewer than the default: the most whose Gram matrices fit a quarter of the memory "
                        "budget, --memory-budget)" if by_budget else ""))
    if pooled_cut:
        notes.append(f"subsampled: pooled full-length features (FD pooled, the pooled classifier view) of at most "
                     f"{pooled_cap} real and synthetic sequences per class")
    say(f"reduced {real.index.numel()} real sequences: {time.perf_counter() - t0:.1f}s")

    # -- synthetic: per class, in memory, bounded ------------------------------------------------------
    t0 = time.perf_counter()
    cond_of: dict[str, Tensor | None] = {}
    for c in classes:
        cond_of[c] = None
        if model.needs_condition(c):
            if not ds.condition_dim:
                raise UsageError(f"the model needs per-sample condition embeddings; {ds.path} has no 'conditions'")
            cond_of[c] = ds.read_conditions(real.index[masks[c]])
    synth_reduced: dict[str, Tensor] = {}
    synth_feats: dict[str, Tensor] = {}
    for c in classes:
        red, _, pool = _synthetic(model, c, samples_per_class or counts[c], seed=seed, seq_len=ds.seq_len,
                                  pool_positions=pool_positions, pooled=pooled_counts[c], conditions=cond_of[c])
        assert red is not None
        synth_reduced[c], synth_feats[c] = red, pool
    # one tensor of every class's rows (the classes' entries become views of it), so that the metrics over
    # all classes need no concatenated copy next to their Gram matrices
    synth_all = torch.cat(list(synth_reduced.values()))
    synth_reduced = dict(zip(classes, synth_all.split([synth_reduced[c].shape[0] for c in classes]), strict=True))
    say(f"sampled {sum(v.shape[0] for v in synth_reduced.values())} synthetic sequences: "
        f"{time.perf_counter() - t0:.1f}s")

    # -- distribution metrics ------------------------------------------------------------------------
    t0 = time.perf_counter()
    real_pooled = {c: real.pooled[masks[c][real.pooled_mask]] for c in classes}
    per_class = {}
    for c, mask in masks.items():
        per_class[c] = distribution_metrics(synth_reduced[c], real.reduced[mask], k=neighbours, seed=seed,
                                            pooled=(synth_feats[c], real_pooled[c]))
    overall = distribution_metrics(synth_all, real.reduced, k=neighbours, seed=seed,
                                   pooled=(torch.cat(list(synth_feats.values())),
                                           torch.cat(list(real_pooled.values()))))
    say(f"distribution metrics: {time.perf_counter() - t0:.1f}s")
    collapsed_classes = [c for c, m in per_class.items() if _collapsed(m)]
    collapsed = _collapsed(overall)
    if collapsed or collapsed_classes:
        which = "all classes" if collapsed else ", ".join(collapsed_classes)
        notes.append(f"COLLAPSE: the synthetic samples of {which} cover almost none of the real variety (recall < "
                     f"{COLLAPSE_RECALL} or diversity below {COLLAPSE_DIVERSITY} of the real one's): the generator "
                     f"collapsed onto a few modes or its class means")

    # -- training data: members (the rows the generators fitted on) -----------------------------------
    privacy: dict[str, PrivacyMetrics] = {}
    audit: MembershipAudit | None = None
    members: _Rows | None = None
    train_path: str | None = None
    if split == "heldout" or train_ds is not None:
        t0 = time.perf_counter()
        source_ds = ds if split == "heldout" else train_ds
        assert source_ds is not None
        train_path = str(source_ds.path)
        members, source, m_cut = _members(model, source_ds, classes, cap, pooled_cap, pool_positions, seed, notes)
        subsampled = subsampled or m_cut
        with torch.no_grad():
            privacy, member_near = _privacy(model, members, real, synth_reduced)
        flagged = [c for c, m in privacy.items() if m.memorising and c != "(all)"]
        if flagged:
            notes.append(f"MEMORISATION: synthetic samples of {', '.join(flagged)} are much nearer to training "
                         f"sequences than held-out real ones are (DCR ratio < {MEMORISATION_RATIO}): the generator "
                         f"copies, interpolates or collapses onto its training data")
        say(f"copy detection (distance to closest record): {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        if members.index.numel():
            member_cond = non_member_cond = None
            if any(g.needs_condition for g in model.generators.values()) and source_ds.condition_dim \
                    and ds.condition_dim:
                member_cond = source_ds.read_conditions(members.index)
                non_member_cond = ds.read_conditions(real.index)
            with torch.no_grad():
                audit = run_audit(model, model.normalize(members.reduced), members.classes,
                                  model.normalize(real.reduced), real.classes,
                                  {c: model.normalize(v) for c, v in synth_reduced.items()}, member_source=source,
                                  member_conditions=member_cond, non_member_conditions=non_member_cond, seed=seed,
                                  bootstrap=bootstrap,
                                  member_nearest=None if bool(member_near.isnan().any()) else member_near)
            if audit.leaking and audit.headline is not None:
                best = audit.attack(audit.headline)
                notes.append(f"MEMBERSHIP LEAK: the {audit.headline} attack tells training clips from held-out "
                             f"ones with AUC {best.auc:.3f} (95% interval {best.auc_low:.3f}-{best.auc_high:.3f}; "
                             f"above {audit.threshold} is flagged): the model file or its samples reveal which "
                             f"clips trained it")
            say(f"membership inference audit: {time.perf_counter() - t0:.1f}s")
    else:
        notes.append("membership inference and copy detection not measured, usefulness by the fallback protocol: "
                     "pass the training data (--train-data, or --split heldout with the training data as --data)")

    del synth_reduced, synth_all  # the usefulness classifiers draw their own samples

    # -- usefulness ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    usefulness = _usefulness(model, ds, classes, real, members, cond_of, seed=seed, draws=usefulness_seeds,
                             test_fraction=test_fraction, pool_positions=pool_positions)
    say(f"usefulness ({usefulness.protocol} protocol, {usefulness_seeds} synthetic draws): "
        f"{time.perf_counter() - t0:.1f}s")
    downstream = _downstream(ds, classes, real, synth_feats, test_fraction, seed)
    return EvaluationResult(
        model=model_path, data=str(ds.path), split=split, seed=seed, training_length=model.training_length,
        full_length=model.full_length, dim=model.dim, classes=classes, per_class=per_class, overall=overall,
        downstream=downstream, pool_positions=min(pool_positions, ds.seq_len),
        seconds=time.perf_counter() - t_start, notes=notes, privacy=privacy, train_data=train_path,
        usefulness=usefulness, membership=audit, collapsed=collapsed, subsampled=subsampled, rows_per_class=cap)


def _members(model: GenerativeModel, source: Dataset, classes: list[str], cap: int, pooled_cap: int,
             pool_positions: int, seed: int, notes: list[str]) -> tuple[_Rows, str, bool]:
    """The rows the generators fitted on (:func:`model_split`; every row when the split cannot be
    recomputed, with a note), of the evaluated classes, at most ``cap`` per class; where they come from; and
    whether the cap left some out."""
    try:
        train_idx, val_idx = model_split(model, source)
        where = (f"the trainer's train split of {source.path} ({train_idx.numel()} rows; its {val_idx.numel()} "
                 f"validation rows are not members)")
    except UsageError as exc:
        train_idx = torch.arange(len(source))
        where = f"every row of {source.path}"
        notes.append(f"the trainer's train split could not be recomputed ({exc}); every row of {source.path} counts "
                     f"as a member -- validation rows among them make the audit understate the leak")
    wanted = torch.tensor([source.class_names.index(c) for c in classes if c in source.class_names], dtype=torch.long)
    labels = source.labels[train_idx]
    keep = torch.isin(labels, wanted)
    chosen, cut = reservoir(train_idx[keep], labels[keep], cap, seed + 1)
    if cut:
        notes.append(f"subsampled: at most {cap} training sequences per class (a seeded uniform subset) for the "
                     f"membership audit, the DCR and the usefulness classifier")
    return _read_rows(model, source, chosen, {c: pooled_cap for c in classes}, pool_positions), where, cut


def _collapsed(m: DistributionMetrics) -> bool:
    return bool(m.recall < COLLAPSE_RECALL or m.diversity_ratio < COLLAPSE_DIVERSITY)


def _accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int) -> float:
    if y_train.numel() < 2 or y_test.numel() == 0 or (num_classes > 1 and torch.unique(y_train).numel() < 2):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RidgeClassifier(num_classes).fit(x_train, y_train).accuracy(x_test, y_test)


def _view(features: str, real_acc: float, syn_accs: list[float], real_train: int, syn_train: int,
          test: int, reconstructed: float) -> UsefulnessView:
    ratios = [a / real_acc if real_acc > 0 else float("nan") for a in syn_accs]
    finite = [r for r in ratios if math.isfinite(r)]
    return UsefulnessView(features=features, real_accuracy=real_acc, synthetic_accuracy=syn_accs, ratio=ratios,
                          ratio_mean=sum(finite) / len(finite) if finite else float("nan"),
                          ratio_min=min(finite, default=float("nan")), ratio_max=max(finite, default=float("nan")),
                          real_train=real_train, synthetic_train=syn_train, test=test,
                          reconstructed_accuracy=reconstructed)


def _reconstructed(model: GenerativeModel, reduced: Tensor, pooled_mask: Tensor, seq_len: int,
                   pool_positions: int) -> tuple[Tensor, Tensor]:
    """AST-head features of raw reduced sequences upsampled to ``seq_len``, and pooled features of the
    ``pooled_mask`` rows among them."""
    summ, pool = [], []
    for s in range(0, reduced.shape[0], UPSAMPLE_ROWS):
        full = model.upsample(reduced[s:s + UPSAMPLE_ROWS], seq_len)
        summ.append(summary_features(full))
        sel = pooled_mask[s:s + UPSAMPLE_ROWS]
        if bool(sel.any()):
            pool.append(pooled_features(full[sel], pool_positions))
    width = min(pool_positions, seq_len) * model.dim
    return (torch.cat(summ) if summ else torch.empty(0, model.dim),
            torch.cat(pool) if pool else torch.empty(0, width))


def _usefulness(model: GenerativeModel, ds: Dataset, classes: list[str], real: _Rows, members: _Rows | None,
                cond_of: dict[str, Tensor | None], *, seed: int, draws: int, test_fraction: float,
                pool_positions: int) -> UsefulnessResult:
    """Train-on-synthetic / train-on-real accuracy on held-out real clips, over ``draws`` synthetic draws.

    Standard protocol (``members`` known): the classifier trained on the model's training clips vs one trained
    on as many synthetic clips per class, both tested on the held-out real clips. Fallback: the real clips are
    split per class (``test_fraction``, seeded) into a train part and the test part."""
    index = {c: i for i, c in enumerate(classes)}
    y_real = torch.tensor([index[c] for c in real.classes], dtype=torch.long)
    y_real_pooled = y_real[real.pooled_mask]
    if members is not None and members.index.numel():
        protocol = "standard"
        y_tr = torch.tensor([index[c] for c in members.classes], dtype=torch.long)
        x_tr, x_te, y_te = members.summary, real.summary, y_real
        px_tr, py_tr = members.pooled, y_tr[members.pooled_mask]
        px_te, py_te = real.pooled, y_real_pooled
        rx_tr, rpx_tr = _reconstructed(model, members.reduced, members.pooled_mask, ds.seq_len, pool_positions)
    else:
        protocol = "fallback"
        tr, te = stratified_split(y_real, test_fraction, derive_seed(seed, "evaluate-split"))
        if te.numel() == 0:
            raise InputError(f"{ds.path}: too few real sequences for a train/test split")
        x_tr, y_tr, x_te, y_te = real.summary[tr], y_real[tr], real.summary[te], y_real[te]
        ptr, pte = stratified_split(y_real_pooled, test_fraction, derive_seed(seed, "evaluate-split"))
        px_tr, py_tr, px_te, py_te = real.pooled[ptr], y_real_pooled[ptr], real.pooled[pte], y_real_pooled[pte]
        rx_tr, _ = _reconstructed(model, real.reduced[tr], torch.zeros(tr.numel(), dtype=torch.bool), ds.seq_len,
                                  pool_positions)
        rows = real.pooled_mask.nonzero().flatten()[ptr]  # the pooled train part, in the order of py_tr
        _, rpx_tr = _reconstructed(model, real.reduced[rows], torch.ones(rows.numel(), dtype=torch.bool),
                                   ds.seq_len, pool_positions)
    n_per = {c: int((y_tr == i).sum()) for c, i in index.items()}
    pn_per = {c: int((py_tr == i).sum()) for c, i in index.items()}
    k = len(classes)
    real_acc = _accuracy(x_tr, y_tr, x_te, y_te, k)
    real_pacc = _accuracy(px_tr, py_tr, px_te, py_te, k)
    rec_acc = _accuracy(rx_tr, y_tr, x_te, y_te, k)
    rec_pacc = _accuracy(rpx_tr, py_tr, px_te, py_te, k)
    seeds = [seed + d for d in range(draws)]
    accs, paccs = [], []
    for s in seeds:
        xs, ys, ps, pys = [], [], [], []
        for c in classes:
            if not n_per[c]:
                continue
            _, summ, pool = _synthetic(model, c, n_per[c], seed=s, seq_len=ds.seq_len, pool_positions=pool_positions,
                                       pooled=pn_per[c], conditions=cond_of[c], reduced=False)
            xs.append(summ)
            ys.append(torch.full((summ.shape[0],), index[c], dtype=torch.long))
            ps.append(pool)
            pys.append(torch.full((pool.shape[0],), index[c], dtype=torch.long))
        accs.append(_accuracy(torch.cat(xs), torch.cat(ys), x_te, y_te, k))
        paccs.append(_accuracy(torch.cat(ps), torch.cat(pys), px_te, py_te, k))
    summary = _view("AST head: the mean of the two summary tokens (positions 0 and 1) of the full-length sequence",
                    real_acc, accs, int(y_tr.numel()), int(y_tr.numel()), int(y_te.numel()), rec_acc)
    pooled = _view(f"pooled: the full-length sequence average-pooled to {min(pool_positions, ds.seq_len)} positions",
                   real_pacc, paccs, int(py_tr.numel()), int(py_tr.numel()), int(py_te.numel()), rec_pacc)
    return UsefulnessResult(protocol=protocol, classifier=CLASSIFIER, seeds=seeds, summary=summary, pooled=pooled)



def _downstream(ds: Dataset, classes: list[str], real: _Rows, synth_feats: dict[str, Tensor],
                test_fraction: float, seed: int) -> DownstreamResult:
    """The split protocol on pooled features: real-only, TSTR and augmented accuracy on a real test part."""
    index = {c: i for i, c in enumerate(classes)}
    y_real = torch.tensor([index[c] for c in real.classes], dtype=torch.long)[real.pooled_mask]
    real_feats = real.pooled
    train_idx, test_idx = stratified_split(y_real, test_fraction, derive_seed(seed, "evaluate-split"))
    if test_idx.numel() == 0:
        raise InputError(f"{ds.path}: too few real sequences for a train/test split")
    x_syn = torch.cat([synth_feats[c] for c in classes])
    y_syn = torch.cat([torch.full((synth_feats[c].shape[0],), i, dtype=torch.long) for i, c in enumerate(classes)])
    x_test, y_test = real_feats[test_idx], y_real[test_idx]
    sets = {
        "real_only": (real_feats[train_idx], y_real[train_idx]),
        "tstr": (x_syn, y_syn),
        "augmented": (torch.cat([real_feats[train_idx], x_syn]), torch.cat([y_real[train_idx], y_syn])),
    }
    acc: dict[str, float] = {}
    per_class: dict[str, dict[str, float]] = {c: {} for c in classes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (x, y) in sets.items():
            if torch.unique(y).numel() < 2 and len(classes) > 1 or y.numel() < 2:
                acc[name] = float("nan")
                continue
            clf = RidgeClassifier(len(classes)).fit(x, y)
            pred = clf.predict(x_test)
            acc[name] = float((pred == y_test).double().mean())
            for i, c in enumerate(classes):
                mask = y_test == i
                per_class[c][name] = float((pred[mask] == i).double().mean()) if mask.any() else float("nan")
    return DownstreamResult(acc["real_only"], acc["tstr"], acc["augmented"], per_class,
                            int(train_idx.numel()), int(test_idx.numel()), int(x_syn.shape[0]))
