"""Learning curves (control/planning/curves.py) and the planner's objectives on synthetic curves."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from layercard_service.control.planning.curves import Curve, SetCurve, fit_curve, steps_to_reach
from layercard_service.domain.cards import (
    PERFORMANCE_LEARNING_RATE,
    CardSettings,
    LearningRatePilot,
    calibrated_gain,
    performance_checkpoints,
)
from layercard_service.errors import InvalidArgument
from tests.unit.test_planner import GAINS, make_card, plan


def test_fit_recovers_a_noiseless_curve():
    truth = Curve(asymptote=2.0, tau=40.0, beta=1.5)
    steps = [10, 20, 40, 60, 80, 120]
    fit = fit_curve(steps, [truth.gain(n) for n in steps], max_gain=10.0)
    assert fit.rms_error < 0.02
    for n in (5, 50, 100, 400):  # the fitted curve is the true one, in and beyond the points
        assert fit.gain(n) == pytest.approx(truth.gain(n), abs=0.05)
    assert fit.low(100) <= fit.gain(100) <= fit.high(100)


def test_fit_never_predicts_more_than_the_loss():
    steps = [10, 20, 30, 40]
    fit = fit_curve(steps, [1.0 * n for n in steps], max_gain=3.0)  # a straight line heading past the bound
    assert fit.best.asymptote <= 3.0
    assert max(fit.high(n) for n in (100, 10_000)) <= 3.0 + 1e-12


def test_the_band_holds_the_truth_and_shrinks_with_points():
    truth = Curve(asymptote=1.0, tau=30.0, beta=1.0)
    rng = random.Random(0)
    few = [5, 10]
    many = [5, 10, 15, 20, 30, 45, 60, 90]
    noisy = lambda steps: [truth.gain(n) + rng.gauss(0, 0.01) for n in steps]  # noqa: E731
    wide, narrow = fit_curve(few, noisy(few), 5.0), fit_curve(many, noisy(many), 5.0)
    far = 300
    assert narrow.low(far) <= truth.gain(far) * 1.1 and narrow.high(far) >= truth.gain(far) * 0.9
    assert wide.high(far) - wide.low(far) > narrow.high(far) - narrow.low(far)


def test_fit_rejects_bad_points():
    with pytest.raises(ValueError):
        fit_curve([], [], 1.0)
    with pytest.raises(ValueError):
        fit_curve([0, 10], [0.0, 1.0], 1.0)


def test_steps_to_reach_inverts_the_curve():
    curve = Curve(asymptote=2.0, tau=50.0, beta=1.0)
    n = steps_to_reach(curve, 1.0, 10_000)
    expected = math.ceil(50 * math.log(2))  # 1 − exp(−n/50) = 1/2
    assert n == expected and curve.gain(n) >= 1.0 > curve.gain(n - 1)
    assert steps_to_reach(curve, 2.5, 10_000) is None  # above the asymptote
    assert steps_to_reach(curve, 1.9, 50) is None  # not within the step limit


def test_a_set_curve_adds_small_shares_and_saturates_at_the_loss():
    small = [fit_curve([10, 20, 40], [Curve(0.01, 20, 1).gain(n) for n in (10, 20, 40)], 5.0) for _ in range(3)]
    combined = SetCurve(tuple(small), start_loss=5.0)
    assert combined.gain(40) == pytest.approx(sum(f.gain(40) for f in small), rel=0.01)
    big = [fit_curve([10, 20, 40], [Curve(4.0, 5, 1).gain(n) for n in (10, 20, 40)], 5.0) for _ in range(4)]
    saturated = SetCurve(tuple(big), start_loss=5.0)
    assert sum(f.gain(40) for f in big) > 5.0 > saturated.gain(40) > 4.0


def test_calibrated_gain_keeps_small_figures_and_bounds_large_ones():
    assert calibrated_gain(0.01, 5.0) == pytest.approx(0.01, rel=1e-2)
    assert calibrated_gain(26.5, 2.8) < 2.8  # the real model's layer 0: 26.5 nats on a 2.8-nat loss
    assert calibrated_gain(-1.0, 2.0) == 0.0 and calibrated_gain(1.0, 0.0) == 0.0


# --- the planner on synthetic pilot curves -------------------------------------------------------------------
CHECKPOINTS = performance_checkpoints(50)  # the card's default pilot length


def _pilot(asymptote: float, tau: float) -> list[float]:
    return [Curve(asymptote, tau, 1.0).gain(n) for n in CHECKPOINTS]


# Layer 0 learns most but slowly; the top two layers learn fast and are cheap (backward stops above block 3).
PILOTS = [
    _pilot(3.0, 200.0),
    _pilot(0.2, 40.0),
    _pilot(0.2, 40.0),
    _pilot(0.2, 40.0),
    _pilot(1.5, 10.0),
    _pilot(1.5, 10.0),
]


def test_pilot_curves_drive_the_plan_and_its_curve():
    card = make_card(GAINS, probe_loss=6.0, pilots=PILOTS)
    p = plan(card, objective="accuracy", steps=200)
    assert p.learning_rate == PERFORMANCE_LEARNING_RATE
    assert "pilot runs" in p.predicted_gain.basis
    assert p.predicted_gain.value < 6.0  # never more than the probe loss
    gains = [pt.gain for pt in p.predicted_curve]
    assert gains == sorted(gains) and p.predicted_curve[-1].steps == 200
    assert all(pt.gain_low <= pt.gain + 1e-12 and pt.gain <= pt.gain_high + 1e-12 for pt in p.predicted_curve)
    seconds = [pt.seconds for pt in p.predicted_curve]
    assert seconds == sorted(seconds)


def test_efficiency_on_pilot_curves_takes_the_fast_cheap_layers():
    card = make_card(GAINS, probe_loss=6.0, pilots=PILOTS)
    # Full-layer LoRA's curve at 200 steps is dominated by layer 0's slow 3 nats; a third of it is reachable by
    # the two fast top layers within a few dozen steps, far sooner than any set holding block 0 (a deep backward).
    p = plan(card, objective="efficiency", target_gain_fraction=0.3, steps=200)
    assert p.layers == (4, 5)
    assert p.steps < 200
    # the plan's curve crosses the target at its steps
    full = plan(card, objective="accuracy", steps=200).predicted_gain.value
    assert p.predicted_gain.value >= 0.3 * full * (1 - 1e-9)


def test_a_training_time_budget_reads_the_curve_not_a_proportional_share():
    card = make_card(GAINS, probe_loss=6.0, pilots=PILOTS)
    full_step = 19.0  # fixed 1 s + 6 blocks x 3 s (test_planner's card)
    p = plan(card, budget={"max_training_seconds": 10 * full_step}, steps=200)
    # 10 full-layer steps buy layer 0 little of its slow curve; the fast top layers, with twice the steps,
    # get most of theirs: the accuracy objective takes them (a proportional share would favour full-layer LoRA)
    assert p.layers == (4, 5)
    assert p.steps * p.step_seconds.value <= 10 * full_step + 1e-9


def _with_rate_pilots(card, curves: dict[float, list[float]]):
    return dataclasses.replace(card, learning_rate_pilots=[LearningRatePilot(r, c) for r, c in sorted(curves.items())])


# All-layer pilots: at 3e-3 full-layer LoRA learns three times as fast as at the single-layer pilots' 1e-3; at 1e-2
# it diverges (its held-out loss rises).
RATE_PILOTS = {
    PERFORMANCE_LEARNING_RATE: _pilot(3.5, 100.0),
    3e-3: _pilot(3.5, 100.0 / 3),
    1e-2: [-0.5 * n / 50 for n in CHECKPOINTS],
}


def test_the_planner_chooses_the_learning_rate_the_all_layer_pilots_favour():
    card = _with_rate_pilots(make_card(GAINS, probe_loss=6.0, pilots=PILOTS), RATE_PILOTS)
    p = plan(card, objective="accuracy", steps=50)
    assert p.learning_rate == 3e-3
    assert "learning rate 0.003 of the pilots" in p.rationale
    assert "all-layer pilot" in p.predicted_gain.basis
    at_base = plan(make_card(GAINS, probe_loss=6.0, pilots=PILOTS), objective="accuracy", steps=50)
    assert at_base.learning_rate == PERFORMANCE_LEARNING_RATE
    assert p.predicted_gain.value > at_base.predicted_gain.value  # the faster rate buys more in 50 steps
    assert p.predicted_gain.value <= 6.0  # still never more than the probe loss
    # efficiency: the faster rate reaches the same target in fewer steps
    target = {"objective": "efficiency", "target_gain_fraction": 0.3, "steps": 200}
    fast, slow = plan(card, **target), plan(make_card(GAINS, probe_loss=6.0, pilots=PILOTS), **target)
    assert fast.learning_rate == 3e-3 and fast.steps < slow.steps


def test_a_diverging_learning_rate_is_never_chosen():
    card = _with_rate_pilots(
        make_card(GAINS, probe_loss=6.0, pilots=PILOTS),
        {PERFORMANCE_LEARNING_RATE: RATE_PILOTS[PERFORMANCE_LEARNING_RATE], 1e-2: RATE_PILOTS[1e-2]},
    )
    for objective in ("accuracy", "efficiency", "balanced"):
        assert plan(card, objective=objective, target_gain_fraction=0.3, steps=200).learning_rate == 1e-3


def test_without_all_layer_pilots_at_the_base_rate_the_plan_stays_at_it():
    # Pilots at other rates only cannot be related to the single-layer curves: they are not used.
    card = _with_rate_pilots(make_card(GAINS, probe_loss=6.0, pilots=PILOTS), {3e-3: RATE_PILOTS[3e-3]})
    assert plan(card, objective="accuracy", steps=50).learning_rate == PERFORMANCE_LEARNING_RATE


def test_the_learning_rate_grid_always_holds_the_pilots_rate_and_is_checked():
    assert CardSettings().learning_rate_grid == (1e-3, 3e-3)
    assert CardSettings(performance_learning_rates=(1e-2, 3e-4)).learning_rate_grid == (3e-4, 1e-3, 1e-2)
    for bad in ((0.0,), (math.inf,), (2.0,), tuple(1e-3 * (i + 1) for i in range(9))):
        with pytest.raises(InvalidArgument) as info:
            CardSettings(performance_learning_rates=bad)
        assert info.value.violations[0].field == "performance_learning_rates"
