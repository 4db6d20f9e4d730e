"""A plan under a vLLM serving budget takes its module types from what the fleet wraps, its rank from those the
fleet measured, and each rank's measured overhead; on the planner's synthetic cards (tests/unit/test_planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from test_planner import GAINS, make_card, plan

from layercard_service.control.planning.vllm_fleet import VllmFleet
from layercard_service.errors import FailedPrecondition


@dataclass(frozen=True)
class Measured:
    overhead_fraction: float
    base_ms_per_token: float | None = 2.0
    basis: str = "median of 3 probes"
    samples: int = 3


FLEET = VllmFleet(("o_proj",), 16, {4: Measured(0.1), 8: Measured(0.3), 32: Measured(0.01)})


def test_the_plan_takes_the_wrapped_modules_and_the_measured_rank_that_fits():
    card = make_card(GAINS, vllm_fraction=0.9)  # the fleet's median over every probe: priced by rank instead
    p = plan(card, budget={"max_serving_overhead_fraction": 0.2}, vllm=FLEET)
    assert p.target_modules == ("o_proj",) and p.rank == 4  # rank 32 is over the fleet's max rank 16
    assert p.serving_overhead_fraction.value == pytest.approx(0.1)
    assert "rank 4 on the serving vLLM fleet (wrapping o_proj, max rank 16)" in p.serving_overhead_fraction.basis
    # In ms per token: the overhead times the fleet's measured base time at that rank (2 ms).
    q = plan(card, budget={"max_serving_overhead_ms_per_token": 0.7}, vllm=FLEET)
    assert q.rank == 8 and q.serving_overhead_ms_per_token.value == pytest.approx(0.3 * 2.0)


def test_a_budget_no_measured_rank_meets_names_the_cheapest():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_serving_overhead_fraction": 0.05}, vllm=FLEET)
    assert err.value.reason == "BUDGET_INFEASIBLE"
    assert err.value.metadata["cheapest_rank"] == "4" and err.value.metadata["cheapest_target_modules"] == "o_proj"


def test_shapes_the_fleet_cannot_serve_are_refused_with_why():
    with pytest.raises(FailedPrecondition) as err:
        plan(
            make_card(GAINS),
            budget={"max_serving_overhead_fraction": 0.5},
            vllm=FLEET,
            candidate_module_sets=(("q_proj", "o_proj"),),
        )
    assert err.value.reason == "SERVING_SHAPE_UNSERVABLE"
    assert "does not wrap q_proj" in err.value.message and err.value.metadata["measured_ranks"] == "4,8"


def test_an_unmeasured_rank_is_priced_as_the_nearest_measured_rank_and_says_so():
    card = make_card(GAINS, vllm_fraction=0.25)
    p = plan(card, budget={"max_serving_overhead_fraction": 0.5}, vllm=FLEET, candidate_ranks=(6,))
    assert p.rank == 6 and p.serving_overhead_fraction.value == pytest.approx(0.3)  # as rank 8, the next above
    assert (
        "rank 6 not measured" in p.serving_overhead_fraction.basis
        and "priced as rank 8" in p.serving_overhead_fraction.basis
    )
    q = plan(card, budget={"max_serving_overhead_fraction": 0.5}, vllm=FLEET, candidate_ranks=(12,))
    assert q.serving_overhead_fraction.value == pytest.approx(0.3)  # as rank 8: 32 is over the max rank 16
    # A pool that has measured nothing: the fleet's median over every probe.
    empty = VllmFleet(("o_proj",), 16, {})
    r = plan(card, budget={"max_serving_overhead_fraction": 0.5}, vllm=empty, candidate_ranks=(12,))
    assert (
        r.serving_overhead_fraction.value == pytest.approx(0.25)
        and "rank 12 not measured" in r.serving_overhead_fraction.basis
    )


def test_without_a_vllm_budget_the_fleet_steers_nothing_but_prices_the_plan():
    card = make_card(GAINS, vllm_fraction=0.25)
    steered, alone = plan(card, vllm=FLEET), plan(card)
    assert (steered.layers, steered.rank, steered.target_modules) == (alone.layers, alone.rank, alone.target_modules)
    assert alone.serving_overhead_fraction.value == pytest.approx(0.25)  # the fleet's median over every rank
    # The card's shape adapts q_proj, which this fleet does not wrap: priced as before, and the basis warns.
    assert steered.serving_overhead_fraction.value == pytest.approx(0.25)
    assert "cannot serve rank 8 on q_proj, o_proj" in steered.serving_overhead_fraction.basis
    served = plan(card, vllm=FLEET, candidate_module_sets=(("o_proj",),))
    assert served.serving_overhead_fraction.value == pytest.approx(0.3)  # what rank 8 measured on o_proj
    peft = {"max_serving_overhead_ms_per_token": 0.25, "serving_engine": "peft"}
    assert plan(card, budget=peft, vllm=FLEET) == plan(card, budget=peft)


# --- several serving pools -----------------------------------------------------------------------------------------
LEAN = VllmFleet(("o_proj",), 8, {8: Measured(0.13)}, "lean")
FULL = VllmFleet((), 8, {8: Measured(0.71)}, "full")


def test_a_tight_budget_takes_the_lean_pools_modules_and_names_the_pool():
    card = make_card(GAINS, vllm_fraction=0.5)
    p = plan(card, budget={"max_serving_overhead_fraction": 0.2}, vllm=(FULL, LEAN))
    assert p.serving_pool == "lean" and p.target_modules == ("o_proj",) and p.rank == 8
    assert p.serving_overhead_fraction.value == pytest.approx(0.13)
    assert "serving pool 'lean' (wrapping o_proj, max rank 8)" in p.serving_overhead_fraction.basis
    # A loose budget lets the full pool's modules in: they are worth more gain on this card.
    loose = plan(card, budget={"max_serving_overhead_fraction": 0.8}, vllm=(FULL, LEAN))
    assert loose.serving_pool == "full" and set(loose.target_modules) == {"q_proj", "o_proj"}
    assert loose.serving_overhead_fraction.value == pytest.approx(0.71)


def test_a_budget_no_pool_meets_names_the_cheapest_pool_and_its_overhead():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_serving_overhead_fraction": 0.05}, vllm=(FULL, LEAN))
    assert err.value.reason == "BUDGET_INFEASIBLE"
    assert err.value.metadata["cheapest_serving_pool"] == "lean"
    assert "on serving pool 'lean'" in err.value.message and "0.13 > 0.05" in err.value.message


def test_a_shape_no_pool_can_serve_is_refused_with_each_pools_reason():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_serving_overhead_fraction": 0.5}, vllm=(LEAN, FULL), candidate_ranks=(16,))
    assert err.value.reason == "SERVING_SHAPE_UNSERVABLE" and err.value.metadata["pools"] == "lean,full"
    assert "serving pool 'lean'" in err.value.message and "serving pool 'full'" in err.value.message
    assert "over its max rank 8" in err.value.message


def test_without_a_serving_budget_the_plan_names_the_pool_that_serves_its_shape_cheapest():
    card = make_card(GAINS, vllm_fraction=0.5)
    p = plan(card, vllm=(FULL, LEAN))  # the card's shape adapts q_proj: only the full pool serves it
    assert p.serving_pool == "full" and p.serving_overhead_fraction.value == pytest.approx(0.71)
    lean = plan(card, vllm=(FULL, LEAN), candidate_module_sets=(("o_proj",),))
    assert lean.serving_pool == "lean" and lean.serving_overhead_fraction.value == pytest.approx(0.13)
    assert plan(card).serving_pool == ""  # no fleet known
