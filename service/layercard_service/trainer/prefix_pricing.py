"""What the frozen-prefix cache (``prefix_cache.py``) costs and saves, for the card's cost model and the planner.

Torch-free, so the control plane may import it. The figures follow what the trainer does:
- a cached step no longer runs blocks 0..low-1 (``low`` = the lowest adapted block): their no-grad forward is
  taken off the uncached step's time (the embedding lookup stays; feeding the cached rows is a copy);
- the cache is built once per run of a job: one no-grad forward of blocks 0..low-1 per training batch
  (``ceil(examples / batch_size)`` of them), stopped at ``low``;
- it holds every training token's hidden state entering ``low``: tokens x hidden x bytes per value, on the
  model's device while that fits the bound (adding to the step's peak memory), in a file beyond it;
- where it cannot be exact the trainer leaves it off; the pricing here only knows the placement, so callers
  that know better (``PrefixCacheReport.enabled`` of a run) should price the uncached step then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_MEMORY_BYTES", "CachedCost", "cache_bytes", "more_than_one_epoch", "price_cached_step"]

DEFAULT_MAX_MEMORY_BYTES = 1 << 30  # the worker's default bound (--prefix-cache-memory-bytes)


@dataclass(frozen=True)
class CachedCost:
    cached_blocks: int  # blocks 0..low-1, skipped by every cached step
    step_seconds: float  # one training step with the cache
    build_seconds: float  # the one building pass over the training set
    cache_bytes: int
    on_disk: bool  # over the memory bound: the cache lives in a file
    peak_bytes: int  # the step's peak memory with the cache (the uncached peak, plus the cache when in memory)

    def total_seconds(self, steps: int) -> float:
        """Training time of ``steps`` cached steps, the building pass included."""
        return self.build_seconds + steps * self.step_seconds

    def break_even_steps(self, uncached_step_seconds: float) -> float:
        """Steps after which the cache has paid for its building pass (inf when a step saves nothing)."""
        saved = uncached_step_seconds - self.step_seconds
        return self.build_seconds / saved if saved > 0 else math.inf


def cache_bytes(tokens: int, hidden_size: int, bytes_per_value: int) -> int:
    """Bytes of the cache over ``tokens`` training tokens (every real token of every example, prompt included)."""
    return tokens * hidden_size * bytes_per_value


def more_than_one_epoch(steps: int, examples: int, batch_size: int) -> bool:
    """The trainer's rule for building the cache: a run that sees each example at most once would pay for the
    building pass what it saves (``PrefixCacheSettings.only_when_it_pays``)."""
    return steps > math.ceil(examples / batch_size)


def price_cached_step(
    layers: Sequence[int],
    forward_nograd_seconds: Sequence[float],
    uncached_step_seconds: float,
    uncached_peak_bytes: int,
    *,
    examples: int,
    batch_size: int,
    tokens: int,
    hidden_size: int,
    bytes_per_value: int,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    steps: int | None = None,
) -> CachedCost | None:
    """The cached cost of adapting ``layers``, from the uncached step's figures; None when the trainer would not
    cache (no block below the lowest adapted one; or, given the run's ``steps``, a run of at most one epoch,
    where the building pass would cost what it saves).

    ``forward_nograd_seconds[i]``: block i's forward without an adapter and without a graph, for one batch (the
    cost model's "below the lowest adapted block" regime). ``tokens``: the training set's real tokens.
    """
    if not layers:
        return None
    low = min(layers)
    batches = math.ceil(examples / batch_size)
    if low == 0 or (steps is not None and not more_than_one_epoch(steps, examples, batch_size)):
        return None
    prefix = sum(forward_nograd_seconds[:low])
    size = cache_bytes(tokens, hidden_size, bytes_per_value)
    on_disk = size > max_memory_bytes
    return CachedCost(
        cached_blocks=low,
        step_seconds=max(0.0, uncached_step_seconds - prefix),
        build_seconds=batches * prefix,
        cache_bytes=size,
        on_disk=on_disk,
        peak_bytes=uncached_peak_bytes + (0 if on_disk else size),
    )
