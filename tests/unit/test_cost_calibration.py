"""The cost calibration's fit (card_engine/calibration.py) on a fake step source whose true costs are known: a
model where passing the gradient through a block is cheaper than adapting it, measured with noise."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import numpy as np
import pytest

from layercard_client.cardview import card_json, card_markdown, card_summary
from layercard_service.api.layer_card import card_to_proto
from layercard_service.card_engine.calibration import (
    MAX_ROUNDS,
    calibrate,
    error_quantiles,
    fit_placements,
    held_out_placements,
    nnls,
)
from layercard_service.card_engine.cost import StepSample
from layercard_service.card_engine.engine import _training_cost
from layercard_service.control.cards import StoredCard
from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.planner import plan_placement
from layercard_service.domain.card_codec import card_from_dict, card_to_dict
from layercard_service.domain.cards import (
    CardSettings,
    LayerCardData,
    LayerCardRow,
    ModuleCard,
    ServingCostCard,
)
from layercard_service.domain.plans import BudgetSpec, PlanRequest

L = 12
PARAMS = 400  # adapter parameters per block
ADAPTER_BYTES = 4 * 4 * PARAMS
WEIGHTS = 1_000_000


@dataclasses.dataclass
class FakeSteps:
    """Steps whose time is fixed + Σ N + Σ_{ℓ ≥ min S} G + Σ_{ℓ ∈ S} X, times (1 + noise): pass-through (N + G)
    is cheaper than adaptation (N + G + X). Bytes: 90 per block passing through, 100 adapted, 50 outside."""

    fixed: float = 0.5
    nograd: float = 0.05
    graph: float = 0.08
    adapter: float = 0.03
    noise: float = 0.02
    nograd_bias: float = 1.0  # the no-graph forward as measured, relative to the truth
    slow_steps: int = 0  # the first steps run this much slower: another process was busy
    clock: str = "wall"
    busy: float = 0.0  # wall time is up to (1 + busy) x the step's CPU time, at random: other processes' slices
    num_layers: int = L
    seed: int = 1
    calls: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def true_seconds(self, layers) -> float:
        low = min(layers)
        n = self.num_layers
        return self.fixed + n * self.nograd + (n - low) * self.graph + len(layers) * self.adapter

    def step(self, layers: frozenset[int]) -> StepSample:
        self.calls.append(tuple(sorted(layers)))
        seconds = self.true_seconds(layers) * (1 + self.rng.gauss(0.0, self.noise))
        seconds *= 1.5 if len(self.calls) <= self.slow_steps else 1.0
        low = min(layers)
        saved = [0] * low + [100 if i in layers else 90 for i in range(low, self.num_layers)]
        wall = seconds * (1 + self.busy * self.rng.random())
        return StepSample(wall, saved, 50, cpu_seconds=seconds)

    def forward_nograd(self) -> list[float]:
        return [self.nograd * self.nograd_bias * (1 + self.rng.gauss(0.0, self.noise)) for _ in range(self.num_layers)]


def run(source: FakeSteps):
    n = source.num_layers
    return calibrate(source, WEIGHTS, [10_000] * n, [PARAMS] * n, [ADAPTER_BYTES] * n, seed=0)


def test_the_fit_recovers_costs_where_pass_through_is_cheaper_than_adaptation():
    source = FakeSteps()
    cost, record = run(source)
    adapted = [f + b for f, b in zip(cost.forward_seconds, cost.backward_adapted_seconds)]
    passing = [f + b for f, b in zip(cost.forward_pass_seconds, cost.backward_pass_seconds)]
    figures = [cost.fixed_seconds, *adapted, *passing, *cost.forward_nograd_seconds]
    assert all(f >= 0 for f in figures)
    assert all(p < a for p, a in zip(passing, adapted))  # the failure the issue saw: pass-through dearer
    assert all(n < p for n, p in zip(cost.forward_nograd_seconds, passing))
    # The figures sum to the step: the full placement's prediction is fixed + every block adapted, and matches
    # what was measured (within the noise).
    full = tuple(range(L))
    assert cost.step_seconds(full) == pytest.approx(cost.fixed_seconds + sum(adapted))
    assert cost.step_seconds(full) == pytest.approx(source.true_seconds(full), rel=0.05)
    # Per block, close to the truth the noise hides.
    assert np.mean(passing) == pytest.approx(source.nograd + source.graph, rel=0.1)
    assert np.mean(adapted) - np.mean(passing) == pytest.approx(source.adapter, rel=0.25)
    # Any placement, not only measured ones: within a few percent.
    rng = random.Random(7)
    for _ in range(50):
        layers = tuple(sorted(rng.sample(range(L), rng.randint(1, L))))
        assert cost.step_seconds(layers) == pytest.approx(source.true_seconds(layers), rel=0.05)
    assert record.notes == []
    assert record.step_error_p50 <= record.step_error_p90 < 0.1


def test_the_held_out_placements_are_measured_but_not_fitted():
    source = FakeSteps(noise=0.0)
    _, record = run(source)
    fitted = {tuple(t.layers) for t in record.fit}
    held = [tuple(t.layers) for t in record.held_out]
    assert len(held) == 8 and len(set(held)) == 8 and not fitted & set(held)
    assert record.measured_steps == len(source.calls) == 2 * len(fitted) + 8
    # Interleaved: held-out steps come between the two rounds of the fitted ones, not all at the end.
    first_held = source.calls.index(held[0])
    assert first_held < len(source.calls) - 8
    # Without noise the model is exact, so the held-out error is (float) zero, and so is memory's.
    assert record.step_error_p90 == pytest.approx(0.0, abs=1e-9)
    assert record.memory_error_p90 == pytest.approx(0.0, abs=1e-12)
    for t in record.held_out:
        assert t.measured_peak_memory_bytes == t.predicted_peak_memory_bytes


def test_a_busy_round_costs_another_round_not_a_wrong_figure():
    fitted = len(fit_placements(L))
    source = FakeSteps(noise=0.0, slow_steps=fitted)  # the whole first round was slowed down
    cost, record = run(source)
    assert record.rounds == 3  # round 2 disagreed with round 1; round 3 agreed with round 2
    assert record.measured_steps == 3 * fitted + 8
    for layers in [(0,), (5, 9), tuple(range(L))]:
        assert cost.step_seconds(layers) == pytest.approx(source.true_seconds(layers))
    always_busy = FakeSteps(noise=0.3, seed=5)
    _, record = run(always_busy)
    assert record.rounds == MAX_ROUNDS  # at most, however noisy


def test_on_a_busy_machine_the_cpu_clock_keeps_the_figures():
    """Other processes' time slices stretch wall time at random (up to 2x here): the least of a few rounds of wall
    time still carries them, the thread's CPU time does not."""
    rng = random.Random(11)
    sets = [tuple(sorted(rng.sample(range(L), rng.randint(1, L)))) for _ in range(30)]

    def worst(clock: str) -> float:
        source = FakeSteps(noise=0.0, busy=1.0, clock=clock, seed=4)
        cost, _ = run(source)
        full = tuple(range(L))
        truth = {s: source.true_seconds(s) / source.true_seconds(full) for s in sets}
        return max(abs(cost.step_seconds(s) / cost.step_seconds(full) / truth[s] - 1) for s in sets)

    assert worst("cpu") < 1e-9  # CPU time is exact here; the wall-clock fit is not
    assert worst("wall") > 0.01
    source = FakeSteps(noise=0.0, busy=1.0, clock="cpu", seed=4)
    cost, record = run(source)
    assert "thread's CPU time" in record.method
    assert any("the machine was busy" in note for note in record.notes)
    # Scaled to wall time by the quietest steps, never below the step's own CPU time.
    full = tuple(range(L))
    assert source.true_seconds(full) <= cost.step_seconds(full) <= 1.3 * source.true_seconds(full)


def test_the_held_out_error_is_the_relative_step_error_of_the_unfitted_placements():
    source = FakeSteps(noise=0.05, seed=3)
    _, record = run(source)
    errors = [abs(t.predicted_seconds - t.measured_seconds) / t.measured_seconds for t in record.held_out]
    assert record.step_error_p50 == pytest.approx(float(np.median(errors)))
    assert record.step_error_p90 == pytest.approx(float(np.quantile(errors, 0.9)))
    assert record.step_error_p90 > 0


def test_error_quantiles_interpolate():
    measured = [1.0] * 8
    predicted = [1.0 + e for e in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]
    p50, p90 = error_quantiles(predicted, measured)
    assert p50 == pytest.approx(0.35)
    assert p90 == pytest.approx(0.63)
    assert error_quantiles([], []) == (0.0, 0.0)


def test_a_figure_at_its_bound_is_named_with_what_the_fit_wanted():
    # The no-graph forward measured at 3x the truth leaves less than nothing for the fixed part: the fit puts it
    # at 0 and the card says so instead of clipping it silently.
    _, record = run(FakeSteps(noise=0.0, nograd_bias=3.0))
    (note,) = [n for n in record.notes if "fixed" in n]
    assert "at its bound 0" in note
    wanted = float(note.rsplit("would be ", 1)[1].split(" ")[0])
    assert wanted < 0


def test_nnls_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    grid = np.asarray(list(itertools.product(np.linspace(0, 3, 61), repeat=3)))  # [61³, 3]
    for _ in range(20):
        a, b = rng.normal(size=(6, 3)), rng.normal(size=6)
        x = nnls(a, b)
        assert np.all(x >= 0)
        best = np.min(np.sum((grid @ a.T - b) ** 2, axis=1))
        assert np.sum((a @ x - b) ** 2) <= best + 1e-9


def test_placements_cover_every_regime_and_shallow_models_say_what_is_missing():
    fitted = fit_placements(8)
    assert fitted == [tuple(range(8)), (0,), (4, 5, 6, 7), (7,)]
    held = held_out_placements(8, 8, seed=0, exclude=fitted)
    assert held == held_out_placements(8, 8, seed=0, exclude=fitted)  # seeded
    assert len(held) == 8 and not set(held) & set(fitted)
    # Two blocks have 3 placements, all of them fitted: no held-out placement, and the record says so.
    _, record = run(FakeSteps(num_layers=2, noise=0.0))
    assert record.held_out == []
    assert any("only 0 held-out placements" in n for n in record.notes)
    _, record = run(FakeSteps(num_layers=1, noise=0.0))
    assert any("underdetermined" in n for n in record.notes)


# --- the stored form, the contract and the views -------------------------------------------------------------
def fitted_card(source: FakeSteps | None = None) -> LayerCardData:
    cost, record = run(source or FakeSteps())
    rows = [
        LayerCardRow(
            index=i,
            resnorm_sq=1.0 + i,
            resnorm_sq_split_half=1.0 + i,
            resnorm_share=0.0,
            predicted_gain=0.5 + i / 2,
            activation_energy=1.0,
            effective_rank=4.0,
            condition_number=10.0,
            modules=[ModuleCard("q_proj", 1.0 + i, 1.0 + i, 1.0, 4.0, 10.0, PARAMS)],
            forward_seconds=cost.forward_seconds[i],
            backward_seconds=cost.backward_adapted_seconds[i],
            activation_bytes=cost.saved_adapted_bytes[i],
            adapter_parameters=PARAMS,
            adapter_bytes=4 * PARAMS,
            peft_serving_overhead_ms_per_token=0.1,
        )
        for i in range(L)
    ]
    return LayerCardData(
        model="builtin:tiny",
        architecture="LlamaForCausalLM",
        num_layers=L,
        num_parameters=1000,
        module_types=["q_proj"],
        settings=CardSettings(rank=8, target_modules=("q_proj",)),
        layers=rows,
        training_cost=_training_cost(cost, record, L, 16, 32),
        serving_cost=ServingCostCard(peft_base_ms_per_token=1.0),
        probe_loss=5.0,
        probe_examples=64,
        probe_tokens=1000,
        compute_seconds=1.0,
    ), cost


def test_the_planner_prices_a_placement_with_the_fitted_figures():
    card, cost = fitted_card()
    costs = shape_costs(card, Shape(8, ("q_proj",)))
    for layers in [(0,), (11,), (3, 7), tuple(range(6, 12)), tuple(range(L))]:
        assert costs.step_seconds(layers) == pytest.approx(cost.step_seconds(layers))
        assert costs.peak_bytes(layers) == cost.peak_bytes(layers)
    plan = plan_placement(card, PlanRequest(budget=BudgetSpec(max_step_fraction_of_full=0.6)))
    assert plan.step_seconds.value == pytest.approx(cost.step_seconds(plan.layers))
    assert "8 held-out random placements p50" in plan.step_seconds.basis


def test_codec_round_trips_the_calibration_and_old_cards_still_load():
    card, _ = fitted_card()
    stored = json.loads(json.dumps(card_to_dict(card)))  # as the store keeps it
    assert card_from_dict(stored) == card
    old = json.loads(json.dumps(card_to_dict(card)))
    del old["training_cost"]["calibration"]  # a card stored before the fitted calibration
    loaded = card_from_dict(old)
    assert loaded.training_cost.calibration is None
    assert loaded.layers == card.layers
    # Older still: no pass-through or no-graph figures at all. The contract shows 0 and the views still render.
    for key in ("forward_pass_seconds", "backward_pass_seconds", "forward_nograd_seconds", "pass_activation_bytes"):
        del old["training_cost"][key]
    oldest = card_from_dict(old)
    message = card_to_proto(StoredCard("layerCards/old", "f" * 16, 0.0, oldest, from_store=True))
    assert not message.training_cost.HasField("calibration")
    assert all(layer.pass_through_seconds == 0 and layer.no_graph_seconds == 0 for layer in message.layers)
    assert "held out" not in card_markdown(message) and "step time" in card_summary(message)


def test_the_contract_and_the_views_carry_every_figure_the_planner_uses():
    card, cost = fitted_card()
    message = card_to_proto(StoredCard("layerCards/x", "f" * 16, 0.0, card, from_store=False))
    for i, layer in enumerate(message.layers):
        assert layer.pass_through_seconds == pytest.approx(cost.forward_pass_seconds[i] + cost.backward_pass_seconds[i])
        assert layer.no_graph_seconds == pytest.approx(cost.forward_nograd_seconds[i])
        assert layer.pass_through_activation_bytes == cost.saved_pass_bytes[i]
    calibration = message.training_cost.calibration
    assert len(calibration.held_out_placements) == 8
    assert calibration.step_error_p90 == pytest.approx(card.training_cost.calibration.step_error_p90)
    exported = json.loads(card_json(message))
    assert "pass_through_seconds" in exported["layers"][1] and "no_graph_seconds" in exported["layers"][1]
    assert len(exported["training_cost"]["calibration"]["held_out_placements"]) == 8
    markdown = card_markdown(message)
    assert "pass-through ms" in markdown and "no-graph ms" in markdown
    assert markdown.count("| held out |") == 8
    assert f"p90 {calibration.step_error_p90:.1%}" in card_summary(message)
