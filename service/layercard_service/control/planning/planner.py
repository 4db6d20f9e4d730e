"""The placement planner: a card and a request in, a plan with every prediction and its basis out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from layercard_service.control.cards import CARD_PREFIX, CardService
from layercard_service.control.planning.pricing import uncached_reason
from layercard_service.control.planning.solver import Candidate, Solution, gain_basis, solve
from layercard_service.control.planning.vllm_fleet import Calibration, VllmFleet
from layercard_service.domain.cards import LayerCardData, TrainingCostCard
from layercard_service.domain.plans import CurvePoint, Estimate, Plan, PlanRequest
from layercard_service.errors import InvalidArgument
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES

__all__ = ["PlacementPlanner", "plan_placement"]


def _layers(layers: tuple[int, ...]) -> str:
    return ", ".join(str(i) for i in layers)


def plan_placement(
    card: LayerCardData,
    request: PlanRequest,
    card_name: str = "",
    prefix_cache_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    vllm: Sequence[VllmFleet] | VllmFleet | None = None,
) -> Plan:
    """``prefix_cache_memory_bytes``: the workers' bound on the frozen-prefix cache in memory (beyond it, a file).
    ``vllm``: what each serving pool wraps and measured: the plan is priced on, and names, the pool serving it."""
    solution = solve(card, request, prefix_cache_memory_bytes, vllm)
    chosen, full, costs = solution.chosen, solution.full, solution.costs
    tc = card.training_cost
    low = min(chosen.layers)
    calibration = f"per-block calibration on the card (batch {tc.batch_size}, {tc.seq_len} tokens; {_validation(tc)})"
    step_basis = f"{calibration}: no-graph forward below block {low}, backward from block {low} up"
    if chosen.shape.rank != card.settings.rank or set(chosen.shape.modules) != set(card.module_types):
        step_basis += "; adapter share of adapted blocks scaled by adapter parameters"
    step_basis += f"; {_cache_basis(solution)}"
    build = cache_size = None
    memory_basis = (
        f"weights + activations saved from block {low} up (calibrated per block) + 4x adapter parameters "
        "(weights, gradient, AdamW moments)"
    )
    if chosen.cache is not None:
        run = solution.run
        estimated = f"estimated for {run.examples} examples ({run.examples_source}) at the probe's tokens per example"
        where = "on disk: over the service's prefix_cache_memory_bytes bound" if chosen.cache.on_disk else "in memory"
        build = Estimate(chosen.cache.build_seconds, "s", f"no-grad forward of blocks 0..{low - 1}, {estimated}")
        cache_size = Estimate(chosen.cache.cache_bytes, "bytes", f"{where}; {estimated}")
        if not chosen.cache.on_disk:
            memory_basis += " + the frozen-prefix cache (in memory)"
    engine = request.budget.serving_engine
    serving_ms = serving_fraction = None
    if chosen.serving_ms is not None:
        serving_basis = (
            "unmerged peft decoding, per-layer overhead measured on the card's machine"
            if engine == "peft"
            else f"vLLM wraps every layer of its module types, so the overhead does not depend on the layers; "
            f"{costs.vllm_basis}; ms per token against "
            + (
                f"the serving vLLM's measured base inter-token time, {costs.vllm_base_ms:.3g} ms"
                if costs.vllm_base_ms is not None
                else f"the card's peft base decode time, {costs.peft_base_ms:.3g} ms (no vLLM base time measured)"
            )
        )
        serving_ms = Estimate(chosen.serving_ms, "ms/token", serving_basis)
        serving_fraction = Estimate(chosen.serving_fraction or 0.0, "fraction", serving_basis)
    steps = chosen.steps
    share = chosen.value / full.value if full.value > 0 else 0.0
    run_steps = steps or request.steps
    gain_source = (
        f"{gain_basis(solution, card)}, saturated at the probe loss ({card.probe_loss:.4g} nats); at {run_steps} "
        f"steps on {solution.curves.basis}"
    )

    fraction = chosen.step_seconds / full.step_seconds
    return Plan(
        layers=chosen.layers,
        rank=chosen.shape.rank,
        alpha=2.0 * chosen.shape.rank,
        target_modules=chosen.shape.modules,
        objective=request.objective,
        predicted_gain=Estimate(chosen.value, "nats", gain_source),
        predicted_gain_share=share,
        step_seconds=Estimate(chosen.step_seconds, "s", step_basis),
        step_fraction_of_full=Estimate(fraction, "fraction", f"{_fraction_basis(chosen)}; {calibration}"),
        peak_memory_bytes=Estimate(chosen.peak_bytes, "bytes", memory_basis),
        adapter_parameters=Estimate(chosen.parameters, "params", "exact: rank x (d_in + d_out) per adapted module"),
        adapter_bytes=Estimate(chosen.adapter_bytes, "bytes", "exact: adapter parameters x bytes per parameter"),
        serving_overhead_ms_per_token=serving_ms,
        serving_overhead_fraction=serving_fraction,
        steps=steps,
        binding_limits=solution.binding,
        rationale=_rationale(solution, request, share, fraction, steps),
        score=solution.score,
        layer_card=card_name,
        prefix_cache_build_seconds=build,
        prefix_cache_bytes=cache_size,
        predicted_curve=_curve(chosen, max(run_steps, request.steps)),
        learning_rate=chosen.learning_rate,
        serving_pool=solution.pool.pool if solution.pool is not None else "",
    )


CURVE_POINTS = 8


def _curve(chosen: Candidate, horizon: int) -> tuple[CurvePoint, ...]:
    """The chosen set's predicted learning curve at evenly spaced steps up to ``horizon``, with its band."""
    points = []
    for i in range(1, CURVE_POINTS + 1):
        n = max(1, round(horizon * i / CURVE_POINTS))
        curve = chosen.curve
        seconds = chosen.build_seconds + n * chosen.step_seconds
        points.append(CurvePoint(n, seconds, curve.gain(n), curve.low(n), curve.high(n)))
    return tuple(points)


def _cache_basis(solution: Solution) -> str:
    """How the step treats the frozen-prefix cache, and why."""
    chosen, run = solution.chosen, solution.run
    low = min(chosen.layers)
    if chosen.cache is None:
        return f"without the frozen-prefix cache: {uncached_reason(run, chosen.layers, chosen.run_steps)}"
    c = chosen.cache
    where = "on disk" if c.on_disk else "in memory"
    text = (
        f"frozen-prefix cache over blocks 0..{low - 1}: built once in {c.build_seconds:.3g} s over {run.examples} "
        f"examples, {c.cache_bytes / 2**20:.1f} MiB {where}; each step skips their no-grad forward "
        f"({chosen.uncached_step_seconds:.4g} s without)"
    )
    if run.run_batch != run.card_batch:
        text += (
            f"; step and pass priced per card batch of {run.card_batch}: the run's batch of {run.run_batch} sets "
            "only the epoch rule"
        )
    return text


def _fraction_basis(chosen: Candidate) -> str:
    if chosen.cache is None:
        return "both steps predicted the same way"
    # Full-layer LoRA adapts block 0: there is no prefix to cache.
    return "this plan's cached step over full-layer LoRA's step (never cached: block 0 is adapted)"


def _cache_rationale(chosen: Candidate) -> str:
    if chosen.cache is None:
        return ""
    return (
        f"; the frozen-prefix cache skips blocks 0-{chosen.cache.cached_blocks - 1} in every step "
        f"({chosen.step_seconds:.4g} s instead of {chosen.uncached_step_seconds:.4g} s, "
        f"after a {chosen.build_seconds:.3g} s building pass)"
    )


def _validation(tc: TrainingCostCard) -> str:
    fit = tc.calibration
    if fit is None:
        return f"validated to {tc.step_time_relative_error:.0%} on a measured step"
    text = (
        f"fitted to {len(fit.fit)} measured placements; error on {len(fit.held_out)} held-out random placements "
        f"p50 {fit.step_error_p50:.0%}, p90 {fit.step_error_p90:.0%}"
    )
    return text + (f"; the card's cost notes: {' '.join(fit.notes)}" if fit.notes else "")


def _rationale(solution: Solution, request: PlanRequest, share: float, fraction: float, steps: int) -> str:
    chosen = solution.chosen
    goal = {
        "accuracy": "the highest predicted gain within the budget",
        "efficiency": f"the least training time to {request.target_gain_fraction:.0%} of full-layer LoRA's gain",
        "balanced": "the best predicted gain per second of training step",
        "fixed_k": f"the highest predicted gain with exactly {request.k} layers",
    }[request.objective]
    text = (
        f"{goal}: layers {_layers(chosen.layers)} at rank {chosen.shape.rank} on {', '.join(chosen.shape.modules)} "
        f"predict {share:.0%} of full-layer LoRA's gain ({solution.score}) at {fraction:.2f} of its step time"
    )
    if len(solution.curves.learning_rates) > 1:
        text += f"; learning rate {chosen.learning_rate:g} of the pilots' {_rates(solution.curves.learning_rates)}"
    if min(chosen.layers) > 0:
        text += f"; backward stops at block {min(chosen.layers)}"
    text += _cache_rationale(chosen)
    if solution.binding:
        text += f"; binding: {', '.join(solution.binding)}"
    if steps and request.objective == "efficiency":
        text += f"; the predicted curve reaches it in {steps} steps, {chosen.training_seconds:.4g} s of training"
    elif steps:
        text += f"; {steps} steps fit the training-time budget (reference {request.steps})"
    if not solution.exhaustive:
        text += "; deep model: nested sets per lowest layer searched, not every subset"
    return text


def _rates(rates: tuple[float, ...]) -> str:
    return ", ".join(f"{r:g}" for r in rates)


def calibrated(card: LayerCardData, calibration: Calibration | None, pools: Sequence[VllmFleet] = ()) -> LayerCardData:
    """The card with vLLM's serving overhead taken from the fleet's measurements, when there are any, and with
    each serving pool's figures (``pools``)."""
    if calibration is None and not pools:
        return card
    serving = dataclasses.replace(card.serving_cost, vllm_pools=tuple(p.cost() for p in pools))
    if calibration is not None:
        serving = dataclasses.replace(
            serving,
            vllm_overhead_fraction=calibration.overhead_fraction,
            vllm_basis=calibration.basis,
            vllm_base_ms_per_token=calibration.base_ms_per_token,
        )
    return dataclasses.replace(card, serving_cost=serving)


class PlacementPlanner:
    """Plans from stored cards; reading the card (and the fleet's serving measurements) is the only I/O."""

    def __init__(
        self,
        cards: CardService,
        serving_calibration: Callable[[str], Calibration | None] | None = None,
        prefix_cache_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        vllm_fleet: Callable[[str, int], Sequence[VllmFleet]] | None = None,
    ) -> None:
        self.cards = cards
        self.serving_calibration = serving_calibration
        # (model, streams) -> the pools serving it (LoRA settings, per-rank probes at that concurrency); () if none
        self.vllm_fleet = vllm_fleet
        self.prefix_cache_memory_bytes = prefix_cache_memory_bytes  # the service's setting, which its workers get

    def plan(self, card_name: str, request: PlanRequest) -> Plan:
        if not card_name.startswith(CARD_PREFIX) or card_name == CARD_PREFIX:
            raise InvalidArgument.field(
                "layer_card", f"must name a stored card as 'layerCards/{{card_id}}', got {card_name!r}"
            )
        stored = self.cards.get(card_name)
        card = stored.card
        if self.serving_calibration is not None:
            card = calibrated(card, self.serving_calibration(card.model))
        streams = request.budget.serving_concurrency
        pools = self.vllm_fleet(card.model, streams) if self.vllm_fleet is not None else ()
        return plan_placement(card, request, stored.name, self.prefix_cache_memory_bytes, pools or None)
