"""The accountant and the budget planner: against dp_accounting directly, the analytic figures, refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from feda2v_toolkit.privacy import (
    PrivacyError,
    PrivacyLedger,
    ReleaseSpec,
    data_independent,
    epsilon_of,
    plan_budget,
)

DELTA = 1e-5


def pld_epsilon(events, delta=DELTA):
    acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for e in events:
        acc.compose(e)
    return acc.get_epsilon(delta)


def test_one_release_at_epsilon_one_needs_z_3_73():
    plan = plan_budget([ReleaseSpec("only", 1.0)], 1.0, DELTA, 1000)
    assert plan.noise_multiplier("only") == pytest.approx(3.73, abs=0.005)  # analytic Gaussian (Balle & Wang)
    assert plan.planned_epsilon == pytest.approx(1.0, abs=1e-6)
    # the classic bound would need 4.84
    assert math.sqrt(2 * math.log(1.25 / DELTA)) == pytest.approx(4.84, abs=0.01)


def test_epsilon_of_matches_dp_accounting_directly():
    events = [(4.0, 1, 1.0), (6.0, 3, 1.0)]
    ours = epsilon_of(events, DELTA)
    theirs = pld_epsilon([dp_accounting.GaussianDpEvent(4.0),
                          dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(6.0), 3)])
    assert ours == pytest.approx(theirs, rel=1e-3)
    # Gaussians compose into one Gaussian with z_eff = (sum 1/z^2)^-1/2
    z_eff = (1 / 16 + 3 / 36) ** -0.5
    assert ours == pytest.approx(dp_accounting.get_epsilon_gaussian(z_eff, DELTA), rel=1e-9)


def test_sampled_events_match_dp_accounting_pld_and_rdp():
    events = [(1.1, 50, 0.05), (5.0, 1, 1.0)]
    expected = pld_epsilon([dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 50),
        dp_accounting.GaussianDpEvent(5.0)])
    assert epsilon_of(events, DELTA) == pytest.approx(expected, rel=1e-9)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 50))
    acc.compose(dp_accounting.GaussianDpEvent(5.0))
    assert epsilon_of(events, DELTA, "rdp") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert epsilon_of(events, DELTA, "rdp") >= epsilon_of(events, DELTA) * 0.99  # RDP is the looser bound


def test_plan_splits_by_weight_and_spends_exactly_the_target():
    specs = [ReleaseSpec("a", 1.0, weight=1.0), ReleaseSpec("b", 2.0, weight=4.0),
             ReleaseSpec("c", 3.0, weight=1.0, compositions=2), data_independent("d")]
    plan = plan_budget(specs, 2.0, DELTA, 500)
    za, zb, zc = (plan.noise_multiplier(n) for n in "abc")
    assert zb == pytest.approx(za / 2)  # weight 4 -> half the noise multiplier
    assert zc == pytest.approx(za)
    assert plan.noise_multiplier("d") == 0 and plan.noise_std("d") == 0
    assert plan.noise_std("b") == pytest.approx(2.0 * zb)
    assert epsilon_of([(za, 1, 1.0), (zb, 1, 1.0), (zc, 2, 1.0)], DELTA) == pytest.approx(2.0, rel=1e-6)
    assert plan.rdp_epsilon >= plan.planned_epsilon


def test_plan_with_poisson_sampling_is_calibrated_for_exactly_the_steps():
    specs = [ReleaseSpec("stats", 1.0), ReleaseSpec("sgd", 1.0, compositions=40, sampling_rate=0.1, weight=0.5)]
    plan = plan_budget(specs, 4.0, DELTA, 1000)
    spent = epsilon_of([(plan.noise_multiplier("stats"), 1, 1.0), (plan.noise_multiplier("sgd"), 40, 0.1)], DELTA)
    assert spent == pytest.approx(4.0, rel=2e-3)
    assert spent <= 4.0 + 1e-9  # calibrated from above: never over the target
    more = epsilon_of([(plan.noise_multiplier("stats"), 1, 1.0), (plan.noise_multiplier("sgd"), 41, 0.1)], DELTA)
    assert more > 4.0  # one step more than planned is over budget


def test_parallel_groups_cost_the_most_expensive_group():
    specs = [ReleaseSpec("common", 1.0)] + [ReleaseSpec(f"class{c}.sgd", 1.0, compositions=5 * (c + 1),
                                                        sampling_rate=0.2, group=f"class{c}") for c in range(3)]
    plan = plan_budget(specs, 3.0, DELTA, 300)
    z = plan.noise_multiplier("common")
    per_group = [epsilon_of([(z, 1, 1.0), (plan.noise_multiplier(f"class{c}.sgd"), 5 * (c + 1), 0.2)], DELTA)
                 for c in range(3)]
    assert max(per_group) == pytest.approx(3.0, rel=2e-3)
    assert per_group[0] < per_group[2]


def test_fixed_releases_keep_their_multiplier_and_the_rest_share_what_is_left():
    specs = [ReleaseSpec("counts", 1.0), ReleaseSpec("sums", 1.0)]
    plan = plan_budget(specs, 1.0, DELTA, 100, fixed={"counts": 10.0})
    assert plan.noise_multiplier("counts") == 10.0
    assert epsilon_of([(10.0, 1, 1.0), (plan.noise_multiplier("sums"), 1, 1.0)], DELTA) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("epsilon,delta,n,match", [
    (0.0, 1e-5, 100, "epsilon must be > 0"),
    (-1.0, 1e-5, 100, "epsilon must be > 0"),
    (float("nan"), 1e-5, 100, "epsilon must be > 0"),
    (1.0, 0.0, 100, r"delta must be in \(0, 1/N\)"),
    (1.0, 0.01, 100, r"delta must be in \(0, 1/N\)"),
    (1.0, 0.02, 100, "allows publishing a whole clip"),
    (1.0, 1e-5, 0, "at least one training clip"),
])
def test_impossible_targets_are_refused_with_the_reason(epsilon, delta, n, match):
    with pytest.raises(PrivacyError, match=match):
        plan_budget([ReleaseSpec("a", 1.0)], epsilon, delta, n)


@pytest.mark.parametrize("kwargs,match", [
    ({"sensitivity": 0.0}, "non-positive clip norm"),
    ({"sensitivity": -2.0}, "non-positive clip norm"),
    ({"sensitivity": 1.0, "compositions": 0}, "compositions"),
    ({"sensitivity": 1.0, "sampling_rate": 0.0}, "sampling_rate"),
    ({"sensitivity": 1.0, "weight": 0.0}, "weight"),
])
def test_bad_declarations_are_refused(kwargs, match):
    with pytest.raises(PrivacyError, match=match):
        ReleaseSpec("x", **kwargs)


def test_undeclared_release_and_duplicates_are_refused():
    plan = plan_budget([ReleaseSpec("a", 1.0)], 1.0, DELTA, 100)
    with pytest.raises(PrivacyError, match="not declared"):
        plan["b"]
    with pytest.raises(PrivacyError, match="declared twice"):
        plan_budget([ReleaseSpec("a", 1.0), ReleaseSpec("a", 2.0)], 1.0, DELTA, 100)
    with pytest.raises(PrivacyError, match="non-positive clip norm"):
        plan_budget([ReleaseSpec("a", None)], 1.0, DELTA, 100).noise_std("a", 0.0)


def test_infinite_epsilon_is_the_machinery_without_noise():
    plan = plan_budget([ReleaseSpec("a", 1.0)], math.inf, DELTA, 100)
    assert plan.noise_off and plan.noise_multiplier("a") == 0


def test_ledger_counts_every_composition_and_round_trips_json():
    led = PrivacyLedger(DELTA)
    led.record("stats", 4.0, sensitivity=2.0)
    for _ in range(30):
        led.record("sgd", 1.2, sensitivity=1.0, sampling_rate=0.1)
    led.record("fixed-norm", 0.0, data_dependent=False)
    summary = led.summary()
    assert summary["releases"]["sgd"]["compositions"] == 30
    assert summary["releases"]["fixed-norm"]["epsilon"] == 0.0
    assert summary["epsilon"] == pytest.approx(epsilon_of([(4.0, 1, 1.0), (1.2, 30, 0.1)], DELTA))
    assert summary["epsilon"] > summary["releases"]["sgd"]["epsilon"]
    back = PrivacyLedger.from_json(json.loads(json.dumps(led.to_json())))
    assert back.summary() == summary
    led.record("sgd", 1.2, sensitivity=1.0, sampling_rate=0.1)  # one more step spends more
    assert led.epsilon() > summary["epsilon"]
