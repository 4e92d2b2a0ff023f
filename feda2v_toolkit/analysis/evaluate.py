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

Privacy (``privacy``), when the training data is known (``split="heldout"``, or ``train_data``): the
**distance to the closest record** (DCR) in the model's normalised reduced space (the space the generator
was trained in, flattened). Per class, the median distance from each synthetic sample to its nearest
training sequence of that class, divided by the same median for the held-out real sequences: about 1
when synthetic samples are as far from the training clips as new real clips are, well below 1 when the
generator copies or interpolates training rows (or collapses onto their mean). ``close_share`` is the share of synthetic samples nearer
to a training sequence than 95% of the held-out ones are (about 0.05 for a generator that does not
memorise). A ratio below :data:`MEMORISATION_RATIO` is flagged (``memorising``).

Downstream, with the classifier of ``analyze`` on pooled full-length features (synthetic samples
upsampled by the model's upsampler to the real length): the real data are split per class into a train
part and a test part (``test_fraction``, default 0.5, stratified by ``seed``), and the classifier is
trained on (a) the real train part -- ``real_only`` --, (b) all synthetic samples -- ``tstr``
(train on synthetic, test on real) --, (c) both -- ``augmented`` --, each tested on the real test part.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.analysis.classifier import DEFAULT_POOL_POSITIONS, RidgeClassifier, pooled_features
from feda2v_toolkit.analysis.metrics import (
    covariance_gap,
    frechet_distance,
    manifold_metrics,
    mean_gap,
    mean_pairwise_distance,
)
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.errors import InputError, UsageError
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.model.generate import DEFAULT_BATCH, is_class_agnostic, sample_class_reduced
from feda2v_toolkit.runtime.seeds import derive_seed, scheme_seed
from feda2v_toolkit.training.streams import read_chunk_rows

MAX_SAMPLES_PER_CLASS = 10_000
SPLITS = ("all", "heldout")
#: a DCR ratio below this flags the samples as (near-)copies of training data
MEMORISATION_RATIO = 0.8


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
    privacy: dict[str, PrivacyMetrics] = field(default_factory=dict)  # per class and "(all)"; empty if unknown
    train_data: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _halves(r: Tensor, seed: int) -> float | None:
    """Frechet distance between two random halves of ``r``: the sampling-noise reference."""
    if r.shape[0] < 4:
        return None
    perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(seed))
    half = r.shape[0] // 2
    return frechet_distance(r[perm[:half]], r[perm[half:2 * half]])


def distribution_metrics(synthetic: Tensor, real: Tensor, *, k: int = 5, seed: int = 0,
                         pooled: tuple[Tensor, Tensor] | None = None) -> DistributionMetrics:
    """All distribution metrics of ``synthetic`` vs ``real`` (``[n, ...]`` each, flattened); ``pooled``:
    the same samples as pooled full-length features ``(synthetic, real)`` for the reducer-independent
    Frechet distance."""
    s = synthetic.reshape(synthetic.shape[0], -1)
    r = real.reshape(real.shape[0], -1)
    manifold = manifold_metrics(s, r, k=k)
    div_s, div_r = mean_pairwise_distance(s), mean_pairwise_distance(r)
    fd_pooled = fd_pooled_halves = None
    if pooled is not None:
        fd_pooled, fd_pooled_halves = frechet_distance(*pooled), _halves(pooled[1], seed)
    return DistributionMetrics(
        real=r.shape[0], synthetic=s.shape[0], frechet=frechet_distance(s, r), frechet_real_halves=_halves(r, seed),
        frechet_pooled=fd_pooled, frechet_pooled_real_halves=fd_pooled_halves,
        mean_gap=mean_gap(s, r), covariance_gap=covariance_gap(s, r), diversity_synthetic=div_s,
        diversity_real=div_r, diversity_ratio=div_s / div_r if div_r > 0 else float("nan"),
        precision=manifold.precision, recall=manifold.recall, density=manifold.density,
        coverage=manifold.coverage, k=manifold.k)


def nearest_distances(x: Tensor, reference: Tensor, rows: int = 1024) -> Tensor:
    """Euclidean distance from each row of ``x`` ``[n, ...]`` to its nearest row of ``reference`` (float64)."""
    a = x.reshape(x.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double()
    return torch.cat([torch.cdist(a[s:s + rows], b).min(dim=1).values for s in range(0, a.shape[0], rows)])


def privacy_metrics(synthetic_d: Tensor, real_d: Tensor, training: int) -> PrivacyMetrics:
    """DCR summary from nearest-training distances of synthetic and of held-out real samples."""
    syn, real = float(synthetic_d.median()), float(real_d.median())
    ratio = syn / real if real > 0 else float("nan")
    low = float(torch.quantile(real_d, 0.05)) if real_d.numel() > 1 else float(real_d.min())
    close = float((synthetic_d < low).double().mean())
    return PrivacyMetrics(training=training, synthetic_dcr=syn, real_dcr=real, ratio=ratio, close_share=close,
                          memorising=bool(ratio < MEMORISATION_RATIO))


def _privacy(model: GenerativeModel, train_ds: Dataset, train_idx: Tensor, classes: list[str],
             real_reduced: Tensor, real_masks: dict[str, Tensor],
             synth_reduced: dict[str, Tensor]) -> dict[str, PrivacyMetrics]:
    """Per-class and pooled DCR in the model's normalised reduced space."""
    labels = train_ds.labels[train_idx]
    out: dict[str, PrivacyMetrics] = {}
    syn_all, real_all, n_all = [], [], 0
    for c in classes:
        if c not in train_ds.class_names:
            continue
        rows = train_idx[labels == train_ds.class_names.index(c)]
        if rows.numel() == 0:
            continue
        train_red = torch.cat([model.reducer(b.embeddings) for b in train_ds.batches(read_chunk_rows(train_ds), rows)])
        ref = model.normalize(train_red)
        syn_d = nearest_distances(model.normalize(synth_reduced[c]), ref)
        real_d = nearest_distances(model.normalize(real_reduced[real_masks[c]]), ref)
        out[c] = privacy_metrics(syn_d, real_d, int(rows.numel()))
        syn_all.append(syn_d)
        real_all.append(real_d)
        n_all += int(rows.numel())
    if out:
        out["(all)"] = privacy_metrics(torch.cat(syn_all), torch.cat(real_all), n_all)
    return out


def _real_indices(model: GenerativeModel, ds: Dataset, split: str) -> Tensor:
    if split == "all":
        return torch.arange(len(ds))
    if split != "heldout":
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    counts = ds.class_counts()
    trained = {c: n for c, n in model.class_counts.items() if n}
    if trained and {c: n for c, n in counts.items() if n} != trained:
        raise UsageError(f"{ds.path}: --split heldout needs the dataset the model was trained on "
                         f"(class counts {counts} differ from the model's {trained})")
    if model.seed is None:
        raise UsageError("--split heldout: the model file records no training seed")
    fraction = float(model.setting("generator_validation_split"))
    _, val_idx = stratified_split(ds.labels, fraction, scheme_seed(model.seed_scheme, int(model.seed), "split", 0))
    if val_idx.numel() == 0:
        raise UsageError("--split heldout: the model was trained without a held-out split "
                         "(generator_validation_split = 0); evaluate against other real data")
    return val_idx


def evaluate(model: GenerativeModel | str | os.PathLike[str], data: str | os.PathLike[str] | Dataset, *,
             split: str = "all", train_data: str | os.PathLike[str] | Dataset | None = None, test_fraction: float = 0.5, samples_per_class: int | None = None, seed: int = 0,
             neighbours: int = 5, pool_positions: int = DEFAULT_POOL_POSITIONS,
             log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Measure ``model``'s synthetic samples against real data (module docstring).

    Args:
        model: a :class:`GenerativeModel` or a model file path.
        data: real data with the model's sequence shape and (some of) its classes.
        split: ``all`` or ``heldout`` (see the module docstring).
        train_data: the model's training data, for the privacy (DCR) measure when ``split="all"``
            (with ``heldout`` the training rows are the rest of ``data``).
        test_fraction: share of each class's real sequences the downstream classifiers are tested on.
        samples_per_class: synthetic samples per class (default: the class's real count).
        seed: seeds the synthetic draws and the real train/test split.
        neighbours: ``k`` of precision/recall/density/coverage.
        pool_positions: ``P`` of the classifier's pooled features.
    """
    t_start = time.perf_counter()
    say = log or (lambda _m: None)
    model_path = "(in memory)"
    if not isinstance(model, GenerativeModel):
        from feda2v_toolkit.model.file import load_model

        model_path = str(model)
        model = load_model(model)
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    if (ds.seq_len, ds.dim) != (model.full_length, model.dim):
        raise InputError(f"{ds.path}: sequences are [{ds.seq_len}, {ds.dim}], the model's are "
                         f"[{model.full_length}, {model.dim}]")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if samples_per_class is not None and not 1 <= samples_per_class <= MAX_SAMPLES_PER_CLASS:
        raise UsageError(f"--samples-per-class must be in 1..{MAX_SAMPLES_PER_CLASS}, got {samples_per_class}")
    notes: list[str] = []
    idx = heldout_idx = _real_indices(model, ds, split)
    labels_all = ds.labels[idx]
    present = [ds.class_names[c] for c in torch.unique(labels_all).tolist()]
    classes = [c for c in model.class_names if c in present and c in model.class_to_generator]
    missing = [c for c in present if c not in classes]
    if missing:
        notes.append(f"real classes the model cannot sample were left out: {', '.join(missing)}")
    if not classes:
        raise InputError(f"{ds.path}: none of its classes ({', '.join(present)}) can be sampled by the model "
                         f"({', '.join(model.sampleable_classes)})")
    keep = torch.isin(labels_all, torch.tensor([ds.class_names.index(c) for c in classes]))
    idx, labels_all = idx[keep], labels_all[keep]
    masks = {c: labels_all == ds.class_names.index(c) for c in classes}
    counts = {c: int(m.sum()) for c, m in masks.items()}
    small = [c for c, n in counts.items() if n < 2]
    if small:
        raise InputError(f"{ds.path}: class(es) {', '.join(small)} have fewer than 2 real sequences in the "
                         f"{split!r} split; need at least 2 per class")
    if is_class_agnostic(model) and len(classes) > 1:
        notes.append("the model is unified and unconditioned: its samples do not depend on the class, so "
                     "per-class metrics compare one distribution with each class, and TSTR labels are arbitrary")
    model.to("cpu")
    model.reducer.eval()

    # -- real: reduce and pool, streaming ------------------------------------------------------------
    t0 = time.perf_counter()
    rows = read_chunk_rows(ds)
    real_reduced = torch.empty(idx.numel(), model.training_length, model.dim)
    real_feats = torch.empty(idx.numel(), min(pool_positions, ds.seq_len) * ds.dim)
    pos = 0
    with torch.no_grad():
        for batch in ds.batches(rows, idx):
            n = batch.embeddings.shape[0]
            real_reduced[pos:pos + n] = model.reducer(batch.embeddings)
            real_feats[pos:pos + n] = pooled_features(batch.embeddings, pool_positions)
            pos += n
    say(f"reduced {idx.numel()} real sequences: {time.perf_counter() - t0:.1f}s")

    # -- synthetic: per class, in memory, bounded ------------------------------------------------------
    t0 = time.perf_counter()
    synth_reduced: dict[str, Tensor] = {}
    synth_feats: dict[str, Tensor] = {}
    for c in classes:
        n = samples_per_class or counts[c]
        cond_pool = None
        if model.needs_condition(c):
            if not ds.condition_dim:
                raise UsageError(f"the model needs per-sample condition embeddings; {ds.path} has no 'conditions'")
            cond_pool = ds.read_conditions(idx[masks[c]])
        red_parts, feat_parts = [], []
        for reduced, _ in sample_class_reduced(model, c, n, seed=seed, batch_size=DEFAULT_BATCH, conditions=cond_pool):
            full = model.upsample(reduced, ds.seq_len)
            red_parts.append(reduced.float())
            feat_parts.append(pooled_features(full, pool_positions))
        synth_reduced[c] = torch.cat(red_parts)
        synth_feats[c] = torch.cat(feat_parts)
    say(f"sampled {sum(v.shape[0] for v in synth_reduced.values())} synthetic sequences: "
        f"{time.perf_counter() - t0:.1f}s")

    # -- distribution metrics ------------------------------------------------------------------------
    t0 = time.perf_counter()
    per_class = {}
    for c, mask in masks.items():
        per_class[c] = distribution_metrics(synth_reduced[c], real_reduced[mask], k=neighbours, seed=seed,
                                            pooled=(synth_feats[c], real_feats[mask]))
    overall = distribution_metrics(torch.cat(list(synth_reduced.values())), real_reduced, k=neighbours, seed=seed,
                                   pooled=(torch.cat(list(synth_feats.values())), real_feats))
    say(f"distribution metrics: {time.perf_counter() - t0:.1f}s")

    # -- privacy: distance to closest training record --------------------------------------------------
    privacy: dict[str, PrivacyMetrics] = {}
    train_path: str | None = None
    if split == "heldout" or train_data is not None:
        t0 = time.perf_counter()
        if split == "heldout":
            train_ds = ds
            train_rows = torch.ones(len(ds), dtype=torch.bool)
            train_rows[heldout_idx] = False  # the trainer's own split, computed once above
            train_idx = train_rows.nonzero().flatten()
        else:
            train_ds = train_data if isinstance(train_data, Dataset) else open_dataset(train_data)
            if (train_ds.seq_len, train_ds.dim) != (model.full_length, model.dim):
                raise InputError(f"{train_ds.path}: sequences are [{train_ds.seq_len}, {train_ds.dim}], the "
                                 f"model's are [{model.full_length}, {model.dim}]")
            train_idx = torch.arange(len(train_ds))
        train_path = str(train_ds.path)
        with torch.no_grad():
            privacy = _privacy(model, train_ds, train_idx, classes, real_reduced, masks, synth_reduced)
        flagged = [c for c, m in privacy.items() if m.memorising and c != "(all)"]
        if flagged:
            notes.append(f"MEMORISATION: synthetic samples of {', '.join(flagged)} are much nearer to training "
                         f"sequences than held-out real ones are (DCR ratio < {MEMORISATION_RATIO}): the generator "
                         f"copies, interpolates or collapses onto its training data")
        say(f"privacy (distance to closest record): {time.perf_counter() - t0:.1f}s")
    else:
        notes.append("privacy (distance to closest record) not measured: pass the training data "
                     "(--train-data, or --split heldout with the training data as --data)")

    # -- downstream ------------------------------------------------------------------------------------
    downstream = _downstream(ds, classes, labels_all, real_feats, synth_feats, test_fraction, seed)
    return EvaluationResult(
        model=model_path, data=str(ds.path), split=split, seed=seed, training_length=model.training_length,
        full_length=model.full_length, dim=model.dim, classes=classes, per_class=per_class, overall=overall,
        downstream=downstream, pool_positions=min(pool_positions, ds.seq_len),
        seconds=time.perf_counter() - t_start, notes=notes, privacy=privacy, train_data=train_path)


def _downstream(ds: Dataset, classes: list[str], labels: Tensor, real_feats: Tensor,
                synth_feats: dict[str, Tensor], test_fraction: float, seed: int) -> DownstreamResult:
    """Real-only, TSTR and augmented accuracy on the real test part (labels re-indexed over ``classes``)."""
    index = {ds.class_names.index(c): i for i, c in enumerate(classes)}
    y_real = torch.tensor([index[int(v)] for v in labels.tolist()], dtype=torch.long)
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
