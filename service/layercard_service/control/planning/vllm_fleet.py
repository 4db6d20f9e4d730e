"""What the serving vLLM fleet can serve and what its probes measured: the planner's vLLM serving-cost model.

vLLM wraps every layer of each module type it is started with (``--lora-target-modules``) up to its max rank,
so an adapter's overhead there follows the module types and the rank, not the layers. A plan under a vLLM
serving budget therefore takes its module types from what the fleet wraps, its rank from those the fleet
has measured (at most its max rank), and each rank's overhead from the probes of that shape
(``DeploymentStore.rank_calibrations``). A rank the fleet has not measured is priced at the fleet's median over
every probe, and its basis says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from layercard_service.control.planning.costs import Shape, ShapeCosts

__all__ = ["Calibration", "VllmFleet"]


class Calibration(Protocol):
    overhead_fraction: float
    basis: str
    base_ms_per_token: float | None


@dataclass(frozen=True)
class VllmFleet:
    wrapped_modules: tuple[str, ...]  # the servers' --lora-target-modules; empty: every LoRA-capable module
    max_rank: int  # the servers' --max-lora-rank
    by_rank: Mapping[int, Calibration]  # adapter rank -> the probes of that shape

    def describe(self) -> str:
        wrapped = ", ".join(self.wrapped_modules) or "every LoRA-capable module"
        return f"the serving vLLM fleet (wrapping {wrapped}, max rank {self.max_rank})"

    def problem(self, shape: Shape) -> str | None:
        """Why the fleet cannot serve adapters of ``shape``; None when it can."""
        unwrapped = sorted(set(shape.modules) - set(self.wrapped_modules)) if self.wrapped_modules else []
        if unwrapped:
            return f"rank {shape.rank} on {', '.join(shape.modules)}: the fleet does not wrap {', '.join(unwrapped)}"
        if shape.rank > self.max_rank:
            return f"rank {shape.rank}: over the fleet's max rank {self.max_rank}"
        return None

    def module_set(self, card_modules: Sequence[str]) -> tuple[str, ...]:
        """The card's module types the fleet wraps: the default module set of a vLLM-budgeted plan."""
        return tuple(m for m in card_modules if not self.wrapped_modules or m in self.wrapped_modules)

    def ranks(self) -> tuple[int, ...]:
        """The measured ranks the fleet can serve: the default ranks of a vLLM-budgeted plan."""
        return tuple(sorted(r for r in self.by_rank if 0 < r <= self.max_rank))

    def priced(self, costs: ShapeCosts) -> ShapeCosts:
        """``costs`` with the overhead measured at its rank on this fleet, where there is one."""
        problem = self.problem(costs.shape)
        if problem is not None:  # planned without a vLLM budget: priced as before, and the basis warns
            return dataclasses.replace(
                costs, vllm_basis=f"{self.describe()} cannot serve {problem}; {costs.vllm_basis}"
            )
        measured = self.by_rank.get(costs.shape.rank)
        if measured is None:
            if costs.vllm_fraction is None:
                return costs
            return dataclasses.replace(
                costs,
                vllm_basis=f"rank {costs.shape.rank} not measured on {self.describe()}: {costs.vllm_basis}",
            )
        return dataclasses.replace(
            costs,
            vllm_fraction=measured.overhead_fraction,
            vllm_basis=f"rank {costs.shape.rank} on {self.describe()}: {measured.basis}",
            vllm_base_ms=measured.base_ms_per_token,
        )
