"""The placement planner on synthetic cards whose costs and gains are known exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest

from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.gains import layer_scores
from layercard_service.control.planning.planner import plan_placement
from layercard_service.domain.cards import (
    CardSettings,
    LayerCardData,
    LayerCardRow,
    ModuleCard,
    ServingCostCard,
    TrainingCostCard,
)
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.errors import FailedPrecondition, InvalidArgument

MODULES = ("q_proj", "o_proj")
PARAMS = {"q_proj": 100, "o_proj": 300}  # adapter parameters per layer at the card's rank 8


def make_card(
    gains: list[float], *, coupling=None, vllm_fraction=None, stream=None, probe_loss=1e12, pilots=None
) -> LayerCardData:
    """Per block: forward 1 s adapted (0.9 pass-through, 0.5 without graph), backward 2 s adapted (1.8 pass);
    fixed 1 s; activations 100 bytes adapted, 90 pass-through; peft serving 0.1 ms per adapted layer.
    ``gains`` are ½Res² per layer, split 1:3 between q_proj and o_proj. The default probe loss is far above
    them, so the calibration (saturation at the loss) is the identity there. ``pilots``: per layer, the pilot
    curve's gains at the card's performance checkpoints."""
    L = len(gains)
    rows = []
    for i, gain in enumerate(gains):
        res = 2 * gain
        modules = [
            ModuleCard("q_proj", res / 4, res / 4, 1.0, 4.0, 10.0, PARAMS["q_proj"]),
            ModuleCard("o_proj", 3 * res / 4, 3 * res / 4, 1.0, 4.0, 10.0, PARAMS["o_proj"]),
        ]
        rows.append(
            LayerCardRow(
                index=i,
                resnorm_sq=res,
                resnorm_sq_split_half=res,
                resnorm_share=0.0,
                predicted_gain=gain,
                activation_energy=2.0,
                effective_rank=4.0,
                condition_number=10.0,
                modules=modules,
                forward_seconds=1.0,
                backward_seconds=2.0,
                activation_bytes=100,
                adapter_parameters=400,
                adapter_bytes=1600,
                peft_serving_overhead_ms_per_token=0.1,
                residual_mean_square=stream[i] if stream else 0.0,
                measured_gain=pilots[i][-1] if pilots else None,
                measured_gain_curve=list(pilots[i]) if pilots else [],
            )
        )
    training = TrainingCostCard(
        fixed_seconds=1.0,
        per_adapter_seconds=0.3,
        base_memory_bytes=10_000,
        predicted_full_step_seconds=0.0,
        measured_full_step_seconds=0.0,
        predicted_partial_step_seconds=0.0,
        measured_partial_step_seconds=0.0,
        validation_layers=[],
        step_time_relative_error=0.05,
        predicted_full_peak_memory_bytes=0,
        measured_full_peak_memory_bytes=0,
        peak_memory_relative_error=0.0,
        batch_size=16,
        seq_len=32,
        backward_pass_seconds=[2.0] + [1.8] * (L - 1),
        pass_activation_bytes=[100] + [90] * (L - 1),
        forward_pass_seconds=[1.0] + [0.9] * (L - 1),
        forward_nograd_seconds=[0.5] * L,
    )
    return LayerCardData(
        model="builtin:tiny",
        architecture="LlamaForCausalLM",
        num_layers=L,
        num_parameters=1000,
        module_types=list(MODULES),
        settings=CardSettings(rank=8, target_modules=MODULES),
        layers=rows,
        training_cost=training,
        serving_cost=ServingCostCard(peft_base_ms_per_token=1.0, vllm_overhead_fraction=vllm_fraction),
        probe_loss=probe_loss,
        probe_examples=64,
        probe_tokens=1000,
        compute_seconds=1.0,
        coupling=coupling,
    )


GAINS = [8.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # layer 0 dominates, as resnorm does on real models
AT_REFERENCE = -math.expm1(-3.0)  # the prior curve at the reference steps (τ a third of them)


def plan(card, **kwargs):
    budget, vllm = kwargs.pop("budget", {}), kwargs.pop("vllm", None)
    return plan_placement(card, PlanRequest(budget=BudgetSpec(**budget), **kwargs), vllm=vllm)


# --- the cost model the planner reads ------------------------------------------------------------------------
def test_costs_follow_the_lowest_adapted_layer():
    costs = shape_costs(make_card(GAINS), Shape(8, MODULES))
    full = costs.step_seconds(range(6))
    assert full == pytest.approx(1.0 + 6 * 3.0)
    # layers 4 and 5: no-graph forward for 0-3, pass-through for nothing else, adapted 4 and 5
    assert costs.step_seconds([4, 5]) == pytest.approx(1.0 + 4 * 0.5 + 2 * 3.0)
    # layer 3 and 5: block 4 only passes the gradient through
    assert costs.step_seconds([3, 5]) == pytest.approx(1.0 + 3 * 0.5 + 2 * 3.0 + 2.7)
    assert costs.peak_bytes([5]) == 10_000 + 100 + 4 * 400 * 4
    assert costs.adapter_parameters([1, 2]) == 800


def test_a_smaller_shape_scales_only_the_adapter_share():
    card = make_card(GAINS)
    full_shape, small = shape_costs(card, Shape(8, MODULES)), shape_costs(card, Shape(4, ("q_proj",)))
    assert small.adapter_parameters([5]) == 50  # 100 at rank 8 -> 50 at rank 4
    # the adapter's own share of block 5 (0.3 s) shrinks by 50/400; the pass-through share is untouched
    assert small.step_seconds([5]) == pytest.approx(full_shape.step_seconds([5]) - 0.3 * (1 - 50 / 400))


# --- objectives ----------------------------------------------------------------------------------------------
def test_accuracy_without_a_budget_takes_every_layer():
    p = plan(make_card(GAINS))
    assert p.layers == tuple(range(6))
    assert p.predicted_gain_share == pytest.approx(1.0)
    assert p.binding_limits == ()
    assert "per-block calibration" in p.step_seconds.basis


def test_step_fraction_budget_cuts_the_deep_backward():
    p = plan(make_card(GAINS), budget={"max_step_fraction_of_full": 0.6})
    assert p.step_fraction_of_full.value <= 0.6
    assert 0 not in p.layers
    assert p.binding_limits == ("max_step_fraction_of_full",)
    assert p.predicted_gain.value == pytest.approx(sum(GAINS[i] for i in p.layers) * AT_REFERENCE)


def test_absolute_step_seconds_budget():
    card = make_card(GAINS)
    p = plan(card, budget={"max_step_seconds": 10.0})
    assert p.step_seconds.value <= 10.0
    # from block 3 up: 1 + 3 x 0.5 + 3 x 3 = 11.5 s, over; blocks 4 and 5: 1 + 4 x 0.5 + 2 x 3 = 9 s
    assert p.layers == (4, 5)
    assert shape_costs(card, Shape(8, MODULES)).step_seconds(p.layers) == pytest.approx(p.step_seconds.value)


def test_memory_parameter_byte_and_layer_budgets():
    card = make_card(GAINS)
    assert len(plan(card, budget={"max_layers": 2}).layers) == 2
    assert plan(card, budget={"max_layers": 2}).layers == (0, 5)  # the two largest gains
    assert plan(card, budget={"max_adapter_parameters": 800}).adapter_parameters.value <= 800
    assert plan(card, budget={"max_adapter_bytes": 1600}).layers == (0,)
    by_memory = plan(card, budget={"max_peak_memory_bytes": 10_000 + 2 * 90 + 2 * 10 + 2 * 6400})
    assert by_memory.peak_memory_bytes.value <= 10_000 + 2 * 90 + 2 * 10 + 2 * 6400
    assert by_memory.layers == (4, 5)


def test_peft_serving_budget_counts_layers():
    p = plan(make_card(GAINS), budget={"max_serving_overhead_ms_per_token": 0.25, "serving_engine": "peft"})
    assert len(p.layers) == 2
    assert p.serving_overhead_ms_per_token.value == pytest.approx(0.2)
    q = plan(make_card(GAINS), budget={"max_serving_overhead_fraction": 0.35, "serving_engine": "peft"})
    assert len(q.layers) == 3 and q.serving_overhead_fraction.value == pytest.approx(0.3)


def test_vllm_serving_budget_needs_a_measurement():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_serving_overhead_fraction": 0.5})
    assert err.value.reason == "SERVING_COST_UNKNOWN"


def test_vllm_overhead_does_not_depend_on_the_layers():
    card = make_card(GAINS, vllm_fraction=0.4)
    p = plan(card, budget={"max_serving_overhead_fraction": 0.5})
    assert p.layers == tuple(range(6))  # every layer costs vLLM the same
    assert p.serving_overhead_fraction.value == pytest.approx(0.4)
    with pytest.raises(FailedPrecondition) as err:
        plan(card, budget={"max_serving_overhead_fraction": 0.3})
    assert err.value.reason == "BUDGET_INFEASIBLE"


def test_training_time_budget_chooses_the_steps():
    card = make_card(GAINS)
    costs = shape_costs(card, Shape(8, MODULES))
    full_time = 200 * costs.step_seconds(range(6))
    p = plan(card, budget={"max_training_seconds": full_time / 2}, steps=200)
    assert p.steps * p.step_seconds.value <= full_time / 2
    assert p.steps == int(full_time / 2 // p.step_seconds.value)
    assert "max_training_seconds" in p.binding_limits
    assert "reference steps" in p.predicted_gain.basis
    # with room for every step, the plan is the unconstrained one
    roomy = plan(card, budget={"max_training_seconds": full_time * 2}, steps=200)
    assert roomy.layers == tuple(range(6)) and roomy.steps >= 200


def test_efficiency_takes_the_least_training_time_to_the_target():
    card = make_card(GAINS)
    p = plan(card, objective="efficiency", target_gain_fraction=0.4)
    assert p.predicted_gain_share >= 0.4
    costs = shape_costs(card, Shape(8, MODULES))
    target = 0.4 * sum(GAINS) * AT_REFERENCE  # of full-layer LoRA's gain at the reference steps
    tau = 200 / 3  # the prior curve's time scale: a third of the reference steps
    # nothing reaches 40% in less training time (exhaustive check, steps from the prior curve's inverse)
    import itertools

    best = math.inf
    for size in range(1, 7):
        for layers in itertools.combinations(range(6), size):
            gain = sum(GAINS[i] for i in layers)
            if gain > target:
                steps = math.ceil(-tau * math.log1p(-target / gain) - 1e-9)
                best = min(best, steps * costs.step_seconds(layers))
    assert p.steps * p.step_seconds.value == pytest.approx(best)
    assert f"in {p.steps} steps" in p.rationale
    with pytest.raises(FailedPrecondition) as err:
        plan(card, objective="efficiency", target_gain_fraction=0.99, budget={"max_layers": 2})
    assert err.value.reason == "TARGET_GAIN_UNREACHABLE"
    # the best pair (0 and 5) tops out at its gain, 13 of full-layer LoRA's 23 x AT_REFERENCE
    assert float(err.value.metadata["best_gain_share"]) == pytest.approx(13 / 23 / AT_REFERENCE, abs=1e-3)


def test_balanced_maximises_gain_per_step_second():
    card = make_card(GAINS)
    p = plan(card, objective="balanced")
    costs = shape_costs(card, Shape(8, MODULES))
    full = sum(GAINS) * AT_REFERENCE
    assert p.predicted_gain.value / p.step_seconds.value >= full / costs.step_seconds(range(6)) - 1e-9


def test_fixed_k():
    p = plan(make_card(GAINS), objective="fixed_k", k=3)
    assert p.layers == (0, 4, 5)
    limited = plan(make_card(GAINS), objective="fixed_k", k=2, budget={"max_step_fraction_of_full": 0.5})
    assert len(limited.layers) == 2 and 0 not in limited.layers
    with pytest.raises(InvalidArgument):
        plan(make_card(GAINS), objective="fixed_k", k=7)


def test_ties_go_to_the_cheaper_deeper_layers():
    card = make_card([1.0] * 6)
    assert plan(card, objective="fixed_k", k=1).layers == (5,)  # equal gain: the deepest is the cheapest step
    assert plan(card, objective="fixed_k", k=2).layers == (4, 5)
    assert plan(card, objective="fixed_k", k=2) == plan(card, objective="fixed_k", k=2)  # deterministic


def test_coupling_discounts_redundant_layers():
    coupling = [[1.0 if i == j else 0.0 for j in range(6)] for i in range(6)]
    coupling[4][5] = coupling[5][4] = 1.0  # layers 4 and 5 make the same correction
    p = plan(make_card(GAINS, coupling=coupling), objective="fixed_k", k=3)
    assert p.layers == (0, 3, 5)  # 4 adds nothing beside 5
    assert "coupling-corrected" in p.predicted_gain.basis


def test_rank_and_module_choices():
    card = make_card(GAINS)
    p = plan(
        card,
        candidate_ranks=(4, 8),
        candidate_module_sets=(("q_proj",), MODULES),
        budget={"max_adapter_parameters": 600},
    )
    assert p.adapter_parameters.value <= 600
    assert (p.rank, p.target_modules) in {(4, ("q_proj",)), (4, MODULES), (8, ("q_proj",)), (8, MODULES)}
    with pytest.raises(InvalidArgument) as err:
        plan(card, candidate_module_sets=(("gate_proj",),))
    assert err.value.violations[0].field == "candidate_module_sets"


def test_infeasible_budget_names_the_cheapest_plan():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_step_fraction_of_full": 0.1})
    e = err.value
    assert e.reason == "BUDGET_INFEASIBLE"
    assert e.metadata["cheapest_layers"] == "5"
    assert float(e.metadata["cheapest_step_fraction_of_full"]) == pytest.approx(6.5 / 19, abs=1e-4)
    assert e.metadata["violated_limits"] == "max_step_fraction_of_full"


def test_infeasible_message_names_the_cheapest_plan_with_its_predicted_cost():
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), budget={"max_step_fraction_of_full": 0.1, "max_layers": 3})
    message = err.value.message
    # layer 5 alone: 1 fixed + 5 no-graph forwards of 0.5 + 3 adapted = 6.5 s of full-layer LoRA's 19 s; the card
    # has no cache figure (an old card): priced uncached, and the message says why
    assert "the cheapest is layers [5] at rank 8 with a predicted step of 6.5 s without the frozen-prefix cache (" in (
        message
    )
    assert "the card predates the cache's bytes per token" in message
    assert "), 0.34 of full-layer LoRA's 19 s" in message
    assert "exceeds max_step_fraction_of_full (0.3421 > 0.1)" in message
    assert "max_layers" not in message  # one layer is within the limit of 3


def test_deep_models_use_the_nested_search():
    gains = [float(i % 5 + 1) for i in range(20)]
    p = plan(make_card(gains), budget={"max_step_fraction_of_full": 0.3})
    assert p.step_fraction_of_full.value <= 0.3
    assert "nested sets" in p.rationale


def test_stream_normalized_score_discounts_a_small_stream():
    stream = [0.01, 1.0, 1.0, 1.0, 1.0, 1.0]
    card = make_card(GAINS, stream=stream)
    assert plan(card, objective="fixed_k", k=1, score="stream_normalized").layers == (5,)
    assert plan(card, objective="fixed_k", k=1, score="resnorm").layers == (0,)
    with pytest.raises(FailedPrecondition) as err:
        plan(make_card(GAINS), score="stream_normalized")
    assert err.value.reason == "CARD_TOO_OLD"


def test_type_normalized_score_counts_one_types_spike_once():
    card = make_card(GAINS)
    # Block 0's o_proj carries a spike a hundred times the rest; its q_proj is the smallest of all.
    card.layers[0].modules[1].resnorm_sq = 100.0
    card.layers[0].modules[0].resnorm_sq = 0.01
    scores = layer_scores(card, "type_normalized", MODULES, 8)
    resnorm = layer_scores(card, "resnorm", MODULES, 8)
    assert max(range(6), key=lambda i: resnorm[i]) == 0
    # by type, block 0 holds nearly all of o_proj's share and almost none of q_proj's: about one type's worth
    total = 0.5 * sum(m.resnorm_sq for row in card.layers for m in row.modules)
    assert scores[0] == pytest.approx(total / 2 * (100 / (100 + 3 * 15 / 2) + 0.01 / (0.01 + 15 / 2)), rel=1e-6)
    assert sum(scores) == pytest.approx(total)  # the card's ½Res², shared out by type
    assert plan(card, objective="fixed_k", k=1, score="type_normalized").layers == (0,)
    assert plan(card, objective="fixed_k", k=2, score="type_normalized").layers == (0, 5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"objective": "fastest"}, "objective"),
        ({"target_gain_fraction": 1.5}, "target_gain_fraction"),
        ({"objective": "fixed_k", "k": 0}, "k"),
        ({"candidate_ranks": (0,)}, "candidate_ranks"),
        ({"candidate_module_sets": ((),)}, "candidate_module_sets"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_requests(kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        PlanRequest(**kwargs)
    assert err.value.violations[0].field == field


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        ({"max_step_seconds": -1.0}, "budget.max_step_seconds"),
        ({"max_layers": 0}, "budget.max_layers"),
        ({"max_training_seconds": float("nan")}, "budget.max_training_time"),
        ({"max_serving_overhead_fraction": -0.1}, "budget.max_serving_overhead_fraction"),
        ({"serving_engine": "tgi"}, "budget.serving_engine"),
    ],
)
def test_bad_budgets(budget, field):
    with pytest.raises(InvalidArgument) as err:
        BudgetSpec(**budget)
    assert err.value.violations[0].field == field


def test_unknown_score():
    with pytest.raises(InvalidArgument) as err:
        plan(make_card(GAINS), score="magic")
    assert err.value.violations[0].field == "gain_score"


def test_old_cards_without_pass_through_figures_are_refused():
    card = make_card(GAINS)
    old = dataclasses.replace(card, training_cost=dataclasses.replace(card.training_cost, forward_pass_seconds=[]))
    with pytest.raises(FailedPrecondition) as err:
        plan(old)
    assert err.value.reason == "CARD_TOO_OLD"
