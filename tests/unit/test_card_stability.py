"""Two computations of the same card (same model, data and settings) must plan alike (issue 15, "Stability").

The card's time figures are measured, so they are never bit-identical. How far two cards' step fractions lie apart
follows the machine's noise: that figure (goal 10%) is the benchmark's (`make bench BENCH=cost_model`,
recompute_plan_disagreement_real), not a test's, since a timed assertion passes on one machine and fails on a
noisier one (a CI run saw 10.5% on builtin:tiny). What a test can hold is that a budget that is not on a knife
edge, given the two cards' own difference, gets the same plan from both.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from layercard_service.card_engine.engine import compute_card
from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.planner import plan_placement
from layercard_service.control.planning.pricing import cache_run, price
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings, LayerCardData
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.errors import FailedPrecondition
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model

SETTINGS = CardSettings(probe_size=32, batch_size=16, max_seq_len=64)
BUDGETS = [round(0.30 + 0.01 * i, 2) for i in range(70)]  # max_step_fraction_of_full 0.30 .. 0.99


@pytest.fixture(scope="module")
def two_cards() -> tuple[LayerCardData, LayerCardData]:
    model, tokenizer = load_model(builtin_model_path("tiny"))
    examples = get_task("builtin:cipher").train[:100]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several intra-op threads on a busy 2-core machine spin against each other
    try:
        return tuple(compute_card(model, tokenizer, examples, SETTINGS, "builtin:tiny") for _ in range(2))
    finally:
        torch.set_num_threads(threads)


def _fractions(card: LayerCardData, priced: bool = False) -> dict[tuple[int, ...], float]:
    """Each set's step over full-layer LoRA's: the card's uncached figure, or (``priced``) the step the planner
    budgets, with the frozen-prefix cache where the trainer would use it."""
    costs = shape_costs(card, Shape(card.settings.rank, tuple(card.module_types)))
    request = PlanRequest()
    run = cache_run(card, request)
    full = costs.step_seconds(range(card.num_layers))
    sets = (s for k in range(1, card.num_layers + 1) for s in itertools.combinations(range(card.num_layers), k))
    if priced:
        return {layers: price(costs, layers, run, request).step_seconds / full for layers in sets}
    return {layers: costs.step_seconds(layers) / full for layers in sets}


def _plan(card: LayerCardData, fraction: float):
    try:
        return plan_placement(card, PlanRequest(budget=BudgetSpec(max_step_fraction_of_full=fraction)))
    except FailedPrecondition:
        return None  # infeasible is a plan too: both cards must say it


@pytest.mark.slow
def test_every_placement_is_priced_by_both_cards(two_cards):
    first, second = (_fractions(card) for card in two_cards)
    assert first.keys() == second.keys()
    for fractions in (first, second):
        assert fractions[tuple(range(len(max(fractions, key=len))))] == pytest.approx(1.0)
        assert all(0 < f <= 1 + 1e-9 for f in fractions.values())  # no placement costs more than every block
    for card in two_cards:
        assert len(card.training_cost.calibration.held_out) == 8


@pytest.mark.slow
def test_the_fitted_figures_are_sane_on_a_real_model(two_cards):
    for card in two_cards:
        tc = card.training_cost
        adapted = [row.forward_seconds + row.backward_seconds for row in card.layers]
        passing = [f + b for f, b in zip(tc.forward_pass_seconds, tc.backward_pass_seconds)]
        assert min([tc.fixed_seconds, *adapted, *passing, *tc.forward_nograd_seconds]) >= 0
        assert all(n <= p <= a for n, p, a in zip(tc.forward_nograd_seconds, passing, adapted))
        if any(p == a for p, a in zip(passing, adapted)):  # only with the adapter figure at its bound, and said
            assert any("adapter figure" in note for note in tc.calibration.notes)
        full = next(t for t in tc.calibration.fit if t.layers == list(range(card.num_layers)))
        assert full.predicted_seconds == pytest.approx(tc.fixed_seconds + sum(adapted))
        assert tc.calibration.measured_steps >= 2 * len(tc.calibration.fit) + 8


@pytest.mark.slow
def test_plans_at_the_same_budget_agree(two_cards):
    first, second = two_cards
    # The gains are the same on both cards (the probe is seeded and exact); the step costs are measured, so they
    # differ by the machine's noise. Two plans at one budget may then differ only where that noise explains it:
    # one card's plan is over the budget by the other card's price, or the two plans predict the same gain and the
    # tie went to the (noisily) cheaper step. Anything else is the planner disagreeing with itself.
    assert [r.resnorm_sq for r in first.layers] == [r.resnorm_sq for r in second.layers]
    a, b = (_fractions(card, priced=True) for card in two_cards)
    agreed = 0
    for budget in BUDGETS:
        one, two = _plan(first, budget), _plan(second, budget)
        if (one and one.layers) == (two and two.layers):
            agreed += 1
            continue
        where = f"max_step_fraction_of_full={budget}: {one and one.layers} against {two and two.layers}"
        assert one is not None or two is not None, where
        if one is None or two is None:  # feasible on one card only: its plan must be over the budget on the other
            plan, other = (two, a) if one is None else (one, b)
            assert other[tuple(sorted(plan.layers))] > budget, where
            continue
        l1, l2 = tuple(sorted(one.layers)), tuple(sorted(two.layers))
        explained = (
            b[l1] > budget  # the first card's plan does not fit the second card's price
            or a[l2] > budget  # nor the second's the first's
            or one.predicted_gain.value == pytest.approx(two.predicted_gain.value, rel=1e-9)  # a tie on cost
        )
        assert explained, where
    assert agreed > 0  # both cards plan the same somewhere (at the widest budgets, every set fits both)
