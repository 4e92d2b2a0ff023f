"""Record-level differential privacy in the one training pipeline (docs/privacy.md).

With ``generator_dp_epsilon`` set, every stage whose release depends on the clips runs through here:

* **Planning** (:func:`make_plan`): the releases of the run are declared from its config and the public
  shapes (:func:`feda2v_toolkit.privacy.run.declare_releases`) and the noise of each is calibrated for the
  target (epsilon, delta) by the PLD accountant, before any clip is read. The plan depends on nothing but
  public facts, so the pipeline and every site compute the same one; a site checks the target against its
  own clip count (delta < 1/N) and refuses what cannot be protected.
* **Sites** (:class:`SitePrivacy`): every release leaves a site already noised with the full noise of the
  plan (no trusted server): clipped per-clip contributions, Gaussian noise from a secret generator, one
  ledger entry per release. A site's ledger is its guarantee: a clip lives at one site, so the run's
  guarantee is the largest over its sites.
* **The pipeline** (:class:`PrivatePipeline`): sums the sites' noisy parts and post-processes them (clip norms
  from noisy histograms, means over noisy counts, the gaussian's basis and fits) -- post-processing never
  reads a clip, so it costs nothing.

Trained generators run DP-SGD at each site (:meth:`SitePrivacy.train`): Poisson batches from secret
randomness, per-clip gradients clipped and noised (Opacus, or the ghost engine), every step in the ledger;
its noise is re-calibrated from the site's own noisy counts so that the site spends exactly its target.
What a private run does not release: exact counts (the pipeline sees noisy ones), held-out losses and
reconstruction errors, training losses (they are functions of the clips).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.errors import InputError
from feda2v_toolkit.privacy.accounting import BudgetPlan, PrivacyLedger, check_target, plan_budget
from feda2v_toolkit.privacy.mechanism import row_norms, secret_generator
from feda2v_toolkit.privacy.run import DPSettings, PrivateStages, declare_releases, replan_sgd
from feda2v_toolkit.privacy.spec import PrivacyError
from feda2v_toolkit.privacy.statistics import DPNormQuantile, NoisyCounts, privatize
from feda2v_toolkit.runtime.linalg import eigh
from feda2v_toolkit.training.spec import RunSpec

Arrays = dict[str, Tensor]
Meta = dict[str, Any]

#: before the noisy counts are known, DP-SGD is planned as if every generator had this many batches of clips
#: per epoch (public); each site then re-calibrates its DP-SGD noise from its own noisy counts
PROVISIONAL_BATCHES = 8
#: the mechanism as the model file names it (closed-form statistics; trained types add DP-SGD)
MECHANISM = "record-level (epsilon, delta)-DP: Gaussian mechanism on clipped per-clip contributions"


@dataclass
class PrivatePlan:
    """What every party of a private run computes alike from the config and the public shapes."""

    settings: DPSettings
    stages: PrivateStages
    specs: list[Any]
    plan: BudgetPlan
    keys: list[str]
    key_rows: list[list[int]]
    class_names: list[str]
    conditioned: bool
    fitted: bool
    reducer_private: bool
    upsampler_private: bool
    seq_len: int
    dim: int

    @property
    def epsilon(self) -> float:
        return self.settings.epsilon

    def noise_std(self, name: str, sensitivity: float | None = None, sites: int = 1) -> float:
        """The std of the noise on release ``name`` summed over ``sites`` sites (each adds the full noise)."""
        return self.plan.noise_std(name, sensitivity) * math.sqrt(sites)


def settings_of(spec: RunSpec) -> DPSettings | None:
    """The run's DP settings (``None``: no differential privacy); bad settings raise :class:`PrivacyError`."""
    return DPSettings.from_config(spec.config)


def make_plan(spec: RunSpec, settings: DPSettings, *, full_length: int, dim: int, class_names: Sequence[str],
              groups: Mapping[str, Sequence[str]], condition_dim: int = 0, epochs: int = 1,
              n_records: int = 1) -> PrivatePlan:
    """Declare every release of the run and calibrate the noise (module docstring). ``n_records``: a site's
    clip count, for the delta check (the pipeline passes 1: it does not know the sites' counts)."""
    from feda2v_toolkit.plugins import get_registry

    registry = get_registry()
    length = spec.training_length
    reducer = registry.load("reducer", spec.reducer).from_config(spec.config, length=length, full_length=full_length,
                                                                 dim=dim)
    upsampler = registry.load("upsampler", spec.upsampler).from_config(spec.config, reduced_length=length,
                                                                       full_length=full_length, dim=dim)
    gen_cls = registry.load("generator", spec.generator_type)
    fitted = bool(getattr(gen_cls, "fitted", False))
    with torch.device("meta") if not fitted else nullcontext():
        generator = gen_cls.from_config(spec.config, seq_len=length, dim=dim, num_classes=len(class_names),
                                        condition_dim=condition_dim)
    conditioning = getattr(generator, "conditioning", None)
    stages = settings.stages(num_classes=len(class_names), seq_len=length, dim=dim)
    keys = list(groups)
    specs = declare_releases(settings, stages, reducer=reducer, upsampler=upsampler, generator_cls=gen_cls,
                             normalize=spec.normalize, keys=keys,
                             records=PROVISIONAL_BATCHES * spec.batch_size * max(len(keys), 1),
                             epochs=epochs, batch_size=spec.batch_size, conditioning=conditioning,
                             generator=None if fitted else generator, config=spec.config)
    if not spec.normalize and fitted:
        raise PrivacyError("generator_normalize: false with differential privacy: the gaussian's clip norm is set "
                           "for the normalised space; keep normalisation on (generator_dp_normalization: fixed "
                           "spends nothing)")
    index = {c: i for i, c in enumerate(class_names)}
    plan = plan_budget(specs, settings.epsilon, settings.delta, max(int(n_records), 1))
    return PrivatePlan(settings, stages, specs, plan, keys, [[index[c] for c in groups[k]] for k in keys],
                       list(class_names), conditioning == "label", fitted,
                       bool(getattr(reducer, "fitted", False)), bool(getattr(upsampler, "trainable", False)),
                       length, dim)


# -- a site -------------------------------------------------------------------------------------------

class SitePrivacy:
    """One site's side of a private run: its plan, secret noise, ledger and own noisy counts."""

    def __init__(self, plan: PrivatePlan, n_records: int, where: str, rng: torch.Generator | None = None) -> None:
        """``rng``: the secret noise generator (default: a new one from the OS's randomness); the data-parallel
        ranks of one site share one, so that each release is noised once, alike on every rank."""
        try:
            check_target(plan.epsilon, plan.settings.delta, max(int(n_records), 1)) \
                if math.isfinite(plan.epsilon) else None
        except PrivacyError as e:
            raise PrivacyError(f"{where}: {e}") from None
        self.plan = plan
        self.rng = rng if rng is not None else secret_generator()
        self.ledger = PrivacyLedger(plan.settings.delta)
        for spec in plan.specs:  # choices made without the clips: in the ledger, spending nothing
            if not spec.data_dependent:
                self.ledger.record(spec.name, 0.0, data_dependent=False)
        self.counts: NoisyCounts | None = None
        self.sgd_plan: BudgetPlan | None = None
        self.where = where

    def release(self, part: Mapping[str, Tensor], stage: str, sensitivities: Mapping[str, float] | None = None
                ) -> Arrays:
        """``part`` noised as the plan's ``stage.*`` releases, recorded in the ledger."""
        return privatize(part, self.plan.plan, stage, self.rng, self.ledger, sensitivities=sensitivities)

    def answer(self, step: str, x: Tensor | None, labels: Tensor | None, arrays: Mapping[str, Tensor],
               meta: Mapping[str, Any], full: Any = None, pairs: Any = None) -> Arrays:
        """The site's noisy part for ``step`` of :class:`PrivatePipeline`: :meth:`local` over all of its training
        clips, then :meth:`release_step`."""
        return self.release_step(step, self.local(step, x, labels, arrays, meta, full, pairs), meta)

    def local(self, step: str, x: Tensor | None, labels: Tensor | None, arrays: Mapping[str, Tensor],
              meta: Mapping[str, Any], full: Any = None, pairs: Any = None) -> Arrays:
        """The exact (not yet noised) part of ``step`` over some of the site's training clips: ``x`` their rows
        of the reduced cache (raw before the normalisation, normalised after it), ``labels`` their classes,
        ``full()`` / ``pairs()`` stream their full sequences / (reduced, full) pairs. Every part is a sum over
        clips, so the parts of disjoint blocks of clips add up to the part of all of them (float64)."""
        st = self.plan.stages
        if step == "counts":
            assert labels is not None
            return st.counts.local(labels)
        assert x is not None or step.startswith(("pca.", "lstsq."))
        if step == "pca.norms":
            return {"norm_histogram": _histogram(st.pca.norms, full)}
        if step == "pca.stats":
            return st.pca.local_stats(full, float(meta["clip"]))
        if step == "normalization.norms":
            return st.normalization.local_norms(x)
        if step == "normalization.sum":
            return st.normalization.local_sum(x, float(meta["clip"]))
        if step == "normalization.deviations":
            return st.normalization.local_deviation_norms(x, arrays["mean"])
        if step == "normalization.sum_sq":
            return st.normalization.local_sum_sq(x, arrays["mean"], float(meta["clip"]))
        if step == "lstsq.norms":
            fn, rn = [], []
            for reduced, whole in pairs():
                fn.append(row_norms(whole))
                rn.append(row_norms(reduced))
            empty = torch.zeros(0, dtype=torch.float64)
            return st.lstsq.local_norms(torch.cat(fn) if fn else empty, torch.cat(rn) if rn else empty)
        if step == "lstsq.stats":
            return st.lstsq.local_stats(pairs, float(meta["clip_full"]), float(meta["clip_reduced"]),
                                        self.plan.seq_len, int(meta["full_length"]), self.plan.dim)
        assert labels is not None and x is not None
        keep = meta_kept(meta)[labels.long()] > 0
        z, lab = x[keep], labels[keep]
        if step == "gaussian.norms":
            return st.gaussian.norms.local(row_norms(z))
        if step == "gaussian.basis":
            return st.gaussian.local_basis(z, float(meta["clip"]))
        if step == "gaussian.stats":
            row_of_key = {c: g for g, rows in enumerate(self.plan.key_rows) for c in rows}
            keys = torch.tensor([row_of_key[int(c)] for c in lab.tolist()], dtype=torch.long)
            return st.gaussian.local_stats(z, lab, keys, arrays["v"].to(torch.float64), float(meta["clip_u"]),
                                           float(meta["clip"]), len(self.plan.class_names), len(self.plan.keys))
        raise ValueError(f"unknown private step {step!r}")

    def release_step(self, step: str, part: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Arrays:
        """``part`` (the :meth:`local` part of ``step`` over all of the site's training clips) noised once as
        the plan says, with the sensitivities of the clip norms in ``meta``, and recorded in the ledger."""
        stage, sens = _RELEASES[step.partition(".")[0] if step != "counts" else "counts"], None
        if step == "pca.stats":
            c = float(meta["clip"])
            sens = {"sum": c, "outer": c * c}
        elif step == "normalization.sum":
            sens = {"sum": float(meta["clip"])}
        elif step == "normalization.sum_sq":
            sens = {"sum_sq": float(meta["clip"]) ** 2}
        elif step == "lstsq.stats":
            sens = self.plan.stages.lstsq.sensitivities(float(meta["clip_full"]), float(meta["clip_reduced"]))
        elif step == "gaussian.basis":
            sens = {"basis": float(meta["clip"]) ** 2}
        elif step == "gaussian.stats":
            clip_u = float(meta["clip_u"])
            sens = {"sums": clip_u, "scatter": clip_u ** 2, "square": float(meta["clip"]) ** 2}
        noisy = self.release(part, stage, sens)
        if step == "counts":  # its own noisy counts: DP-SGD plans from them
            self.counts = self.plan.stages.counts.finish(noisy, self.plan.plan)
        return noisy

    # -- DP-SGD -------------------------------------------------------------------------------------
    def key_records(self) -> dict[str, float]:
        """Each generator key's clips at this site, as its own noisy counts say (post-processing)."""
        if self.counts is None:
            raise PrivacyError(f"{self.where}: DP-SGD before the class counts were released")
        return {k: float(self.counts.noisy[rows].sum()) for k, rows in zip(self.plan.keys, self.plan.key_rows,
                                                                            strict=True)}

    def trains(self, key: str) -> bool:
        """Whether this site trains ``key`` (its noisy clip count stands above the counts' threshold)."""
        assert self.counts is not None
        return self.key_records()[key] >= self.counts.threshold

    def sgd(self, epochs: int, batch_size: int, steps_per_batch: int) -> BudgetPlan:
        """The site's plan with DP-SGD re-calibrated from its noisy counts (what the statistics did not spend)."""
        if self.sgd_plan is None:
            made = {name: e.events[0][0] for name, e in self.ledger.entries.items() if e.data_dependent and e.events}
            records = {k: max(v, 1.0) for k, v in self.key_records().items()}
            if math.isinf(self.plan.epsilon):
                made = {}
            self.sgd_plan, _ = replan_sgd(self.plan.plan, self.plan.specs, made, records, epochs=epochs,
                                          batch_size=batch_size, steps_per_batch=steps_per_batch,
                                          max_grad_norm=self.plan.settings.max_grad_norm)
        return self.sgd_plan

    # -- persistence -----------------------------------------------------------------------------------
    def to_store(self) -> Arrays:
        doc = {"ledger": self.ledger.to_json(),
               "counts": None if self.counts is None else self.counts.noisy.tolist(),
               "threshold": None if self.counts is None else self.counts.threshold,
               "noise_std": None if self.counts is None else self.counts.noise_std}
        return {"privacy": torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)}

    def load_store(self, store: Mapping[str, Tensor]) -> None:
        if "privacy" not in store:
            return
        doc = json.loads(bytes(store["privacy"].tolist()).decode())
        self.ledger = PrivacyLedger.from_json(doc["ledger"])
        if doc["counts"] is not None:
            noisy = torch.tensor(doc["counts"], dtype=torch.float64)
            self.counts = NoisyCounts(noisy, torch.where(noisy >= doc["threshold"], noisy.round(),
                                                         torch.zeros_like(noisy)), doc["threshold"], doc["noise_std"])


#: the plan's stage of each private step's releases (by the step's first name)
_RELEASES = {"counts": "classes", "pca": "pca", "normalization": "normalization", "lstsq": "lstsq",
             "gaussian": "gaussian"}


def meta_kept(meta: Mapping[str, Any]) -> Tensor:
    return torch.tensor(meta["kept"], dtype=torch.float64)


def _histogram(q: DPNormQuantile, full: Any) -> Tensor:
    norms = [row_norms(x) for x in full()]
    return q.local(torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64))["norm_histogram"]


# -- public data -------------------------------------------------------------------------------------

class PublicReference:
    """Clips that are public (``generator_dp_public_data``): the pipeline fits on them what needs no privacy --
    a fitted reducer, the normalisation, a trainable upsampler, the gaussian's feature basis -- so those
    spend nothing. Read by the pipeline only; what it fits travels as any public parameter does."""

    def __init__(self, path: str, spec: RunSpec, full_length: int, dim: int) -> None:
        from feda2v_toolkit.data.open import open_dataset

        self.ds = open_dataset(path)
        if (self.ds.seq_len, self.ds.dim) != (full_length, dim):
            raise InputError(f"{path}: generator_dp_public_data has sequences [{self.ds.seq_len}, {self.ds.dim}], "
                             f"the training data [{full_length}, {dim}]")
        if len(self.ds) < 2:
            raise InputError(f"{path}: generator_dp_public_data needs at least 2 clips")
        self.spec = spec
        self.rows = torch.arange(len(self.ds))
        self.reduced: Tensor | None = None
        self.norm: dict[str, Tensor] | None = None

    def fit_reducer(self, reducer: Any) -> None:
        from feda2v_toolkit.training.stages import FittedStatisticsStage, has_statistics
        from feda2v_toolkit.training.streams import full_batches

        if has_statistics(reducer):
            stage = FittedStatisticsStage()
            stage.finish(reducer, stage.local(reducer, full_batches(self.ds, self.rows)))
        else:
            reducer.fit(full_batches(self.ds, self.rows))

    def reduce(self, reducer: Any) -> Tensor:
        from feda2v_toolkit.training.streams import reduce_dataset

        if self.reduced is None:
            self.reduced = reduce_dataset(self.ds, reducer)
        return self.reduced

    def normalization(self, reducer: Any) -> dict[str, Tensor]:
        from feda2v_toolkit.training.stages import NormalizationStage

        stage = NormalizationStage()
        self.norm = stage.finish(stage.local(self.reduce(reducer), self.rows))
        return self.norm

    def fit_upsampler(self, upsampler: Any, reducer: Any) -> dict[str, Any]:
        from feda2v_toolkit.training.stages import FittedStatisticsStage, has_statistics
        from feda2v_toolkit.training.streams import read_chunk_rows, upsampler_pairs

        rows = max(1, min(self.spec.batch_size, read_chunk_rows(self.ds)))
        pairs = upsampler_pairs(self.ds, self.rows, self.reduce(reducer).__getitem__, rows, self.spec.seed, 0)
        if has_statistics(upsampler):
            stage = FittedStatisticsStage()
            return stage.finish(upsampler, stage.local(upsampler, pairs)) or {}
        return upsampler.fit(pairs, config=self.spec.config) or {}

    def basis(self, normalization: Mapping[str, Tensor], reducer: Any, features: int) -> tuple[Tensor, Tensor]:
        """The top ``features`` directions of the public clips' token scatter in the normalised space, with
        their variance per clip."""
        z = ((self.reduce(reducer).double() - normalization["mean"].double()) / normalization["std"].double())
        tokens = z.reshape(-1, z.shape[-1])
        evals, evecs = eigh(tokens.T @ tokens)
        k = max(1, min(int(features), z.shape[-1]))
        return evecs.flip(1)[:, :k], (evals.flip(0)[:k] / z.shape[0]).clamp(min=0)


# -- the pipeline ---------------------------------------------------------------------------------------

class PrivatePipeline:
    """The pipeline's side: one exchange per private step, the noisy parts summed and post-processed."""

    def __init__(self, plan: PrivatePlan, exchange: Any, sites: int, say: Any,
                 public: PublicReference | None = None) -> None:
        """``exchange(step, arrays, meta) -> (merged part, {site name: ledger JSON})`` asks every site."""
        self.plan, self.exchange, self.sites, self.say, self.public = plan, exchange, sites, say, public
        self.counts: NoisyCounts | None = None
        self.ledgers: dict[str, Any] = {}  # each site's ledger as its last reply carried it

    def ask(self, step: str, arrays: Arrays, meta: Meta) -> Arrays:
        merged, ledgers = self.exchange(step, arrays, meta)
        self.ledgers.update(ledgers)
        return merged

    def summary(self) -> dict[str, Any]:
        """``metrics["privacy"]`` from the sites' ledgers as they stand now (DP-SGD steps included)."""
        self.ask("ledger", {}, {})
        return summarise(self.plan, self.ledgers, self.counts)

    def _std(self, name: str, sensitivity: float | None = None) -> float:
        return self.plan.noise_std(name, sensitivity, self.sites)

    def counts_step(self) -> NoisyCounts:
        merged = self.ask("counts", {}, {})
        self.counts = self.plan.stages.counts.finish(merged, self.plan.plan, sites=self.sites)
        dropped = [self.plan.class_names[c] for c in range(self.counts.kept.numel()) if self.counts.kept[c] <= 0]
        if len(dropped) == len(self.plan.class_names):
            raise PrivacyError(f"no class has enough clips for epsilon {self.plan.epsilon:g}: every noisy class count "
                               f"is below {self.counts.threshold:.3g}; raise epsilon or gather more clips")
        if dropped:
            self.say(f"privacy: classes {', '.join(map(repr, dropped))} dropped: their noisy counts are below "
                     f"{self.counts.threshold:.3g} (their generators cannot be sampled)")
        if self.plan.fitted:
            self.plan.stages.gaussian.check_classes(self.counts, self.plan.plan, self.plan.class_names)
        return self.counts

    @property
    def records(self) -> float:
        assert self.counts is not None
        return self.counts.records

    def fit_reducer(self, reducer: Any) -> None:
        """A fitted reducer: on the public clips if there are any, else ``pca``'s private statistics."""
        if self.public is not None:
            self.public.fit_reducer(reducer)
            return
        st = self.plan.stages.pca
        hist = self.ask("pca.norms", {}, {})
        clip = st.clip * st.norms.finish(hist, noise_std=self._std("pca.norm_histogram"))
        stats = st.statistics(self.ask("pca.stats", {}, {"clip": clip}), self.records)
        reducer.fit_from_statistics(stats)

    def normalization(self, reducer: Any) -> dict[str, Tensor]:
        st = self.plan.stages.normalization
        if self.public is not None:
            return self.public.normalization(reducer)
        if st.mode == "fixed":
            return st.fixed(self.plan.seq_len, self.plan.dim)
        c1 = st.clip_norm(self.ask("normalization.norms", {}, {}), self._std("normalization.norm_histogram"))
        mean = st.mean(self.ask("normalization.sum", {}, {"clip": c1}), self.records)
        c2 = st.deviation_clip_norm(self.ask("normalization.deviations", {"mean": mean}, {}),
                                    self._std("normalization.deviation_histogram"))
        sq = self.ask("normalization.sum_sq", {"mean": mean}, {"clip": c2})
        return st.finish(mean, sq, self.records, self._std("normalization.sum_sq", c2 * c2))

    def fit_upsampler(self, upsampler: Any, full_length: int, reducer: Any) -> dict[str, Any]:
        """A trainable upsampler: on the public clips if there are any, else ``lstsq``'s private statistics."""
        if self.public is not None:
            return self.public.fit_upsampler(upsampler, reducer)
        st = self.plan.stages.lstsq
        cx, cr = st.clip_norms(self.ask("lstsq.norms", {}, {}), self._std("lstsq.full_histogram"))
        merged = self.ask("lstsq.stats", {}, {"clip_full": cx, "clip_reduced": cr, "full_length": full_length})
        return upsampler.fit_from_statistics(st.statistics(merged, self.records)) or {}

    def fit_gaussians(self, generators: Mapping[str, Any], normalization: Mapping[str, Tensor], reducer: Any
                      ) -> dict[str, dict[str, float]]:
        """Set every closed-form generator from the noisy statistics of the clips normalised by
        ``normalization`` (sent along: the sites standardise their reduced clips first); returns what each
        fit says."""
        from feda2v_toolkit.generators.gaussian import GaussianGenerator

        assert self.counts is not None
        st, counts, plan = self.plan.stages.gaussian, self.counts, self.plan.plan
        kept = {"kept": counts.kept.tolist()}
        norm = {f"norm.{k}": v for k, v in normalization.items()}
        if st.normalized:
            clip = st.public_clip_norm()
        else:
            clip = st.clip * st.norms.finish(self.ask("gaussian.norms", norm, kept),
                                             noise_std=self._std("gaussian.norm_histogram"))
        if self.public is not None:
            v, evals = self.public.basis(normalization, reducer, st.max_features)
        else:
            basis = self.ask("gaussian.basis", norm, {**kept, "clip": clip})
            v, evals = st.finish_basis(basis, self._std("gaussian.basis", clip * clip), counts.total)
        v, evals = st.fit_basis_to_classes(v, evals, counts, plan)
        clip_u = st.basis_clip_norm(evals)
        merged = self.ask("gaussian.stats", {**norm, "v": v}, {**kept, "clip": clip, "clip_u": clip_u})
        fits = st.finish(merged, v, counts.kept, self.plan.key_rows, conditioned=self.plan.conditioned,
                         scatter_noise_std=self._std("gaussian.scatter", clip_u ** 2))
        out: dict[str, dict[str, float]] = {}
        for key, fit in zip(self.plan.keys, fits, strict=True):
            gen = generators[key]
            if not isinstance(gen, GaussianGenerator):
                raise PrivacyError(f"generator {key!r} is not a gaussian generator")
            if fit is None:
                self.say(f"privacy: generator {key!r} left unfitted: all its classes were dropped")
                continue
            out[key] = gen.set_parameters(fit.means, fit.counts, fit.directions, fit.variances, fit.total)
            out[key] = {**{k: float(v) for k, v in out[key].items()}, "basis_features": float(v.shape[1]),
                        "sequences": float(fit.counts.clamp(min=0).sum())}
        self.say(f"privacy: gaussian statistics in a basis of {self.plan.seq_len} positions x {v.shape[1]} feature "
                 f"directions (clip norms {clip:.4g}, {clip_u:.4g} in the basis)")
        return out


def summarise(plan: PrivatePlan, ledgers: Mapping[str, Mapping[str, Any]], counts: NoisyCounts | None
              ) -> dict[str, Any]:
    """``metrics["privacy"]``: the spent (epsilon, delta) -- the largest over sites -- per release and per site."""
    sites = {name: PrivacyLedger.from_json(doc) for name, doc in ledgers.items()}
    spent = {name: led.summary() for name, led in sites.items()}
    worst = max(spent, key=lambda n: _num(spent[n]["epsilon"])) if spent else None
    eps = _num(spent[worst]["epsilon"]) if worst else 0.0
    return {"mechanism": MECHANISM + ("" if plan.fitted else ", DP-SGD (Poisson sampling, per-clip clipping)"),
            "unit": "one clip (record-level)", "epsilon": eps if math.isfinite(eps) else None,
            "delta": plan.settings.delta, "target_epsilon": plan.epsilon if math.isfinite(plan.epsilon) else None,
            "noise": "off (epsilon inf: clipping only, no guarantee)" if math.isinf(plan.epsilon) else "on",
            "accountant": "PLD (dp-accounting)", "rdp_epsilon": _num(spent[worst]["rdp_epsilon"]) if worst else None,
            "releases": spent[worst]["releases"] if worst else {},
            "sites": {n: {"epsilon": _num(s["epsilon"])} for n, s in spent.items()},
            "plan": {"scale": plan.plan.scale, "noise_multipliers": {n: r.noise_multiplier
                                                                     for n, r in plan.plan.releases.items()}},
            "classes_dropped": [] if counts is None else
            [plan.class_names[c] for c in range(counts.kept.numel()) if counts.kept[c] <= 0],
            "noisy_class_counts": None if counts is None else
            {plan.class_names[c]: int(counts.kept[c]) for c in range(counts.kept.numel())}}


def _num(v: Any) -> float:
    return float(v) if not isinstance(v, str) else (math.inf if v == "inf" else -math.inf)


def refuse_resume() -> InputError:
    return PrivacyError("a differentially private run cannot resume from a checkpoint: it would release its "
                        "statistics again and spend the budget twice; start it again (without --resume)")
