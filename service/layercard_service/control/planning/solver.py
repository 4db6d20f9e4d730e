"""Placement under a budget: pick layers, rank, module types and learning rate from a Layer Card (METHOD.md).

Candidates: for models of up to ``EXACT_MAX_LAYERS`` blocks every non-empty layer set is scored (2^L is small);
deeper models get, for each lowest layer m (which fixes the backward cost), the nested sets that add the layers
above m in descending score order. Each candidate is priced with the card's cost model, filtered by the budget,
and the objective picks one; each set is a candidate at every learning rate the card's pilots measured. Ties go to
the cheaper step, then the fewer parameters, then the deeper layers, then the lower learning rate.
A limit "binds" when dropping it alone would change the plan. With the serving pools known (``vllm``), each shape
is priced on the pool that would serve it, and under a vLLM serving budget every pool offers its own shapes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from layercard_service.control.planning.costs import Shape, ShapeCosts, shape_costs
from layercard_service.control.planning.curves import steps_to_reach
from layercard_service.control.planning.gains import DEFAULT_SCORE, layer_scores, score_basis, set_gain
from layercard_service.control.planning.learning import CurveModel
from layercard_service.control.planning.pricing import MAX_PLANNED_STEPS, CacheRun, cache_run, price, uncached_reason
from layercard_service.control.planning.vllm_fleet import VllmFleet, serving_pool
from layercard_service.domain.budgets import BUDGET_KINDS
from layercard_service.domain.cards import LayerCardData
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES, CachedCost

__all__ = ["Candidate", "EXACT_MAX_LAYERS", "Solution", "solve"]

EXACT_MAX_LAYERS = 12
MAX_LISTED_PROBLEMS = 10  # of the shapes no pool can serve, in the error


@dataclass(frozen=True)
class Candidate:
    layers: tuple[int, ...]
    shape: Shape
    gain: float
    step_seconds: float
    peak_bytes: int
    parameters: int
    adapter_bytes: int
    serving_ms: float | None
    serving_fraction: float | None
    steps: int = 0  # with a training-time budget: the steps that fit; efficiency: the steps to the target
    value: float = 0.0  # the gain the objective ranks by: the set's learning curve at the run's steps
    uncached_step_seconds: float = 0.0  # the step without the frozen-prefix cache (step_seconds when uncached)
    cache: CachedCost | None = None  # the frozen-prefix cache where the trainer would use it; None: uncached
    run_steps: int = 0  # the run's steps the cache's epoch rule was applied to
    curve: object = field(default=None, compare=False)  # gain(n), low(n), high(n): learning.CurveModel's
    learning_rate: float = 0.0  # the rate the curve is at (0: a prior curve, no measured rate)
    pool: str = ""  # the serving pool it is priced on and would be served by; "": none can serve it

    @property
    def training_seconds(self) -> float:
        """The cache's building pass and ``steps`` steps."""
        return self.build_seconds + self.steps * self.step_seconds

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def build_seconds(self) -> float:
        """The cache's building pass: paid once, before the first step."""
        return self.cache.build_seconds if self.cache is not None else 0.0

    def tie_key(self) -> tuple:
        # Last, the serving overhead: the same shape on two pools goes to the cheaper one.
        serving = self.serving_fraction if self.serving_fraction is not None else math.inf
        return (self.step_seconds, self.parameters, tuple(-i for i in self.layers), self.learning_rate, serving)


@dataclass(frozen=True)
class Solution:
    chosen: Candidate
    full: Candidate  # every layer at the card's shape: the reference of every fraction
    costs: ShapeCosts
    score: str
    binding: tuple[str, ...]
    exhaustive: bool
    run: CacheRun
    curves: CurveModel
    pool: VllmFleet | None = None  # the serving pool the chosen shape is priced on; None: no pool can serve it


def _shapes(card: LayerCardData, request: PlanRequest, ranks: Sequence[int], modules: Sequence[str]) -> list[Shape]:
    """The request's candidate shapes, or ``ranks`` on ``modules`` (the defaults)."""
    module_sets = request.candidate_module_sets or ((tuple(modules),) if modules else ())
    return [Shape(r, tuple(m)) for r in request.candidate_ranks or ranks for m in module_sets]


def _offers(
    card: LayerCardData, request: PlanRequest, pools: Sequence[VllmFleet]
) -> list[tuple[Shape, VllmFleet | None]]:
    """The candidate shapes, each with the pool that would serve it. Without a vLLM serving budget: the request's
    shapes or the card's, on the pool that serves each cheapest. Under one, with the pools known: on each pool,
    by default the modules it wraps at the ranks it measured, and only shapes it can serve."""
    steer = bool(pools) and request.budget.limits_serving and request.budget.serving_engine == "vllm"
    if not steer:
        shapes = _shapes(card, request, (card.settings.rank,), card.module_types)
        # No pool can serve a shape: it is priced on the first, whose basis then says why it cannot.
        return [(s, serving_pool(pools, s) or (pools[0] if pools else None)) for s in shapes]
    offers, problems = [], []
    for pool in pools:
        shapes = _shapes(card, request, pool.ranks() or (card.settings.rank,), pool.module_set(card.module_types))
        offers += [(s, pool) for s in shapes if pool.problem(s) is None]
        found = [f"{pool.describe()} cannot serve {pool.problem(s)}" for s in shapes if pool.problem(s) is not None]
        problems += found if shapes else [f"none of the card's modules is wrapped by {pool.describe()}"]
    if not offers:
        metadata = {"pools": ",".join(p.pool for p in pools)}
        if len(pools) == 1:
            metadata |= {
                "wrapped_modules": ",".join(pools[0].wrapped_modules),
                "max_rank": str(pools[0].max_rank),
                "measured_ranks": ",".join(str(r) for r in pools[0].ranks()),
            }
        unique = list(dict.fromkeys(problems))  # the request's candidates can be many: say the first few
        listed = unique[:MAX_LISTED_PROBLEMS] + ([f"and {len(unique) - MAX_LISTED_PROBLEMS} more"]
                                                 if len(unique) > MAX_LISTED_PROBLEMS else [])  # fmt: skip
        raise FailedPrecondition(
            "no serving pool can serve any candidate shape: " + "; ".join(listed),
            reason="SERVING_SHAPE_UNSERVABLE",
            metadata=metadata,
        )
    return offers


def _priced(costs: ShapeCosts, pool: VllmFleet | None) -> ShapeCosts:
    """The shape's costs with its vLLM overhead as its serving pool measured it, when the pool is known."""
    return pool.priced(costs) if pool is not None else costs


def _layer_sets(scores: Sequence[float], exhaustive: bool) -> Iterator[tuple[int, ...]]:
    L = len(scores)
    if exhaustive:
        for size in range(1, L + 1):
            yield from itertools.combinations(range(L), size)
        return
    for low in range(L):
        above = sorted(range(low + 1, L), key=lambda i: (-scores[i], -i))
        for size in range(len(above) + 1):
            yield tuple(sorted((low, *above[:size])))


def _candidate(
    costs: ShapeCosts,
    scores: list[float],
    own_scores: list[float],
    coupling,
    layers: tuple[int, ...],
    engine: str,
    request: PlanRequest,
    run: CacheRun,
    curves: CurveModel,
    learning_rate: float,
    pool: str = "",
) -> Candidate:
    priced = price(costs, layers, run, request)
    curve = curves.curve(layers, scores, own_scores, coupling, learning_rate)
    # A cheaper step buys more steps in the same time; the set's learning curve says what they buy.
    timed = request.budget.max_training_seconds is not None
    return Candidate(
        layers=layers,
        shape=costs.shape,
        gain=set_gain(scores, layers, coupling),
        steps=priced.steps,
        value=curve.gain(priced.steps if timed else request.steps),
        curve=curve,
        learning_rate=learning_rate,
        step_seconds=priced.step_seconds,
        uncached_step_seconds=costs.step_seconds(layers),
        cache=priced.cache,
        run_steps=priced.run_steps,
        peak_bytes=priced.peak_bytes,
        parameters=costs.adapter_parameters(layers),
        adapter_bytes=costs.adapter_bytes(layers),
        serving_ms=costs.serving_ms(layers, engine),
        serving_fraction=costs.serving_fraction(layers, engine),
        pool=pool,
    )


def _violations(c: Candidate, budget: BudgetSpec, full: Candidate) -> dict[str, float]:
    """Each set limit the candidate exceeds, as value / limit (> 1)."""
    over = {}
    for kind in BUDGET_KINDS:
        limit = budget.limit(kind)
        if limit is None:
            continue
        value = kind.measure(c, full)
        # Only a serving fraction may be 0: then any overhead exceeds it.
        ratio = (math.inf if value else 0.0) if limit == 0 else value / limit
        if ratio > 1.0 + 1e-9:
            over[kind.name] = ratio
    return over


def _pick(feasible: list[Candidate], request: PlanRequest, full: Candidate) -> Candidate | None:
    if request.objective == "fixed_k":
        feasible = [c for c in feasible if len(c.layers) == request.k]
    if not feasible:
        return None
    if request.objective == "efficiency":
        return _quickest(feasible, request, full)
    if request.objective == "balanced":
        return max(feasible, key=lambda c: (c.value / c.step_seconds, _neg(c.tie_key())))
    return max(feasible, key=lambda c: (round(c.value, 12), _neg(c.tie_key())))


def _quickest(feasible: list[Candidate], request: PlanRequest, full: Candidate) -> Candidate:
    """The candidate whose learning curve reaches the target share of full-layer LoRA's gain (at the reference
    steps) in the least training time, building pass included; its steps are the steps to the target."""
    target = request.target_gain_fraction * full.value * (1 - 1e-9)
    timed = request.budget.max_training_seconds is not None
    reaching = []
    for c in feasible:
        limit = c.steps if timed else MAX_PLANNED_STEPS
        n = steps_to_reach(c.curve, target, limit) if limit > 0 else None
        if n is not None:
            reaching.append(replace(c, steps=n, value=c.curve.gain(n)))
    if not reaching:
        best = max(feasible, key=lambda c: c.curve.gain(c.steps if timed else MAX_PLANNED_STEPS))
        share = best.curve.gain(best.steps if timed else MAX_PLANNED_STEPS) / full.value if full.value > 0 else 0.0
        raise FailedPrecondition(
            f"no placement within the budget reaches {request.target_gain_fraction:.0%} of full-layer LoRA's "
            f"predicted gain; the best reaches {share:.1%} with layers {list(best.layers)}",
            reason="TARGET_GAIN_UNREACHABLE",
            metadata={"best_gain_share": f"{share:.4f}", "best_layers": _ints(best.layers)},
        )
    return min(reaching, key=lambda c: (c.training_seconds, c.tie_key()))


def _neg(key: tuple) -> tuple:
    step, params, layers, rate, serving = key
    return (-step, -params, tuple(-i for i in layers), -rate, -serving)


def _ints(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def _solve_once(
    candidates: list[Candidate], request: PlanRequest, budget: BudgetSpec, full: Candidate
) -> Candidate | None:
    feasible = [c for c in candidates if not _violations(c, budget, full)]
    return _pick(feasible, request, full)


def _infeasible(
    candidates: list[Candidate], request: PlanRequest, full: Candidate, run: CacheRun
) -> FailedPrecondition:
    pool = [c for c in candidates if request.objective != "fixed_k" or len(c.layers) == request.k] or candidates
    # The cheapest plan: the one that overshoots its worst limit the least.
    cheapest = min(
        pool,
        key=lambda c: (max(_violations(c, request.budget, full).values(), default=0.0), c.tie_key()),
    )
    over = _violations(cheapest, request.budget, full)
    metadata = {
        "cheapest_layers": _ints(cheapest.layers),
        "cheapest_rank": str(cheapest.shape.rank),
        "cheapest_target_modules": ",".join(cheapest.shape.modules),
    }
    for kind in BUDGET_KINDS:
        value = kind.measure(cheapest, full)
        if kind.report and value is not None:
            metadata[kind.report] = format(value, kind.report_format)
    metadata["violated_limits"] = ",".join(sorted(over))
    metadata["cheapest_prefix_cache"] = "on" if cheapest.cached else "off"
    metadata["cheapest_uncached_step_seconds"] = format(cheapest.uncached_step_seconds, ".6g")
    if cheapest.pool:
        metadata["cheapest_serving_pool"] = cheapest.pool
    served = f" on serving pool {cheapest.pool!r}" if cheapest.pool else ""
    exceeded = ", ".join(
        f"{kind.name} ({_figure(kind.measure(cheapest, full), kind.unit)} > {_figure(budget_limit, kind.unit)})"
        for kind in BUDGET_KINDS
        if kind.name in over and (budget_limit := request.budget.limit(kind)) is not None
    )
    return FailedPrecondition(
        f"no placement fits the budget; the cheapest is layers {list(cheapest.layers)} at rank {cheapest.shape.rank}"
        f"{served} with a predicted step of {cheapest.step_seconds:.4g} s{_cache_note(cheapest, run)}, "
        f"{cheapest.step_seconds / full.step_seconds:.2f} of full-layer LoRA's {full.step_seconds:.4g} s, and it "
        f"still exceeds {exceeded}",
        reason="BUDGET_INFEASIBLE",
        metadata=metadata,
    )


def _cache_note(c: Candidate, run: CacheRun) -> str:
    if c.cached:
        return (
            f" with the frozen-prefix cache ({c.uncached_step_seconds:.4g} s without; built once in "
            f"{c.build_seconds:.4g} s)"
        )
    return f" without the frozen-prefix cache ({uncached_reason(run, c.layers, c.run_steps)})"


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "unknown"
    if unit in ("bytes", "params", "layers"):
        return f"{int(value):,}"
    return f"{value:.4g}"


def solve(
    card: LayerCardData,
    request: PlanRequest,
    prefix_cache_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    vllm: Sequence[VllmFleet] | VllmFleet | None = None,
) -> Solution:
    """``vllm``: the serving pools (one ``VllmFleet`` each), or the one pool; None: the fleet is unknown."""
    pools: Sequence[VllmFleet] = () if vllm is None else (vllm,) if isinstance(vllm, VllmFleet) else tuple(vllm)
    score = request.score or DEFAULT_SCORE
    budget = request.budget
    if request.objective == "fixed_k" and request.k > card.num_layers:
        raise InvalidArgument.field("k", f"the model has {card.num_layers} layers, got k={request.k}")
    exhaustive = card.num_layers <= EXACT_MAX_LAYERS
    run = cache_run(card, request, prefix_cache_memory_bytes)
    curves = CurveModel(card, request.steps)
    own = layer_scores(card, score, card.module_types, card.settings.rank)
    candidates: list[Candidate] = []
    full = None
    by_name = {p.pool: p for p in pools}
    for shape, pool in _offers(card, request, pools):
        costs = _priced(shape_costs(card, shape), pool)
        serves = pool.pool if pool is not None and pool.problem(shape) is None else ""
        if budget.limits_serving and costs.serving_ms(range(1), budget.serving_engine) is None:
            raise FailedPrecondition(
                "the serving budget needs vLLM's measured adapter overhead, which this card does not have yet: "
                "deploy an adapter first (the service measures it), or budget for serving_engine peft",
                reason="SERVING_COST_UNKNOWN",
                metadata={"serving_engine": budget.serving_engine},
            )
        scores = layer_scores(card, score, shape.modules, shape.rank)
        if full is None:  # the reference: the card's own shape on every layer
            reference = shape_costs(card, Shape(card.settings.rank, tuple(card.module_types)))
            ref_scores = layer_scores(card, score, reference.shape.modules, reference.shape.rank)
            # Block 0 adapted: never cached.
            every = tuple(range(card.num_layers))
            # The reference: full-layer LoRA without a time limit, at the reference steps, at its best rate.
            full = max(
                (
                    _candidate(
                        reference, ref_scores, own, card.coupling, every, budget.serving_engine, request, run, curves, r
                    )
                    for r in curves.learning_rates
                ),
                key=lambda c: c.curve.gain(request.steps),
            )
            full = replace(full, value=full.curve.gain(request.steps))
        candidates += [
            _candidate(
                costs, scores, own, card.coupling, layers, budget.serving_engine, request, run, curves, rate, serves
            )
            for layers in _layer_sets(scores, exhaustive)
            for rate in curves.learning_rates
        ]
    assert full is not None
    chosen = _solve_once(candidates, request, budget, full)
    if chosen is None:
        raise _infeasible(candidates, request, full, run)
    binding = []
    for kind in BUDGET_KINDS:
        if budget.limit(kind) is None:
            continue
        if kind.chooses_steps and request.objective != "efficiency":
            if chosen.steps and chosen.steps < request.steps:
                binding.append(kind.name)
        else:
            relaxed = _solve_once(candidates, request, replace(budget, **{kind.name: None}), full)
            if relaxed is not None and relaxed != chosen:
                binding.append(kind.name)
    pool = by_name.get(chosen.pool) or (pools[0] if pools else None)
    return Solution(
        pool=pool if pool is not None and pool.problem(chosen.shape) is None else None,
        chosen=chosen,
        full=full,
        costs=_priced(shape_costs(card, chosen.shape), pool),
        score=score,
        binding=tuple(binding),
        exhaustive=exhaustive,
        run=run,
        curves=curves,
    )


def gain_basis(solution: Solution, card: LayerCardData) -> str:
    rank_scaled = solution.chosen.shape.rank != card.settings.rank
    return score_basis(solution.score, card.coupling is not None, rank_scaled)
