"""A candidate's training cost as the trainer will run it: with the frozen-prefix cache where it would cache.

The trainer (trainer/prefix_cache.py) caches the hidden states entering the lowest adapted block ``low`` when the
job's option is on, ``low`` > 0 and the run sees an example more than once; every step then skips blocks
0..low-1 and the run pays one building pass. The planner applies the same rule with the trainer's own torch-free
pricing (``prefix_pricing``) on the card's figures. It cannot see the trainer's exactness checks (dropout or a
trainable parameter in the prefix): where those leave the cache off the job runs uncached, and its prefix_cache
event says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from layercard_service.control.job_requests import MAX_STEPS
from layercard_service.control.planning.costs import ShapeCosts
from layercard_service.domain.cards import LayerCardData
from layercard_service.domain.plans import PlanRequest
from layercard_service.trainer.prefix_pricing import (
    DEFAULT_MAX_MEMORY_BYTES,
    CachedCost,
    more_than_one_epoch,
    price_cached_step,
)

__all__ = ["MAX_PLANNED_STEPS", "CacheRun", "Priced", "cache_run", "price", "uncached_reason"]

MAX_PLANNED_STEPS = MAX_STEPS  # the most steps a tuning job accepts


@dataclass(frozen=True)
class CacheRun:
    """What the plan knows of the run, for the cache."""

    enabled: bool  # the job's option (PlanRequest.prefix_cache)
    examples: int
    examples_source: str  # where ``examples`` comes from, for the basis
    tokens: int  # estimated: examples x the probe's real tokens per example
    card_batch: int  # the card's figures are per batch of this size
    run_batch: int  # the run's batch: it sets the epoch rule
    bytes_per_token: int  # 0: a card from before the figure was recorded
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES  # the workers' bound in memory; a larger cache is a file

    @property
    def off(self) -> str:
        """Why no candidate can be cached; empty when the cache can be priced."""
        if not self.enabled:
            return "the request turns the frozen-prefix cache off"
        if not self.bytes_per_token:
            return "the card predates the cache's bytes per token: recompute it to price the cache"
        return ""

    @property
    def epoch_batches(self) -> int:
        return math.ceil(self.examples / self.run_batch)


def cache_run(card: LayerCardData, request: PlanRequest, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> CacheRun:
    tc = card.training_cost
    if request.train_examples:
        examples, source = request.train_examples, "the run's training set"
    elif card.dataset is not None and card.dataset.examples_total:
        examples, source = card.dataset.examples_total, "the card's dataset"
    else:
        examples, source = card.probe_examples, "the card's probe set"
    examples = max(1, examples)
    per_example = card.probe_tokens / card.probe_examples if card.probe_examples else float(tc.seq_len)
    card_batch = max(1, tc.batch_size)
    return CacheRun(
        enabled=request.prefix_cache,
        examples=examples,
        examples_source=source,
        tokens=round(examples * per_example),
        card_batch=card_batch,
        run_batch=request.batch_size or card_batch,
        bytes_per_token=tc.prefix_cache_bytes_per_token,
        max_memory_bytes=max_memory_bytes,
    )


@dataclass(frozen=True)
class Priced:
    step_seconds: float
    peak_bytes: int
    steps: int  # with a training-time budget: the steps that fit (after the cache's building pass); else 0
    run_steps: int  # the run's steps the epoch rule was applied to
    cache: CachedCost | None  # None: uncached


def _fit(seconds: float, step: float) -> int:
    if seconds <= 0:
        return 0
    # No more than a job may run (job_requests.MAX_STEPS): a huge budget must not plan an unrunnable count.
    return MAX_PLANNED_STEPS if step <= 0 else min(math.floor(seconds / step), MAX_PLANNED_STEPS)


def price(costs: ShapeCosts, layers: Sequence[int], run: CacheRun, request: PlanRequest) -> Priced:
    step, peak = costs.step_seconds(layers), costs.peak_bytes(layers)
    limit = request.budget.max_training_seconds
    cost = None
    if not run.off:
        # Build pass and step in the card's batches (the figures' batch): the pass covers every example either way.
        cost = price_cached_step(
            layers,
            costs.nograd_seconds,
            step,
            peak,
            examples=run.examples,
            batch_size=run.card_batch,
            tokens=run.tokens,
            hidden_size=run.bytes_per_token,  # the card records hidden size x bytes per value as one figure
            bytes_per_value=1,
            max_memory_bytes=run.max_memory_bytes,
        )
    run_steps = request.steps
    if cost is not None:
        # The building pass comes off the time before the steps are counted.
        if limit is not None:
            run_steps = _fit(limit - cost.build_seconds, cost.step_seconds)
        if more_than_one_epoch(run_steps, run.examples, run.run_batch):
            return Priced(cost.step_seconds, cost.peak_bytes, run_steps if limit is not None else 0, run_steps, cost)
    return Priced(step, peak, _fit(limit, step) if limit is not None else 0, run_steps, None)


def uncached_reason(run: CacheRun, layers: Sequence[int], run_steps: int) -> str:
    """Why a candidate's step is priced without the cache (for its basis)."""
    if run.off:
        return run.off
    if min(layers) == 0:
        return "block 0 is adapted: there is no frozen prefix to cache"
    return (
        f"the run's {run_steps} steps see each of its {run.examples} examples at most once "
        f"({run.epoch_batches} batches of {run.run_batch}): the trainer leaves the frozen-prefix cache off"
    )
