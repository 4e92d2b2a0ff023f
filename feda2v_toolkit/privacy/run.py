"""What a differentially private training run releases, from its config and components: the pipeline's entry.

The pipeline calls, before anything is computed::

    settings = DPSettings.from_config(cfg)                # None: the run is not private
    stages = settings.stages(num_classes=C, seq_len=l, dim=D)
    specs = declare_releases(settings, stages, reducer=reducer, upsampler=upsampler, generator_cls=gen_cls,
                             normalize=cfg["generator_normalize"], keys=keys, records=N,
                             epochs=E, batch_size=B)
    plan = plan_budget(specs, settings.epsilon, settings.delta, N)   # refuses impossible targets
    rng, ledger = secret_generator(), PrivacyLedger(settings.delta)

then each stage as ``docs/privacy.md`` lists (counts first; a trained generator's DP-SGD releases are
re-planned from the noisy counts with :func:`replan_sgd`). Anything a run would release that has no DP
version -- a fitted reducer or trainable upsampler without one, a closed-form plugin generator, a trained
type that declares no private modules -- is refused here, up front, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feda2v_toolkit.privacy.accounting import BudgetPlan, plan_budget
from feda2v_toolkit.privacy.sgd import dp_sgd_release
from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec, data_independent, dp_requested
from feda2v_toolkit.privacy.statistics import (
    DPClassCounts,
    DPGaussian,
    DPLeastSquares,
    DPNormalization,
    DPPositionPCA,
)

#: the config keys of differential privacy (fragment ``privacy``: ``feda2v_toolkit/schemas/privacy.schema.json``)
KEYS = ("generator_dp_epsilon", "generator_dp_delta", "generator_dp_clip", "generator_dp_normalization",
        "generator_dp_normalization_scale", "generator_dp_basis_features", "generator_dp_shared_scatter",
        "generator_dp_max_grad_norm", "generator_dp_budget_weights")


@dataclass
class DPSettings:
    """The privacy settings of a run (``generator_dp_*`` keys)."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    normalization: str = "dp"
    normalization_scale: str = "global"
    basis_features: int = 128
    shared_scatter: bool = True
    max_grad_norm: float = 1.0
    weights: dict[str, float] = field(default_factory=dict)
    #: a public dataset (``generator_dp_public_data``) that fits what needs no privacy (docs/privacy.md)
    public_data: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DPSettings | None:
        """``None`` when ``generator_dp_epsilon`` is null (or absent): no differential privacy."""
        if not dp_requested(cfg):
            return None
        eps = cfg["generator_dp_epsilon"]
        s = cls(float(eps), float(cfg.get("generator_dp_delta", 1e-5)), float(cfg.get("generator_dp_clip", 1.0)),
                str(cfg.get("generator_dp_normalization", "dp")),
                str(cfg.get("generator_dp_normalization_scale", "global")),
                int(cfg.get("generator_dp_basis_features", 128)), bool(cfg.get("generator_dp_shared_scatter", True)),
                float(cfg.get("generator_dp_max_grad_norm", 1.0)),
                {str(k): float(v) for k, v in (cfg.get("generator_dp_budget_weights") or {}).items()},
                str(cfg["generator_dp_public_data"]) if cfg.get("generator_dp_public_data") else None)
        s.check()
        return s

    def check(self) -> None:
        """Refuse bad settings with the reason (the delta-versus-N check is :func:`plan_budget`'s)."""
        if not (math.isfinite(self.epsilon) and self.epsilon > 0) and not (math.isinf(self.epsilon) and self.epsilon > 0):
            raise PrivacyError(f"generator_dp_epsilon must be > 0 (got {self.epsilon})")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"generator_dp_delta must be in (0, 1) (got {self.delta})")
        for key, value in (("generator_dp_clip", self.clip), ("generator_dp_max_grad_norm", self.max_grad_norm)):
            if not (math.isfinite(value) and value > 0):
                raise PrivacyError(f"{key} must be > 0 (got {value}): a non-positive clip norm cannot bound a clip")
        bad = {k: v for k, v in self.weights.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise PrivacyError(f"generator_dp_budget_weights must be positive numbers (got {bad})")

    def stages(self, *, num_classes: int, seq_len: int, dim: int) -> PrivateStages:
        w: dict[str, dict[str, float]] = {}
        for name, value in self.weights.items():
            stage, _, key = name.partition(".")
            w.setdefault(stage, {})[key] = value
        counts = DPClassCounts(num_classes, **({"weight": w["classes"]["counts"]}
                                               if "counts" in w.get("classes", {}) else {}))
        return PrivateStages(
            counts=counts,
            normalization=DPNormalization("public" if self.public_data else self.normalization,
                                          scale=self.normalization_scale, weights=w.get("normalization")),
            gaussian=DPGaussian(seq_len, dim, clip=self.clip, max_features=self.basis_features,
                                shared_scatter=self.shared_scatter, weights=w.get("gaussian"),
                                normalized=self.normalization == "dp" or bool(self.public_data),
                                public_basis=bool(self.public_data)),
            lstsq=DPLeastSquares(weights=w.get("lstsq")), pca=DPPositionPCA(weights=w.get("pca")))


@dataclass
class PrivateStages:
    """The DP statistic of each stage, configured (see :mod:`feda2v_toolkit.privacy.statistics`)."""

    counts: DPClassCounts
    normalization: DPNormalization
    gaussian: DPGaussian
    lstsq: DPLeastSquares
    pca: DPPositionPCA


def _is(obj: Any, dotted: str) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    return any(f"{c.__module__}.{c.__qualname__}" == dotted for c in cls.__mro__)


def declare_releases(settings: DPSettings, stages: PrivateStages, *, reducer: Any, upsampler: Any, generator_cls: type,
                     normalize: bool, keys: Sequence[str], records: int, epochs: int, batch_size: int,
                     conditioning: str | None = None, generator: Any = None,
                     config: Mapping[str, Any] | None = None) -> list[ReleaseSpec]:
    """Every release of a run, or a :class:`PrivacyError` naming what cannot be protected.

    ``reducer`` / ``upsampler``: the run's component objects (or classes); ``generator_cls`` its generator type
    (``generator``: one instance, to ask a trained type for its private modules); ``keys`` its generator keys.
    A trained generator's DP-SGD releases are provisional here (sampling rate from ``records / len(keys)``
    clips per key); :func:`replan_sgd` fixes them from the noisy counts before training."""
    specs = list(stages.counts.releases())
    public = bool(settings.public_data)
    # the reducer
    if public and getattr(reducer, "fitted", False):
        specs.append(data_independent(f"reducer.{_name(reducer)}.public_data"))  # fitted on public clips only
    elif not getattr(reducer, "fitted", False):
        specs.append(data_independent(f"reducer.{_name(reducer)}"))
    elif _is(reducer, "feda2v_toolkit.reducers.pca.PCAReducer"):
        specs += stages.pca.releases()
    else:
        raise PrivacyError(f"the fitted reducer {_name(reducer)} has no differentially private version: it would "
                           "release statistics of the clips unprotected; use adaptive_avg (data-independent) or pca, or fit it on "
                           "public clips (generator_dp_public_data)")
    # normalisation
    specs += stages.normalization.releases() if normalize else [data_independent("normalization.off")]
    # the upsampler
    if public and getattr(upsampler, "trainable", False):
        specs.append(data_independent(f"upsampler.{_name(upsampler)}.public_data"))  # fitted on public clips only
    elif not getattr(upsampler, "trainable", False):
        specs.append(data_independent(f"upsampler.{_name(upsampler)}"))
    elif _is(upsampler, "feda2v_toolkit.upsamplers.lstsq.LeastSquaresUpsampler"):
        specs += stages.lstsq.releases()
    else:
        raise PrivacyError(f"the trainable upsampler {_name(upsampler)} has no differentially private version: its "
                           "weights would be fitted on the clips unprotected; use lstsq, expand, linear or nearest, or fit it on "
                           "public clips (generator_dp_public_data)")
    # the generator
    if getattr(generator_cls, "fitted", False):
        if not _is(generator_cls, "feda2v_toolkit.generators.gaussian.GaussianGenerator"):
            raise PrivacyError(f"the closed-form generator type {generator_cls.__name__} has no differentially private "
                               "statistics; use gaussian, or a type trained by gradient descent (DP-SGD)")
        if conditioning == "embedding":
            raise PrivacyError("a gaussian generator conditioned on per-sample condition embeddings has no "
                               "differentially private statistics (its regression reads every clip's embedding); "
                               "set gaussian_conditioned to false or drop the conditions")
        specs += stages.gaussian.releases()
    else:
        try:
            declared = generator.private_modules(config or {}) if generator is not None else None
        except ValueError as exc:
            raise PrivacyError(f"{generator_cls.__name__} cannot train with differential privacy in this "
                               f"configuration: {exc}") from None
        if (generator is not None and declared is None) or \
                getattr(generator_cls, "private_modules", None) is _base_private_modules():
            raise PrivacyError(f"generator type {generator_cls.__name__} does not support differentially private "
                               "training: it declares no private modules (Generator.private_modules)")
        per_key = max(records / max(len(keys), 1), 1.0)
        steps = int(generator.private_steps_per_batch(config or {})) if generator is not None else 1
        for key in keys:
            specs.append(dp_sgd_release(key, epochs=epochs, records=per_key, batch_size=batch_size,
                                        steps_per_batch=steps, max_grad_norm=settings.max_grad_norm,
                                        grouped=len(keys) > 1))
    return _apply_weights(specs, settings.weights)


def _base_private_modules() -> Any:
    from feda2v_toolkit.components import Generator

    return Generator.private_modules


def _name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def _apply_weights(specs: list[ReleaseSpec], weights: Mapping[str, float]) -> list[ReleaseSpec]:
    names = {s.name for s in specs}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise PrivacyError(f"generator_dp_budget_weights names releases this run does not make: {', '.join(unknown)} "
                           f"(it makes: {', '.join(sorted(n for n in names))})")
    return [s.with_(weight=weights[s.name]) if s.name in weights else s for s in specs]


def replan_sgd(plan: BudgetPlan, specs: Sequence[ReleaseSpec], made: Mapping[str, float], key_records: Mapping[str, float],
               *, epochs: int, batch_size: int, steps_per_batch: int, max_grad_norm: float) -> tuple[BudgetPlan, list[ReleaseSpec]]:
    """After the early releases (``made``: name -> the multiplier used, e.g. the class counts), fix each
    generator key's DP-SGD release from its noisy clip count and re-calibrate what is not made yet, so the
    whole run still spends exactly the target."""
    out = []
    for s in specs:
        if s.name.startswith("generator.") and s.name.endswith(".sgd"):
            key = s.name[len("generator."):-len(".sgd")]
            new = dp_sgd_release(key, epochs=epochs, records=key_records[key], batch_size=batch_size,
                                 steps_per_batch=steps_per_batch, max_grad_norm=max_grad_norm,
                                 weight=s.weight, grouped=s.group is not None)
            out.append(new)
        else:
            out.append(s)
    return plan_budget(out, plan.epsilon, plan.delta, plan.n_records, fixed=made), out
