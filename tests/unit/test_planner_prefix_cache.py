"""The planner prices the frozen-prefix cache where the trainer would use it (synthetic cards, exact figures).

make_card's figures: per block 0.5 s no-graph forward, 3 s adapted, 2.7 s pass-through; fixed 1 s; batch 16;
64 probe examples with 1000 tokens. Layer 5 alone: 6.5 s uncached, 6.5 - 5 x 0.5 = 4 s cached; full-layer 19 s.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from test_planner import GAINS, MODULES, make_card, plan

from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.pricing import cache_run, price
from layercard_service.domain.cards import CardDataset
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES

BYTES_PER_TOKEN = 256  # e.g. hidden size 64 in float32


def cache_card(bytes_per_token: int = BYTES_PER_TOKEN, **kwargs):
    card = make_card(GAINS, **kwargs)
    tc = dataclasses.replace(card.training_cost, prefix_cache_bytes_per_token=bytes_per_token)
    return dataclasses.replace(card, training_cost=tc)


def priced(card, layers, **request):
    budget = request.pop("budget", {})
    plan_request = PlanRequest(budget=BudgetSpec(**budget), **request)
    return price(shape_costs(card, Shape(8, MODULES)), layers, cache_run(card, plan_request), plan_request)


def test_a_placement_above_block_0_is_priced_cached():
    p = priced(cache_card(), (5,))
    assert p.cache is not None and p.cache.cached_blocks == 5
    assert p.step_seconds == pytest.approx(4.0)
    assert p.cache.build_seconds == pytest.approx(4 * 2.5)  # 64 examples in 4 batches of 16, 5 blocks each
    assert p.cache.cache_bytes == 1000 * BYTES_PER_TOKEN  # the probe's tokens per example x 64 examples
    assert p.peak_bytes == shape_costs(cache_card(), Shape(8, MODULES)).peak_bytes((5,)) + p.cache.cache_bytes


@pytest.mark.parametrize(
    ("layers", "request_fields"),
    [
        ((0, 5), {}),  # block 0 adapted: no frozen prefix
        ((5,), {"prefix_cache": False}),  # the job turns it off
        ((5,), {"steps": 4}),  # 4 steps of 4 batches: each example seen once, the trainer does not build it
    ],
    ids=["block 0", "turned off", "one epoch"],
)
def test_where_the_trainer_would_not_cache_the_step_is_uncached(layers, request_fields):
    card = cache_card()
    p = priced(card, layers, **request_fields)
    assert p.cache is None
    assert p.step_seconds == pytest.approx(shape_costs(card, Shape(8, MODULES)).step_seconds(layers))


def test_the_epoch_rule_counts_the_runs_batches():
    assert priced(cache_card(), (5,), steps=5).cache is not None  # 5 steps > 4 batches: a second epoch
    # A run batch of 64 makes one batch an epoch; the pass is still priced in the card's batches.
    wide = priced(cache_card(), (5,), steps=2, batch_size=64)
    assert wide.cache is not None and wide.cache.build_seconds == pytest.approx(10.0)
    assert priced(cache_card(), (5,), steps=16, train_examples=256).cache is None  # 16 batches of 16
    assert priced(cache_card(), (5,), steps=17, train_examples=256).cache.build_seconds == pytest.approx(16 * 2.5)


def test_the_training_time_budget_pays_the_building_pass_before_the_steps():
    p = priced(cache_card(), (5,), budget={"max_training_seconds": 100.0})
    assert p.cache is not None and p.steps == math.floor((100.0 - 10.0) / 4.0)
    # The pass leaves room for no more than an epoch of steps: the trainer would not build it; uncached steps.
    short = priced(cache_card(), (5,), budget={"max_training_seconds": 20.0})
    assert short.cache is None and short.steps == math.floor(20.0 / 6.5)


def test_a_cache_over_the_memory_bound_lives_on_disk_and_adds_no_memory():
    big = DEFAULT_MAX_MEMORY_BYTES // 1000 + 1  # 1000 tokens x this > the bound
    p = priced(cache_card(big), (5,))
    assert p.cache.on_disk and p.cache.cache_bytes > DEFAULT_MAX_MEMORY_BYTES
    assert p.peak_bytes == shape_costs(cache_card(big), Shape(8, MODULES)).peak_bytes((5,))
    shown = plan(cache_card(big), budget={"max_step_seconds": 5.0})
    assert "on disk" in shown.prefix_cache_bytes.basis and "cache" not in shown.peak_memory_bytes.basis


def test_the_services_memory_bound_reaches_the_planner_and_the_workers(tmp_path):
    # The same setting bounds the cache in the worker and in the plan: a plan never counts memory a worker would
    # not spend, nor leaves out what it would.
    from layercard_service.config import ServiceConfig
    from layercard_service.control.planning.planner import plan_placement
    from layercard_service.runners.local import worker_command

    assert ServiceConfig.load([], environ={}).prefix_cache_memory_bytes == DEFAULT_MAX_MEMORY_BYTES
    bound = 1000 * BYTES_PER_TOKEN - 1  # the card's cache is 1000 tokens: just over this bound
    request = PlanRequest(budget=BudgetSpec(max_step_seconds=5.0))
    in_memory, on_disk = plan_placement(cache_card(), request), plan_placement(cache_card(), request, "", bound)
    assert "in memory" in in_memory.prefix_cache_bytes.basis and "on disk" in on_disk.prefix_cache_bytes.basis
    assert in_memory.peak_memory_bytes.value - on_disk.peak_memory_bytes.value == 1000 * BYTES_PER_TOKEN
    argv = worker_command(tmp_path, (), (), 16, prefix_cache_memory_bytes=bound)("job-a")
    assert argv[argv.index("--prefix-cache-memory-bytes") + 1] == str(bound)


def test_the_runs_examples_default_to_the_cards_dataset():
    dataset = CardDataset("builtin", "builtin:cipher", "train", "f", 64, 320)
    card = dataclasses.replace(cache_card(), dataset=dataset)
    run = cache_run(card, PlanRequest())
    assert (run.examples, run.tokens, run.run_batch) == (320, 5000, 16)
    assert cache_run(card, PlanRequest(train_examples=32)).examples == 32


def test_a_budget_only_the_cached_step_meets_plans_it_and_says_so():
    card = cache_card()
    p = plan(card, budget={"max_step_seconds": 5.0})  # uncached, the cheapest step is 6.5 s
    assert p.layers == (5,) and p.step_seconds.value == pytest.approx(4.0)
    assert p.step_fraction_of_full.value == pytest.approx(4.0 / 19.0)  # full-layer LoRA is never cached
    assert "frozen-prefix cache over blocks 0..4: built once in 10 s over 64 examples" in p.step_seconds.basis
    assert "(6.5 s without)" in p.step_seconds.basis and "frozen-prefix cache" in p.rationale
    assert p.prefix_cache_build_seconds.value == pytest.approx(10.0)
    assert p.prefix_cache_bytes.value == 1000 * BYTES_PER_TOKEN and "in memory" in p.prefix_cache_bytes.basis
    assert "frozen-prefix cache (in memory)" in p.peak_memory_bytes.basis

    with pytest.raises(FailedPrecondition) as err:
        plan(card, budget={"max_step_seconds": 5.0}, prefix_cache=False)
    e = err.value
    assert e.reason == "BUDGET_INFEASIBLE" and e.metadata["cheapest_prefix_cache"] == "off"
    assert "with a predicted step of 6.5 s without the frozen-prefix cache (the request turns" in e.message


def test_an_infeasible_budget_names_the_cheapest_plans_cached_cost():
    with pytest.raises(FailedPrecondition) as err:
        plan(cache_card(), budget={"max_step_seconds": 3.0})
    e = err.value
    assert "layers [5] at rank 8 with a predicted step of 4 s with the frozen-prefix cache (6.5 s without" in e.message
    assert e.metadata["cheapest_prefix_cache"] == "on"
    assert float(e.metadata["cheapest_step_seconds"]) == pytest.approx(4.0)
    assert float(e.metadata["cheapest_uncached_step_seconds"]) == pytest.approx(6.5)


def test_an_old_card_plans_uncached_and_the_basis_says_why():
    p = plan(make_card(GAINS), budget={"max_step_seconds": 7.0})
    assert p.layers == (5,) and p.step_seconds.value == pytest.approx(6.5)
    assert "without the frozen-prefix cache: the card predates the cache's bytes per token" in p.step_seconds.basis
    assert p.prefix_cache_build_seconds is None and p.prefix_cache_bytes is None


def test_a_plan_with_block_0_says_there_is_no_prefix():
    p = plan(cache_card())
    assert p.layers == tuple(range(6)) and "block 0 is adapted" in p.step_seconds.basis


@pytest.mark.parametrize("field", ["train_examples", "batch_size"])
def test_negative_run_figures_are_refused(field):
    with pytest.raises(InvalidArgument) as err:
        PlanRequest(**{field: -1})
    assert err.value.violations[0].field == field
