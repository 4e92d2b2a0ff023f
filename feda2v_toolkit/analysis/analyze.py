"""``feda2v-tk analyze``: what each reducer/upsampler pair keeps of the data, per training length.

For every length ``l`` and every registered (or chosen) reducer/upsampler pair, on a stratified held-out
split of the data (``holdout``, default 25%; fitting uses only the rest):

* ``compression``: ``L / l``;
* ``r2`` and ``cosine``: how well ``upsampler(reducer(x))`` reconstructs the held-out full sequences
  (:class:`~feda2v_toolkit.analysis.metrics.ReconstructionStats`). ``r2`` is taken about the held-out
  set's per-position mean: the pattern every clip shares is not counted as kept information
  (``r2_about_sequence_mean``, the older figure about each sequence's own mean, is reported too);
* ``accuracy``: the downstream classifier (:mod:`.classifier`) trained on reconstructed training
  sequences and tested on reconstructed held-out ones -- the class information that survives;
  ``accuracy_on_real``: the same classifier tested on the original held-out sequences -- what a
  perfect generator at this length would give a model evaluated on real data. ``baseline_accuracy``
  is the classifier trained and tested on the originals. Pairs are **ranked by ``accuracy_on_real``**
  (ties: ``r2``): ``recommended`` names the best pair per length -- R^2 alone rewards decoders that
  reproduce what every clip shares and can rank reducers backwards on real embeddings;
* ``optimum``: the same numbers for the linear optimum (position PCA fitted on the training split,
  decoded exactly; :mod:`.linear_optimum`), the reference line no linear reduction can beat in R^2.

Fitted reducers are fitted and trainable upsamplers trained on the training split, with
``generator_upsampler_epochs`` capped at ``upsampler_epochs`` (iterative upsamplers such as ``learned``
cost a pass over the data per epoch; ``train`` uses the configured count). A reducer whose class sets
``positional = False`` (``pca``: its reduced axis holds components) is paired only with trainable
upsamplers unless ``all_pairs`` is set: interpolating components means nothing.

Streaming: the full sequences are read batch by batch (a few passes in all). What is kept: the reduced clips
``[N, l, D]`` per reducer and length, and each classifier's pooled training features ``[N, P * D]`` -- in
memory up to an eighth of the memory budget each, else in temporary files read back a block at a time (the
classifier is fitted from blocks of :data:`CLASSIFIER_BLOCK` rows and keeps its primal weights, the same
arithmetic either way) -- the held-out clips' pooled features, running sums and the fitted components. The
pairs of one reducer and length share a read of the held-out clips, as many as keep their held-out features
within an eighth of the memory budget. Deterministic for a given ``seed``, whatever the budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.analysis.classifier import DEFAULT_POOL_POSITIONS, RidgeClassifier, pooled_features
from feda2v_toolkit.analysis.metrics import ReconstructionStats, sum_squares_about_sequence_mean
from feda2v_toolkit.analysis.plan import resolve_config
from feda2v_toolkit.components import Reducer, Upsampler
from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.errors import InputError, UsageError
from feda2v_toolkit.reducers.pca import PCAReducer
from feda2v_toolkit.reducers.position_moments import PositionMoments, PositionPCA
from feda2v_toolkit.runtime.seeds import derive_seed
from feda2v_toolkit.training.streams import ReducedCache, full_batches, read_chunk_rows, upsampler_pairs

OPTIMUM = "linear optimum"
#: training rows per block of the classifiers' kernel (fixed: the figures do not depend on the memory budget)
CLASSIFIER_BLOCK = 256
DEFAULT_UPSAMPLER_EPOCHS = 1
#: clips analysed at most by default (a seeded sample beyond; evaluate's reservoir holds as many real clips)
DEFAULT_MAX_CLIPS = 4096


@dataclass
class PairResult:
    """One reducer/upsampler pair at one length (``reducer == "linear optimum"`` for the reference)."""

    reducer: str
    upsampler: str
    length: int
    compression: float
    r2: float
    cosine: float
    accuracy: float
    accuracy_on_real: float
    r2_vs_optimum: float | None = None  # r2 / the optimum's r2 at this length
    r2_about_sequence_mean: float | None = None  # the older R^2 (about each sequence's own mean)
    fit: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class AnalysisResult:
    data: str
    sequences: int
    seq_len: int
    dim: int
    class_names: list[str]
    train: int
    heldout: int
    seed: int
    lengths: list[int]
    reducers: list[str]
    upsamplers: list[str]
    pool_positions: int
    upsampler_epochs: int | None
    baseline_accuracy: float
    optimum: list[PairResult]
    pairs: list[PairResult]
    explained_variance: dict[int, float]
    seconds: float
    notes: list[str] = field(default_factory=list)
    #: length -> the pair with the best accuracy on real held-out sequences (ties: R^2)
    recommended: dict[int, PairResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def pair(self, reducer: str, upsampler: str, length: int) -> PairResult:
        for p in self.pairs:
            if (p.reducer, p.upsampler, p.length) == (reducer, upsampler, length):
                return p
        raise KeyError((reducer, upsampler, length))


def _names(kind: str, wanted: Sequence[str] | None) -> list[str]:
    from feda2v_toolkit.plugins import get_registry

    registry = get_registry()
    names = list(wanted) if wanted else registry.names(kind)
    for name in names:
        registry.get(kind, name)  # one-line error for an unknown name
    return names


def _check_lengths(ds: Dataset, lengths: Sequence[int]) -> list[int]:
    if not lengths:
        raise UsageError("--lengths: give at least one length")
    for length in lengths:
        if not 1 <= int(length) <= ds.seq_len:
            raise UsageError(f"{ds.path}: length {length} is outside 1..{ds.seq_len} "
                             f"(the sequences have {ds.seq_len} tokens)")
    return sorted({int(v) for v in lengths})


def proportional_sample(labels: Tensor, size: int, seed: int) -> Tensor:
    """Sorted rows: a seeded uniform sample of about ``size`` rows in which each label keeps its share (at
    least 2 rows of a label that has them, so that it can still be split)."""
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    parts = []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().flatten()
        keep = min(rows.numel(), max(2, round(size * rows.numel() / n)))
        parts.append(rows[torch.randperm(rows.numel(), generator=g)[:keep]])
    return torch.cat(parts).sort().values


def _split(ds: Dataset, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be between 0 and 1, got {holdout}")
    train_idx, test_idx = stratified_split(ds.labels, holdout, derive_seed(seed, "analyze-split"))
    classes = torch.unique(ds.labels[train_idx]).numel()
    if test_idx.numel() == 0 or classes < 2:
        raise InputError(f"{ds.path}: too little data to analyse: need at least 2 classes with 2+ samples each "
                         f"(found {len(ds)} samples, {torch.unique(ds.labels).numel()} classes)")
    return train_idx, test_idx


class _Run:
    """The state of one analysis: data, split, fitted components, reduced tensors and results."""

    def __init__(self, ds: Dataset, lengths: list[int], reducers: list[str], upsamplers: list[str],
                 cfg: dict[str, Any], train_idx: Tensor, test_idx: Tensor, seed: int, pool: int, rows: int,
                 with_optimum: bool, say: Callable[[str], None], all_pairs: bool = False,
                 budget: int | None = None) -> None:
        from feda2v_toolkit.runtime.resources import memory_budget

        self.budget = memory_budget() if budget is None else int(budget)
        self.ds, self.lengths, self.cfg, self.seed, self.pool, self.rows = ds, lengths, cfg, seed, pool, rows
        self.reducer_names, self.upsampler_names = reducers, upsamplers
        self.train_idx, self.test_idx = train_idx, test_idx
        self.with_optimum = with_optimum
        self.say = say
        self.pca: PositionPCA | None = None
        self.pca_count = 0
        #: (reducer, length) set from the shared position PCA: nested, so reduced once (reduce_all)
        self.shared: set[tuple[str, int]] = set()
        self.reducers: dict[tuple[str, int], Reducer] = {}
        #: the reduced clips per (reducer, length): rows -> ``[len(rows), l, D]`` (:meth:`reduce_all`)
        self.reduced: dict[tuple[str, int], Callable[[Tensor], Tensor]] = {}
        self._reduced_stores: list[ReducedCache] = []
        self.upsamplers: dict[tuple[str, int, str], Upsampler] = {}
        self.fit_info: dict[tuple[str, int, str], dict[str, Any]] = {}
        self.stats: dict[tuple[str, int, str], ReconstructionStats] = {}
        self.seconds: dict[tuple[str, int, str], float] = {}
        #: pooled features of the original sequences: the training split's (a :meth:`feature_store`) until the
        #: baseline classifier took them (analyze), the held-out split's for every pair's accuracy on real ones
        self.original_train: ReducedCache | None = None
        self.original_test = torch.empty(0)
        self.all_pairs = all_pairs
        self.upsampler_classes: dict[str, type] = {}
        self.skipped: set[tuple[str, str]] = set()

    # -- fitting ------------------------------------------------------------------------------------
    def train_batches(self) -> Callable[[], Any]:
        """Full-length batches of the training split: the stream ``train`` fits reducers on."""
        return full_batches(self.ds, self.train_idx, self.rows)

    def fit_reducers(self) -> None:
        from feda2v_toolkit.plugins import get_registry

        registry = get_registry()
        ds = self.ds
        classes = {name: registry.load("reducer", name) for name in self.reducer_names}
        if self.with_optimum or any(hasattr(cls, "set_pca") and cls.fitted for cls in classes.values()):
            t0 = time.perf_counter()
            moments = PositionMoments(ds.seq_len, ds.dim).update(self.train_batches()())
            self.pca, self.pca_count = PositionPCA(moments), moments.count
            self.say(f"position PCA on {moments.count} training sequences: {time.perf_counter() - t0:.1f}s")
        for name, cls in classes.items():
            for length in self.lengths:
                t0 = time.perf_counter()
                red = cls.from_config(self.cfg, length=length, full_length=ds.seq_len, dim=ds.dim)
                if cls.fitted:
                    if hasattr(red, "set_pca") and self.pca is not None:
                        red.set_pca(self.pca, sequences=self.pca_count)
                        self.shared.add((name, length))
                    else:
                        torch.manual_seed(self.seed)
                        red.fit(self.train_batches())
                self.reducers[(name, length)] = red.eval()
                self.seconds[(name, length, "")] = time.perf_counter() - t0
        if self.with_optimum:
            assert self.pca is not None
            for length in self.lengths:
                red = PCAReducer(length=length, full_length=ds.seq_len, dim=ds.dim)
                red.set_pca(self.pca, sequences=self.pca_count)
                self.reducers[(OPTIMUM, length)] = red.eval()
                self.shared.add((OPTIMUM, length))

    @torch.no_grad()
    def reduce_all(self) -> None:
        """One pass over every sequence: reduced tensors per (reducer, length) and pooled originals.

        Reducers fitted from the shared position PCA are nested (the top-``l`` components are a prefix
        of the top-``l'`` ones), so the longest is computed once and the others are slices of it.
        """
        ds = self.ds
        n = len(ds)
        shared = [k for k in self.reducers if k in self.shared and isinstance(self.reducers[k], PCAReducer)]
        longest = max(shared, key=lambda k: self.reducers[k].length) if shared else None
        own = [k for k in self.reducers if k not in shared]
        computed = own + ([longest] if longest else [])
        # in memory up to an eighth of the budget together, else each in a temporary file
        in_memory = n * sum(self.reducers[k].length for k in computed) * ds.dim * 4 <= self.share
        stores = {key: _store(n, self.reducers[key].length, ds.dim, in_memory) for key in computed}
        self._reduced_stores = list(stores.values())
        for key, store in stores.items():
            self.reduced[key] = store.raw
        width = min(self.pool, ds.seq_len) * ds.dim
        self.original_train = self.feature_store(self.train_idx.numel(), width)
        self.original_test = torch.empty(self.test_idx.numel(), width)
        # row -> (split, position in it): the features go straight to where the classifiers read them
        split = torch.full((n,), -1, dtype=torch.long)
        where = torch.zeros(n, dtype=torch.long)
        for s, idx in enumerate((self.train_idx, self.test_idx)):
            split[idx], where[idx] = s, torch.arange(idx.numel())
        for batch in ds.batches(self.rows):
            x = batch.embeddings
            lo, hi = int(batch.indices[0]), int(batch.indices[-1]) + 1
            for key in computed:
                stores[key].write(lo, self.reducers[key](x))
            feats = pooled_features(x, self.pool)
            sel = split[lo:hi] == 0
            if bool(sel.any()):  # the split is sorted: a batch's training rows are consecutive positions
                self.original_train.write(int(where[lo:hi][sel][0]), feats[sel].unsqueeze(1))
            sel = split[lo:hi] == 1
            self.original_test[where[lo:hi][sel]] = feats[sel]
        if longest is not None:
            for key in shared:
                if key != longest:
                    self.reduced[key] = (lambda rows, read=stores[longest].raw, length=self.reducers[key].length:
                                         read(rows)[:, :length].contiguous())

    def close(self) -> None:
        """Release the reduced clips (and their temporary files)."""
        for store in self._reduced_stores:
            store.close()
        self._reduced_stores, self.reduced = [], {}

    def fit_upsamplers(self) -> None:
        from feda2v_toolkit.plugins import get_registry

        registry = get_registry()
        ds = self.ds
        classes = self.upsampler_classes = {name: registry.load("upsampler", name) for name in self.upsampler_names}
        for (rname, length) in [k for k in self.reducers if k[0] != OPTIMUM]:
            reduced_all = self.reduced[(rname, length)]
            positional = type(self.reducers[(rname, length)]).positional
            for uname, cls in classes.items():
                if not (positional or cls.trainable or self.all_pairs):
                    self.skipped.add((rname, uname))
                    continue
                t0 = time.perf_counter()
                ups = cls.from_config(self.cfg, reduced_length=length, full_length=ds.seq_len, dim=ds.dim)
                info: dict[str, Any] = {}
                if cls.trainable:
                    torch.manual_seed(self.seed)
                    pairs = self.pairs(reduced_all)
                    ups.train()
                    info = dict(ups.fit(pairs, config=self.cfg) or {})
                    self.say(f"fitted {uname} after {rname} at length {length}: {time.perf_counter() - t0:.1f}s")
                key = (rname, length, uname)
                self.upsamplers[key] = ups.eval()
                self.fit_info[key] = info
                self.seconds[key] = time.perf_counter() - t0 + self.seconds.get((rname, length, ""), 0.0)

    def pairs(self, reduced: Callable[[Tensor], Tensor]) -> Callable[[], Any]:
        """(reduced, full) training pairs in chunks, the chunk order reshuffled on every call (seeded):
        the stream ``train`` fits a trainable upsampler on."""
        return upsampler_pairs(self.ds, self.train_idx, reduced, self.rows, self.seed, "analyze")

    def _reconstruct(self, key: tuple[str, int, str], rows: Tensor) -> Tensor:
        rname, length, _ = key
        reduced = self.reduced[(rname, length)](rows)
        if rname == OPTIMUM:
            red = self.reducers[(rname, length)]
            assert isinstance(red, PCAReducer)
            return red.inverse(reduced)
        return self.upsamplers[key](reduced, self.ds.seq_len)

    def groups(self) -> dict[tuple[str, int], list[tuple[str, int, str]]]:
        """Pairs grouped by (reducer, length): each group shares one read of the held-out data."""
        out: dict[tuple[str, int], list[tuple[str, int, str]]] = {}
        for key in self.upsamplers:
            out.setdefault(key[:2], []).append(key)
        if self.with_optimum:
            for length in self.lengths:
                out[(OPTIMUM, length)] = [(OPTIMUM, length, "inverse")]
        return out

    # -- measuring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def measure_group(self, combos: list[tuple[str, int, str]]) -> dict[tuple[str, int, str], PairResult]:
        """Reconstruct every sequence once per pair: R^2, cosine and pooled features on one pass over the
        held-out sequences (shared by the group), then each pair's training features and classifier in
        turn (so only one pair's features for the whole dataset are in memory at a time)."""
        ds = self.ds
        stats = {key: ReconstructionStats() for key in combos}
        n_test, width = self.original_test.shape
        test_feats = {key: torch.empty(n_test, width) for key in combos}
        seconds = dict.fromkeys(combos, 0.0)
        pos = 0
        for batch in ds.batches(self.rows, self.test_idx):
            x = batch.embeddings
            sst = sum_squares_about_sequence_mean(x)
            for key in combos:
                t0 = time.perf_counter()
                y = self._reconstruct(key, batch.indices)
                stats[key].add(x, y, sst)
                test_feats[key][pos:pos + x.shape[0]] = pooled_features(y, self.pool)
                seconds[key] += time.perf_counter() - t0
            pos += x.shape[0]
        out = {}
        for key in combos:
            t0 = time.perf_counter()
            train_feats = self.feature_store(self.train_idx.numel(), width)
            for start in range(0, self.train_idx.numel(), self.rows):
                rows = self.train_idx[start:start + self.rows]
                train_feats.write(start, pooled_features(self._reconstruct(key, rows), self.pool).unsqueeze(1))
            acc, acc_real = self.classify(train_feats, test_feats.pop(key))
            train_feats.close()  # before the next pair's
            rname, length, uname = key
            out[key] = PairResult(rname, uname, length, ds.seq_len / length, stats[key].r2, stats[key].cosine, acc,
                                  acc_real, r2_about_sequence_mean=stats[key].r2_about_sequence_mean,
                                  fit=self.fit_info.get(key, {}),
                                  seconds=self.seconds.get(key, 0.0) + seconds[key] + time.perf_counter() - t0)
        return out

    def feature_store(self, rows: int, width: int) -> ReducedCache:
        """Rows of ``width`` pooled features for the classifiers: in memory up to an eighth of the memory budget,
        else in a temporary file (:class:`~feda2v_toolkit.training.streams.ReducedCache`)."""
        return _store(rows, 1, width, rows * width * 4 <= self.share)

    @property
    def share(self) -> int:
        """Bytes each of what grows with the clips may hold in memory -- the reduced clips, one classifier's
        training features, the held-out features of the pairs that share a read: an eighth of the budget."""
        return self.budget // 8

    def fit_classifier(self, features: ReducedCache) -> RidgeClassifier:
        """The classifier on the training split's ``features``, read :data:`CLASSIFIER_BLOCK` rows at a time
        (the same arithmetic whether they are in memory or in a file)."""
        def read(lo: int, hi: int) -> Tensor:
            return features.raw(torch.arange(lo, hi)).reshape(hi - lo, -1)

        return RidgeClassifier(self.ds.num_classes).fit_rows(read, features.rows, self.ds.labels[self.train_idx],
                                                             block=CLASSIFIER_BLOCK)

    def classify(self, train_features: ReducedCache, test_features: Tensor) -> tuple[float, float]:
        """Accuracy on reconstructed and on original held-out sequences of the classifier trained on
        reconstructed training sequences."""
        labels = self.ds.labels
        clf = self.fit_classifier(train_features)
        return (clf.accuracy(test_features, labels[self.test_idx]),
                clf.accuracy(self.original_test, labels[self.test_idx]))


def _store(rows: int, length: int, width: int, in_memory: bool) -> ReducedCache:
    """``rows`` rows of ``[length, width]`` float32, in memory or in a temporary file."""
    return ReducedCache(rows, length, width, torch.zeros(0, dtype=torch.long), None, in_memory=in_memory)


def rank_key(p: PairResult) -> tuple[float, float]:
    """How pairs are ranked: accuracy on real held-out sequences first, then R^2 (NaN last)."""
    def num(v: float | None) -> float:
        return -math.inf if v is None or math.isnan(v) else v
    return num(p.accuracy_on_real), num(p.r2)


def analyze(data: str | os.PathLike[str] | Dataset, lengths: Sequence[int], *,
            reducers: Sequence[str] | None = None, upsamplers: Sequence[str] | None = None,
            holdout: float = 0.25, seed: int = 0, pool_positions: int = DEFAULT_POOL_POSITIONS,
            config: Any = None, upsampler_epochs: int | None = DEFAULT_UPSAMPLER_EPOCHS,
            optimum: bool = True, all_pairs: bool = False, batch_rows: int | None = None,
            max_clips: int | None = DEFAULT_MAX_CLIPS, memory_budget: int | None = None,
            log: Callable[[str], None] | None = None) -> AnalysisResult:
    """Measure every reducer/upsampler pair at every length on a held-out split (module docstring).

    Args:
        data: a dataset path or an open :class:`Dataset`.
        lengths: training lengths to analyse (each in ``1..L``).
        reducers / upsamplers: names to restrict to (default: every registered one).
        holdout: fraction of each class held out for measuring (stratified, by ``seed``).
        pool_positions: ``P`` of the classifier's pooled features.
        config: a config (path, text or mapping) for component settings; default: schema defaults.
        upsampler_epochs: cap on ``generator_upsampler_epochs`` for trainable upsamplers (None = no cap).
        optimum: also compute the linear optimum (position PCA) reference.
        all_pairs: also pair non-positional reducers (``pca``) with interpolating upsamplers.
        batch_rows: sequences per streamed batch (default: about 32 MiB of float32, as training reads).
        max_clips: analyse a seeded sample of at most this many clips, each class in proportion (``None``: all);
            what it holds grows with the clips analysed, so this bounds its memory and time. The result says so.
        memory_budget: bytes (default: :func:`~feda2v_toolkit.runtime.resources.memory_budget`); the reduced
            clips and each classifier's training features stay in memory up to an eighth of it each (else in
            temporary files), and the pairs that share one read of the held-out clips keep their held-out
            features in at most an eighth (one pair at a time at the least): the same figures at any budget.
        log: called with progress messages.
    """
    from feda2v_toolkit.runtime.threads import settle_vector_math

    settle_vector_math()  # the same bytes on every run (runtime.threads)
    t_start = time.perf_counter()
    say = log or (lambda _m: None)
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    wanted = _check_lengths(ds, lengths)
    if pool_positions < 1:
        raise UsageError(f"--pool-positions must be >= 1, got {pool_positions}")
    reducer_names = _names("reducer", reducers)
    upsampler_names = _names("upsampler", upsamplers)
    cfg = resolve_config(config)
    cfg["generator_seed"] = seed
    notes: list[str] = []
    configured_epochs = int(cfg.get("generator_upsampler_epochs", 0) or 0)
    if upsampler_epochs is not None and configured_epochs > upsampler_epochs:
        cfg["generator_upsampler_epochs"] = int(upsampler_epochs)
    total = len(ds)
    if max_clips is not None:
        if max_clips < 1:
            raise UsageError(f"--max-clips must be >= 1, got {max_clips}")
        if total > max_clips:
            ds = ds.subset(proportional_sample(ds.labels, max_clips, derive_seed(seed, "analyze-sample")))
            notes.append(f"analysed a seeded sample of {len(ds)} of the {total} clips, each class in proportion "
                         f"(--max-clips {max_clips})")
            say(notes[-1])
    train_idx, test_idx = _split(ds, holdout, seed)
    say(f"{len(ds)} sequences [{ds.seq_len}, {ds.dim}]: {train_idx.numel()} to fit, {test_idx.numel()} held out; "
        f"lengths {', '.join(map(str, wanted))}")
    from feda2v_toolkit.runtime.resources import memory_budget as default_budget

    budget = default_budget() if memory_budget is None else int(memory_budget)
    run = _Run(ds, wanted, reducer_names, upsampler_names, cfg, train_idx, test_idx, seed, pool_positions,
               batch_rows or read_chunk_rows(ds), optimum, say, all_pairs, budget)
    run.fit_reducers()
    t0 = time.perf_counter()
    run.reduce_all()
    say(f"reduced every sequence with {len(run.reducers)} reducer/length combinations: "
        f"{time.perf_counter() - t0:.1f}s")
    assert run.original_train is not None
    labels = ds.labels
    baseline = run.fit_classifier(run.original_train).accuracy(run.original_test, labels[test_idx])
    run.original_train.close()  # before the upsamplers are fitted
    run.original_train = None
    run.fit_upsamplers()
    trainable = [u for u, cls in run.upsampler_classes.items() if cls.trainable]
    if trainable:
        epochs = cfg.get("generator_upsampler_epochs")
        notes.append(f"trainable upsamplers ({', '.join(trainable)}) were fitted on the {train_idx.numel()} "
                     f"training sequences with generator_upsampler_epochs = {epochs}"
                     + (f" (capped from {configured_epochs} for analyze; train uses the configured count)"
                        if epochs != configured_epochs else ""))
    t0 = time.perf_counter()
    per_read = max(1, run.share // max(1, run.original_test.numel() * 4))  # pairs whose held-out features fit
    results: dict[tuple[str, int, str], PairResult] = {}
    try:
        for (rname, length), combos in run.groups().items():
            for k in range(0, len(combos), per_read):
                results.update(run.measure_group(combos[k:k + per_read]))
            say(f"measured {len(combos)} pair(s) after {rname} at length {length}: {time.perf_counter() - t0:.1f}s")
    finally:
        run.close()
    if run.skipped:
        notes.append("skipped (the reducer's output is not positional, so only trainable upsamplers can decode "
                     "it; --all-pairs includes them): "
                     + ", ".join(f"{r} + {u}" for r, u in sorted(run.skipped)))
    optimum_rows = [results[(OPTIMUM, length, "inverse")] for length in wanted] if optimum else []
    best_r2 = {row.length: row.r2 for row in optimum_rows}
    pairs = []
    for key, row in results.items():
        if key[0] == OPTIMUM:
            continue
        if row.length in best_r2 and best_r2[row.length] > 0:
            row.r2_vs_optimum = row.r2 / best_r2[row.length]
        pairs.append(row)
    pairs.sort(key=lambda r: (reducer_names.index(r.reducer), upsampler_names.index(r.upsampler), r.length))
    explained = {length: run.pca.explained(length) for length in wanted} if run.pca is not None else {}
    recommended = {length: best for length in wanted
                   if (best := max((p for p in pairs if p.length == length), key=rank_key, default=None))}
    return AnalysisResult(
        data=str(ds.path), sequences=total, seq_len=ds.seq_len, dim=ds.dim, class_names=list(ds.class_names),
        train=int(train_idx.numel()), heldout=int(test_idx.numel()), seed=seed, lengths=wanted,
        reducers=reducer_names, upsamplers=upsampler_names, pool_positions=min(pool_positions, ds.seq_len),
        upsampler_epochs=cfg.get("generator_upsampler_epochs") if trainable else None,
        baseline_accuracy=baseline, optimum=optimum_rows, pairs=pairs, explained_variance=explained,
        seconds=time.perf_counter() - t_start, notes=notes, recommended=recommended)
