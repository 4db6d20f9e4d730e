"""PlacementService: proto <-> domain conversion only."""

from __future__ import annotations

import asyncio

from google.protobuf import duration_pb2

from layercard.v1 import common_pb2, placement_pb2, placement_pb2_grpc, tuning_pb2
from layercard_service.control.planning.planner import PlacementPlanner
from layercard_service.domain.budgets import BUDGET_KINDS
from layercard_service.domain.plans import DEFAULT_STEPS, BudgetSpec, Estimate, Plan, PlanRequest

__all__ = [
    "PlacementServicer",
    "budget_from_proto",
    "objective_from_name",
    "objective_name",
    "placement_to_proto",
    "plan_request_from_card_budget",
    "prediction_from_estimate",
]

_OBJECTIVES = {
    placement_pb2.OBJECTIVE_UNSPECIFIED: "accuracy",
    placement_pb2.OBJECTIVE_ACCURACY: "accuracy",
    placement_pb2.OBJECTIVE_EFFICIENCY: "efficiency",
    placement_pb2.OBJECTIVE_BALANCED: "balanced",
    placement_pb2.OBJECTIVE_FIXED_K: "fixed_k",
}
_OBJECTIVE_NUMBERS = {"accuracy": 1, "efficiency": 2, "balanced": 3, "fixed_k": 4}
_OBJECTIVE_NAMES = {number: name for name, number in _OBJECTIVE_NUMBERS.items()}
_ENGINES = {
    common_pb2.SERVING_ENGINE_UNSPECIFIED: "vllm",
    common_pb2.SERVING_ENGINE_VLLM: "vllm",
    common_pb2.SERVING_ENGINE_PEFT: "peft",
}


def budget_from_proto(budget: placement_pb2.Budget) -> BudgetSpec:
    """Each set limit by the table of budget kinds; a Duration (max_training_time) becomes seconds."""
    limits: dict[str, float | None] = {}
    for kind in BUDGET_KINDS:
        if budget.HasField(kind.proto_field):
            value = getattr(budget, kind.proto_field)
            limits[kind.name] = value.ToNanoseconds() / 1e9 if isinstance(value, duration_pb2.Duration) else value
    return BudgetSpec(
        serving_engine=_ENGINES.get(budget.serving_engine, "?"),
        serving_concurrency=budget.serving_concurrency or 1,
        **limits,
    )


def _request(
    objective: int, budget, target: float, k: int, ranks=(), module_sets=(), steps=0, score="", **run
) -> PlanRequest:
    return PlanRequest(
        objective=_OBJECTIVES.get(objective, "?"),
        budget=budget_from_proto(budget),
        target_gain_fraction=target or 0.9,
        k=k,
        candidate_ranks=tuple(ranks),
        candidate_module_sets=tuple(
            tuple(name.strip() for name in entry.split(",") if name.strip()) for entry in module_sets
        ),
        steps=steps or DEFAULT_STEPS,
        score=score,
        **run,
    )


def plan_request_from_card_budget(message: tuning_pb2.CardBudget) -> tuple[str, PlanRequest]:
    """A tuning job's card_budget: the card's name and the plan request (the tuning service sets its steps)."""
    request = _request(message.objective, message.budget, message.target_gain_fraction, message.k)
    return message.layer_card, request


def objective_name(number: int) -> str:
    """A placement's objective as the domain names it; "" when unspecified or unknown (a caller's placement)."""
    return _OBJECTIVE_NAMES.get(number, "")


def objective_from_name(name: str) -> int:
    return _OBJECTIVE_NUMBERS.get(name, placement_pb2.OBJECTIVE_UNSPECIFIED)


def prediction_from_estimate(estimate: Estimate) -> common_pb2.Prediction:
    return common_pb2.Prediction(value=estimate.value, unit=estimate.unit, basis=estimate.basis)


def _estimate(estimate: Estimate | None) -> common_pb2.Prediction | None:
    return None if estimate is None else prediction_from_estimate(estimate)


def placement_to_proto(plan: Plan) -> placement_pb2.Placement:
    return placement_pb2.Placement(
        layer_card=plan.layer_card,
        objective=_OBJECTIVE_NUMBERS[plan.objective],
        layers=list(plan.layers),
        lora=common_pb2.LoraShape(rank=plan.rank, alpha=plan.alpha, target_modules=list(plan.target_modules)),
        predicted_gain=_estimate(plan.predicted_gain),
        predicted_gain_share=plan.predicted_gain_share,
        step_seconds=_estimate(plan.step_seconds),
        step_fraction_of_full=_estimate(plan.step_fraction_of_full),
        peak_memory_bytes=_estimate(plan.peak_memory_bytes),
        adapter_parameters=_estimate(plan.adapter_parameters),
        adapter_bytes=_estimate(plan.adapter_bytes),
        serving_overhead_ms_per_token=_estimate(plan.serving_overhead_ms_per_token),
        serving_overhead_fraction=_estimate(plan.serving_overhead_fraction),
        steps=plan.steps,
        binding_limits=list(plan.binding_limits),
        rationale=plan.rationale,
        gain_score=plan.score,
        prefix_cache_build_seconds=_estimate(plan.prefix_cache_build_seconds),
        prefix_cache_bytes=_estimate(plan.prefix_cache_bytes),
        predicted_curve=[
            placement_pb2.CurvePoint(
                steps=p.steps, seconds=p.seconds, gain=p.gain, gain_low=p.gain_low, gain_high=p.gain_high
            )
            for p in plan.predicted_curve
        ],
        learning_rate=plan.learning_rate,
        serving_pool=plan.serving_pool,
    )


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, planner: PlacementPlanner) -> None:
        self.planner = planner

    async def PlanPlacement(self, request: placement_pb2.PlanPlacementRequest, context) -> placement_pb2.Placement:
        plan_request = _request(
            request.objective,
            request.budget,
            request.target_gain_fraction,
            request.k,
            request.candidate_ranks,
            request.candidate_module_sets,
            request.steps,
            request.gain_score,
            prefix_cache=request.prefix_cache if request.HasField("prefix_cache") else True,  # unset: on
            train_examples=request.train_examples,
            batch_size=request.batch_size,
        )
        # Reading the card and the search are short but not free (2^L sets): keep them off the event loop.
        plan = await asyncio.to_thread(self.planner.plan, request.layer_card, plan_request)
        return placement_to_proto(plan)
