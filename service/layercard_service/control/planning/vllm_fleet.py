"""What the serving vLLM fleet can serve and what its probes measured: the planner's vLLM serving-cost model.

vLLM wraps every layer of each module type it is started with (``--lora-target-modules``) up to its max rank,
so an adapter's overhead there follows the module types and the rank, not the layers. A plan under a vLLM
serving budget therefore takes its module types from what the fleet wraps, its rank from those the fleet
has measured (at most its max rank), and each rank's overhead from the probes of that shape
(``DeploymentStore.rank_calibrations``). A rank the pool has not measured is priced as its nearest measured rank
(the next above, else the highest below: overhead grows with the rank); on a pool that has measured nothing, at
the fleet's median over every probe. The basis says which.

A fleet of several pools is one ``VllmFleet`` per pool: the planner weighs every pool's shapes and the plan names
the pool that will serve it (``serving_pool``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from layercard_service.control.planning.costs import Shape, ShapeCosts
from layercard_service.domain.cards import VllmPoolCost, VllmRankCost
from layercard_service.domain.pools import DEFAULT_POOL

__all__ = ["Calibration", "VllmFleet", "serving_pool"]


class Calibration(Protocol):
    overhead_fraction: float
    samples: int
    basis: str
    base_ms_per_token: float | None


@dataclass(frozen=True)
class VllmFleet:
    wrapped_modules: tuple[str, ...]  # the servers' --lora-target-modules; empty: every LoRA-capable module
    max_rank: int  # the servers' --max-lora-rank
    by_rank: Mapping[int, Calibration]  # adapter rank -> the probes of that shape
    pool: str = DEFAULT_POOL
    streams: int = 1  # the requests at once the figures were probed at
    note: str = ""  # why they are at ``streams`` when the budget asked for another count

    def describe(self) -> str:
        wrapped = ", ".join(self.wrapped_modules) or "every LoRA-capable module"
        where = "the serving vLLM fleet" if self.pool == DEFAULT_POOL else f"serving pool {self.pool!r}"
        streams = f", probed at {self.streams} streams" if self.streams > 1 else ""
        note = f"; {self.note}" if self.note else ""
        return f"{where} (wrapping {wrapped}, max rank {self.max_rank}{streams}{note})"

    def cost(self) -> VllmPoolCost:
        """The pool as a card shows it: its settings and each measured rank's figures."""
        ranks = tuple(
            VllmRankCost(r, c.overhead_fraction, c.samples, c.basis, c.base_ms_per_token)
            for r, c in sorted(self.by_rank.items())
        )
        return VllmPoolCost(self.pool, self.wrapped_modules, self.max_rank, ranks)

    def problem(self, shape: Shape) -> str | None:
        """Why the fleet cannot serve adapters of ``shape``; None when it can."""
        unwrapped = sorted(set(shape.modules) - set(self.wrapped_modules)) if self.wrapped_modules else []
        if unwrapped:
            return f"rank {shape.rank} on {', '.join(shape.modules)}: it does not wrap {', '.join(unwrapped)}"
        if shape.rank > self.max_rank:
            return f"rank {shape.rank}: over its max rank {self.max_rank}"
        return None

    def module_set(self, card_modules: Sequence[str]) -> tuple[str, ...]:
        """The card's module types the fleet wraps: the default module set of a vLLM-budgeted plan."""
        return tuple(m for m in card_modules if not self.wrapped_modules or m in self.wrapped_modules)

    def ranks(self) -> tuple[int, ...]:
        """The measured ranks the fleet can serve: the default ranks of a vLLM-budgeted plan."""
        return tuple(sorted(r for r in self.by_rank if 0 < r <= self.max_rank))

    def measured_at(self, rank: int) -> tuple[Calibration | None, int | None]:
        """The figures a shape of ``rank`` is priced with here and the rank they were measured at: its own, else
        the nearest measured rank (the next above, else the highest below: overhead grows with the rank)."""
        if rank in self.by_rank:
            return self.by_rank[rank], rank
        servable = self.ranks()
        if not servable:
            return None, None
        above = [r for r in servable if r > rank]
        near = min(above) if above else max(servable)
        return self.by_rank[near], near

    def priced(self, costs: ShapeCosts) -> ShapeCosts:
        """``costs`` with the overhead measured at its rank on this fleet, where there is one."""
        problem = self.problem(costs.shape)
        if problem is not None:  # planned without a vLLM budget: priced as before, and the basis warns
            return dataclasses.replace(
                costs, vllm_basis=f"{self.describe()} cannot serve {problem}; {costs.vllm_basis}"
            )
        rank = costs.shape.rank
        measured, at = self.measured_at(rank)
        if measured is None:
            if costs.vllm_fraction is None:
                return costs
            return dataclasses.replace(
                costs, vllm_basis=f"rank {rank} not measured on {self.describe()}: {costs.vllm_basis}"
            )
        basis = f"rank {rank} on {self.describe()}"
        if at != rank:
            side = "above" if at > rank else "below"
            basis = (
                f"rank {rank} not measured on {self.describe()}: priced as rank {at}, the nearest measured rank "
                f"{side} it"
            )
        return dataclasses.replace(
            costs,
            vllm_fraction=measured.overhead_fraction,
            vllm_basis=f"{basis}: {measured.basis}",
            vllm_base_ms=measured.base_ms_per_token,
        )


def serving_pool(pools: Sequence[VllmFleet], shape: Shape) -> VllmFleet | None:
    """The pool that would serve ``shape`` cheapest: by its price there (``measured_at``), unmeasured pools last,
    ties to the leanest (fewest wrapped module types, then lowest max rank); None when no pool can serve it."""
    servable = [p for p in pools if p.problem(shape) is None]

    def cost(pool: VllmFleet) -> tuple[float, float, int]:
        measured, _ = pool.measured_at(shape.rank)
        overhead = measured.overhead_fraction if measured is not None else math.inf
        return (overhead, len(pool.wrapped_modules) or math.inf, pool.max_rank)

    return min(servable, key=cost, default=None)
