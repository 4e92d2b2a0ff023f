"""Budget planning and accounting with Google's ``dp_accounting`` (PLD accountant; RDP as a check).

**Planning, before anything is computed** (:func:`plan_budget`): given every release a run will make
(:class:`~feda2v_toolkit.privacy.spec.ReleaseSpec`) and a target ``(epsilon, delta)``, each data-dependent
release ``i`` gets the noise multiplier ``z_i = s / sqrt(w_i)`` (its noise std is ``z_i`` times its
sensitivity), and the one scale ``s`` is calibrated so that the composition of all releases -- every
composition counted, Poisson sampling amplified -- is exactly ``(epsilon, delta)``-DP under add/remove-one.

Why weights on ``1 / z^2``: for Gaussian releases on the same records, ``1 / z^2`` is what adds up (RDP of
order ``a`` is ``a / (2 z^2)``; ``k`` releases equal one Gaussian with ``z_eff = (sum 1/z_i^2)^(-1/2)``), so
``w_i / sum w`` is release ``i``'s share of the run's *precision*: the variance of its noise is proportional to
``1 / w_i``. A release whose error costs usefulness most (the closed-form generator's class sums) gets a large
weight, a scalar needed to a few percent (a total variance) a small one. The defaults are per stage
(:mod:`feda2v_toolkit.privacy.statistics`), measured in ``bench/bench_dp.py`` and listed in
``docs/privacy.md``. Without Poisson-sampled releases the calibration is closed-form
(``s = z_eff * sqrt(sum_i compositions_i * w_i)`` with ``z_eff = get_sigma_gaussian(epsilon, delta)``) and
exact; with them ``s`` is found by bisection on the PLD accountant.

**Parallel composition**: releases of different ``group`` s (the classes of per-class generators) touch
disjoint records, so a record pays for the group-less releases plus its own group's: the run's epsilon is
the maximum over groups, and ``s`` is calibrated for the most expensive group.

**Accounting, while the run goes** (:class:`PrivacyLedger`): every noise addition is recorded with the
multiplier actually used (DP-SGD: every optimiser step, at the sampling rate actually used); the spent
``(epsilon, delta)`` per release and in total is computed by the PLD accountant over exactly those events
(the RDP accountant's figure is kept beside it as a check). Per-release figures are each release's own
guarantee at the run's delta; the total is their composition, not their sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import dp_accounting
    from dp_accounting import pld, rdp
except ImportError as exc:  # pragma: no cover - the extra is installed by make setup
    from feda2v_toolkit.errors import UsageError

    raise UsageError("differential privacy needs the privacy extra: pip install 'feda2v-tk[privacy]' "
                     "(dp-accounting, opacus)") from exc

from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
#: relative tolerance of the calibrated scale when it is found by bisection (the closed form is exact)
CALIBRATION_RTOL = 1e-3
#: PLD grid while calibrating (10x faster than the default 1e-4; its pessimistic estimate is only larger)
COARSE_GRID = 1e-3


# -- events and epsilons -----------------------------------------------------------------------------

def dp_event(noise_multiplier: float, compositions: int = 1, sampling_rate: float = 1.0) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of a Gaussian release made ``compositions`` times at Poisson rate
    ``sampling_rate`` (``noise_multiplier`` 0 = not private)."""
    if noise_multiplier <= 0:
        return dp_accounting.NonPrivateDpEvent()
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(float(sampling_rate), event)
    if compositions > 1:
        event = dp_accounting.SelfComposedDpEvent(event, int(compositions))
    return event


def _quiet_absl() -> None:
    """RDP's series for fractional orders warns per order at large sampling rates; those orders are skipped."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with dp_accounting
        pass


def epsilon_of(events: Iterable[tuple[float, int, float]], delta: float, accountant: str = "pld", *,
               discretization: float = 1e-4) -> float:
    """Epsilon at ``delta`` of the composition of ``(noise_multiplier, compositions, sampling_rate)`` events
    (add/remove-one). ``accountant``: ``"pld"`` (privacy loss distributions: tight; its pessimistic estimate,
    on a grid of ``discretization`` -- coarser is faster and larger, never smaller) or ``"rdp"``."""
    events = [(float(z), int(c), float(q)) for z, c, q in events if c > 0]
    if not events:
        return 0.0
    if any(z <= 0 for z, _, _ in events):
        return math.inf
    if accountant == "pld" and all(q >= 1 for _, _, q in events):
        # Gaussians only: exactly one Gaussian (the analytic Gaussian mechanism, Balle & Wang 2018)
        z_eff = sum(c / (z * z) for z, c, _ in events) ** -0.5
        return float(dp_accounting.get_epsilon_gaussian(z_eff, delta))
    if accountant == "pld":
        acc: dp_accounting.PrivacyAccountant = pld.PLDAccountant(RELATION, discretization)
    elif accountant == "rdp":
        _quiet_absl()
        acc = rdp.RdpAccountant(neighboring_relation=RELATION)
    else:
        raise ValueError(f"unknown accountant {accountant!r}; use 'pld' or 'rdp'")
    for z, c, q in events:
        acc.compose(dp_event(z, c, q))
    return float(acc.get_epsilon(delta))


# -- planning --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedRelease:
    """A release with its calibrated noise multiplier (0 for data-independent ones)."""

    spec: ReleaseSpec
    noise_multiplier: float

    def noise_std(self, sensitivity: float | None = None) -> float:
        """``noise_multiplier * sensitivity`` (the declared one unless given)."""
        if not self.spec.data_dependent:
            return 0.0
        s = self.spec.sensitivity if sensitivity is None else sensitivity
        if s is None or not (math.isfinite(s) and s > 0):
            raise PrivacyError(f"release {self.spec.name!r}: sensitivity must be a positive finite number "
                               f"(got {s}); a non-positive clip norm cannot bound a record")
        return float(self.noise_multiplier) * float(s)


@dataclass
class BudgetPlan:
    """The calibrated plan of a run: noise multiplier per release, and the figures it was calibrated to."""

    epsilon: float
    delta: float
    n_records: int
    scale: float
    releases: dict[str, PlannedRelease]
    accountant: str = "pld"
    planned_epsilon: float = 0.0
    rdp_epsilon: float = 0.0

    def __contains__(self, name: str) -> bool:
        return name in self.releases

    def __getitem__(self, name: str) -> PlannedRelease:
        try:
            return self.releases[name]
        except KeyError:
            raise PrivacyError(f"release {name!r} was not declared in the privacy plan (declared: "
                               f"{', '.join(self.releases) or 'none'}): nothing may leave unprotected") from None

    def noise_multiplier(self, name: str) -> float:
        return self[name].noise_multiplier

    def noise_std(self, name: str, sensitivity: float | None = None) -> float:
        return self[name].noise_std(sensitivity)

    @property
    def noise_off(self) -> bool:
        """True for ``epsilon = inf``: the machinery runs (clipping included) without noise."""
        return math.isinf(self.epsilon)

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "n_records": self.n_records, "scale": self.scale,
                "accountant": self.accountant, "planned_epsilon": self.planned_epsilon,
                "rdp_epsilon": self.rdp_epsilon,
                "releases": {n: {**r.spec.to_json(), "noise_multiplier": r.noise_multiplier}
                             for n, r in self.releases.items()}}


def check_target(epsilon: float, delta: float, n_records: int) -> None:
    """Refuse impossible or meaningless targets with the reason (nothing is computed before this)."""
    if not isinstance(n_records, int) or n_records < 1:
        raise PrivacyError(f"differential privacy needs at least one training clip (got {n_records})")
    if not (isinstance(epsilon, (int, float)) and not math.isnan(epsilon) and epsilon > 0):
        raise PrivacyError(f"dp epsilon must be > 0 (got {epsilon}); smaller is more private, "
                           f"e.g. 1 (use null / no --dp-epsilon for a run without differential privacy)")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1.0 / n_records):
        raise PrivacyError(f"dp delta must be in (0, 1/N) = (0, {1.0 / n_records:.3g}) for N = {n_records} training "
                           f"clips (got {delta}): a delta of 1/N or more allows publishing a whole clip; "
                           f"e.g. {_suggest_delta(n_records):g}")


def _suggest_delta(n: int) -> float:
    exp = math.floor(math.log10(1.0 / n)) - 1
    return 10.0 ** min(exp, -5)


def _groups(specs: Sequence[ReleaseSpec]) -> list[str | None]:
    named = sorted({s.group for s in specs if s.group is not None})
    return named or [None]


def _events_at(specs: Sequence[ReleaseSpec], fixed: Mapping[str, float], scale: float,
               group: str | None) -> list[tuple[float, int, float]]:
    out = []
    for s in specs:
        if not s.data_dependent or (s.group is not None and s.group != group):
            continue
        z = fixed[s.name] if s.name in fixed else scale / math.sqrt(s.weight)
        out.append((z, s.compositions, s.sampling_rate))
    return out


def _calibrate_group(specs: Sequence[ReleaseSpec], fixed: Mapping[str, float], epsilon: float, delta: float,
                     group: str | None) -> float:
    """The smallest scale that keeps ``group``'s composition within ``epsilon`` (0 if nothing is calibrated)."""
    free = [s for s in specs if s.data_dependent and s.name not in fixed and s.group in (None, group)]
    if not free:
        return 0.0
    spent_fixed = epsilon_of(_events_at([s for s in specs if s.name in fixed], fixed, 1.0, group), delta)
    if spent_fixed >= epsilon:
        raise PrivacyError(f"releases already made spend epsilon {spent_fixed:.4g} >= the target {epsilon:g}: "
                           f"nothing is left for {', '.join(s.name for s in free)}")
    fixed_events = _events_at([s for s in specs if s.name in fixed], fixed, 1.0, group)
    if all(s.sampling_rate >= 1 for s in free) and all(q >= 1 for _, _, q in fixed_events):
        # closed form: sum_i c_i / z_i^2 = 1 / z_eff^2 with z_i = scale / sqrt(w_i) for the free ones
        z_eff = float(dp_accounting.get_sigma_gaussian(epsilon, delta))
        budget = 1.0 / z_eff ** 2 - sum(c / (z * z) for z, c, _ in fixed_events)
        if budget <= 0:
            raise PrivacyError(f"releases already made leave no budget for {', '.join(s.name for s in free)}")
        return math.sqrt(sum(s.compositions * s.weight for s in free) / budget)

    def eps(scale: float) -> float:  # the coarse grid overestimates epsilon: the scale found is safe
        return epsilon_of(_events_at(specs, fixed, scale, group), delta, discretization=COARSE_GRID)

    # bracket: without amplification by sampling the closed form is an upper bound on the scale needed;
    # sampling at rate q lowers it by at most a factor q. Then bisect (geometrically) on the PLD curve.
    unsampled = [s.with_(sampling_rate=1.0) for s in specs]
    hi = _calibrate_group(unsampled, fixed, epsilon, delta, group) if all(
        q >= 1 for _, _, q in fixed_events) else 1.0
    lo = hi * min([s.sampling_rate for s in free] + [1.0]) * 0.5
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyError(f"cannot reach epsilon {epsilon:g} at delta {delta:g} for group {group!r}")
    while eps(lo) <= epsilon and lo > 1e-6:
        hi, lo = lo, lo / 2
    while hi / lo > 1 + CALIBRATION_RTOL:
        mid = math.sqrt(lo * hi)
        if eps(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def plan_budget(specs: Sequence[ReleaseSpec], epsilon: float, delta: float, n_records: int, *,
                fixed: Mapping[str, float] | None = None, accountant: str = "pld") -> BudgetPlan:
    """Calibrate every release's noise multiplier for the target ``(epsilon, delta)`` (module docstring).

    Args:
        specs: every release of the run (data-independent ones included: they get 0).
        epsilon: the target (``math.inf`` = the machinery without noise, e.g. as a reference).
        delta: the target delta, ``0 < delta < 1 / n_records``.
        n_records: the number of training clips (for the delta check).
        fixed: noise multipliers of releases already made (re-planning after an early release, e.g. DP-SGD's
            sampling rate from the noisy class counts): they keep theirs, the rest share what is left.
    Raises:
        PrivacyError: with the reason, when the target cannot be met or a declaration is invalid.
    """
    fixed = dict(fixed or {})
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrivacyError(f"releases declared twice: {', '.join(dupes)}")
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise PrivacyError(f"fixed noise multipliers for undeclared releases: {', '.join(unknown)}")
    if math.isinf(epsilon) and epsilon > 0:
        if not isinstance(n_records, int) or n_records < 1:
            raise PrivacyError(f"differential privacy needs at least one training clip (got {n_records})")
        return BudgetPlan(epsilon, delta, n_records, 0.0,
                          {s.name: PlannedRelease(s, 0.0) for s in specs}, accountant, math.inf, math.inf)
    check_target(epsilon, delta, n_records)
    scale = max((_calibrate_group(specs, fixed, epsilon, delta, g) for g in _groups(specs)), default=0.0)
    releases = {}
    for s in specs:
        z = 0.0 if not s.data_dependent else fixed.get(s.name, scale / math.sqrt(s.weight))
        releases[s.name] = PlannedRelease(s, z)
    planned = max(epsilon_of(_events_at(specs, fixed, scale, g), delta, accountant) for g in _groups(specs))
    checked = max(epsilon_of(_events_at(specs, fixed, scale, g), delta, "rdp") for g in _groups(specs))
    return BudgetPlan(epsilon, delta, n_records, scale, releases, accountant, planned, checked)


# -- the ledger ------------------------------------------------------------------------------------

@dataclass
class LedgerEntry:
    """Everything one release actually spent: its events ``[noise multiplier, compositions, sampling rate]``."""

    name: str
    group: str | None = None
    sensitivity: float | None = None
    data_dependent: bool = True
    events: list[list[float]] = field(default_factory=list)

    @property
    def compositions(self) -> int:
        return int(sum(c for _, c, _ in self.events))


class PrivacyLedger:
    """The (epsilon, delta) actually spent, per release and in total (module docstring). JSON-serialisable."""

    def __init__(self, delta: float, *, accountant: str = "pld") -> None:
        self.delta = float(delta)
        self.accountant = accountant
        self.entries: dict[str, LedgerEntry] = {}

    def record(self, name: str, noise_multiplier: float, *, sensitivity: float | None = None, count: int = 1,
               sampling_rate: float = 1.0, group: str | None = None, data_dependent: bool = True) -> None:
        """Count ``count`` compositions of release ``name`` made with ``noise_multiplier`` (0 = no noise)."""
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = LedgerEntry(name, group, sensitivity, data_dependent)
        elif entry.group != group:
            raise PrivacyError(f"release {name!r} recorded for group {group!r}, earlier for {entry.group!r}")
        if not data_dependent:
            return
        if sensitivity is not None:
            entry.sensitivity = sensitivity if entry.sensitivity is None else max(entry.sensitivity, sensitivity)
        last = entry.events[-1] if entry.events else None
        if last is not None and last[0] == float(noise_multiplier) and last[2] == float(sampling_rate):
            last[1] += int(count)
        else:
            entry.events.append([float(noise_multiplier), int(count), float(sampling_rate)])

    def record_spec(self, planned: PlannedRelease, *, sensitivity: float | None = None, count: int = 1) -> None:
        s = planned.spec
        self.record(s.name, planned.noise_multiplier, sensitivity=sensitivity if sensitivity is not None
                    else s.sensitivity, count=count, sampling_rate=s.sampling_rate, group=s.group,
                    data_dependent=s.data_dependent)

    def _group_events(self, group: str | None) -> list[tuple[float, int, float]]:
        return [(z, int(c), q) for e in self.entries.values() if e.data_dependent and e.group in (None, group)
                for z, c, q in e.events]

    def epsilon(self, accountant: str | None = None) -> float:
        """Total epsilon at :attr:`delta` (maximum over groups of the composition of its events)."""
        groups = sorted({e.group for e in self.entries.values() if e.group is not None}) or [None]
        return max(epsilon_of(self._group_events(g), self.delta, accountant or self.accountant) for g in groups)

    def release_epsilon(self, name: str) -> float:
        e = self.entries[name]
        return epsilon_of([(z, int(c), q) for z, c, q in e.events], self.delta, self.accountant) \
            if e.data_dependent else 0.0

    def summary(self) -> dict[str, Any]:
        """``{"epsilon", "delta", "accountant", "rdp_epsilon", "releases": {name: {...}}}`` (JSON values)."""
        def num(v: float) -> float | str:
            return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")

        releases = {}
        for name, e in self.entries.items():
            releases[name] = {"data_dependent": e.data_dependent, "group": e.group, "sensitivity": e.sensitivity,
                              "compositions": e.compositions, "events": [list(v) for v in e.events],
                              "epsilon": num(self.release_epsilon(name))}
        return {"epsilon": num(self.epsilon()), "delta": self.delta, "accountant": self.accountant,
                "rdp_epsilon": num(self.epsilon("rdp")), "releases": releases}

    def to_json(self) -> dict[str, Any]:
        return {"delta": self.delta, "accountant": self.accountant,
                "entries": [{"name": e.name, "group": e.group, "sensitivity": e.sensitivity,
                             "data_dependent": e.data_dependent, "events": [list(v) for v in e.events]}
                            for e in self.entries.values()]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PrivacyLedger:
        led = cls(float(doc["delta"]), accountant=str(doc.get("accountant", "pld")))
        for e in doc.get("entries", []):
            led.entries[e["name"]] = LedgerEntry(e["name"], e.get("group"), e.get("sensitivity"),
                                                 bool(e.get("data_dependent", True)),
                                                 [[float(z), int(c), float(q)] for z, c, q in e.get("events", [])])
        return led
