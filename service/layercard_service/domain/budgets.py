"""The budget kinds: one entry per limit a placement can respect.

``BudgetSpec``'s validation, the solver's feasibility checks (and the names in violated and binding limits),
the figures an infeasible budget reports, and the API's conversion of the contract's ``Budget`` are all built
from ``BUDGET_KINDS``. A new kind is one entry here, its field on ``BudgetSpec`` and its field in
placement.proto's ``Budget`` (tests/unit/test_budget_kinds.py ties the three together). The order is the
order binding limits are reported in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from layercard_service.errors import InvalidArgument

__all__ = ["BUDGET_KINDS", "BudgetKind", "kind_named"]


class Candidate(Protocol):
    """What a budget measures of a candidate placement (the planner's ``solver.Candidate`` is one)."""

    layers: tuple[int, ...]
    step_seconds: float
    build_seconds: float  # the frozen-prefix cache's building pass, paid once before the first step (0: none)
    peak_bytes: int
    parameters: int
    adapter_bytes: int
    serving_ms: float | None
    serving_fraction: float | None


@dataclass(frozen=True)
class BudgetKind:
    name: str  # BudgetSpec's field, and the limit's name in violated_limits and binding_limits
    proto_field: str  # the contract's Budget field: errors name it
    unit: str
    # The figure the limit bounds, for a candidate and the full-layer reference; None: not known for this card.
    measure: Callable[[Candidate, Candidate], float | None]
    describe: str
    allow_zero: bool = False  # 0 is a meaningful limit (no overhead at all); otherwise a limit must be > 0
    serving: bool = False  # needs the serving engine's overhead figures
    # The plan fits its steps into the limit: it binds through the steps it leaves rather than as a filter.
    chooses_steps: bool = False
    # The cheapest candidate's figure in an infeasible budget's error metadata, and its format; "": not reported.
    report: str = ""
    report_format: str = ""

    def validate(self, value: float | None) -> None:
        if value is None:
            return
        if self.allow_zero:
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument.field(f"budget.{self.proto_field}", f"must be >= 0, got {value!r}")
        elif not (math.isfinite(value) and value > 0):
            raise InvalidArgument.field(
                f"budget.{self.proto_field}", f"must be a positive number when set, got {value!r}"
            )


BUDGET_KINDS: tuple[BudgetKind, ...] = (
    BudgetKind(
        "max_step_seconds",
        "max_step_seconds",
        "s",
        lambda c, full: c.step_seconds,
        "training step time",
        report="cheapest_step_seconds",
        report_format=".6g",
    ),
    BudgetKind(
        "max_step_fraction_of_full",
        "max_step_fraction_of_full",
        "fraction",
        lambda c, full: c.step_seconds / full.step_seconds,
        "training step time as a fraction of full-layer LoRA's",
        report="cheapest_step_fraction_of_full",
        report_format=".4f",
    ),
    BudgetKind(
        "max_training_seconds",
        "max_training_time",
        "s",
        # As a filter: the cache's building pass and one step must fit (the solver fits the steps).
        lambda c, full: c.build_seconds + c.step_seconds,
        "total training time; the plan also chooses the steps",
        chooses_steps=True,
    ),
    BudgetKind(
        "max_peak_memory_bytes",
        "max_peak_memory_bytes",
        "bytes",
        lambda c, full: c.peak_bytes,
        "training peak memory",
        report="cheapest_peak_memory_bytes",
        report_format="d",
    ),
    BudgetKind(
        "max_adapter_parameters",
        "max_adapter_parameters",
        "params",
        lambda c, full: c.parameters,
        "adapter parameters",
        report="cheapest_adapter_parameters",
        report_format="d",
    ),
    BudgetKind(
        "max_adapter_bytes",
        "max_adapter_bytes",
        "bytes",
        lambda c, full: c.adapter_bytes,
        "adapter size",
        report="cheapest_adapter_bytes",
        report_format="d",
    ),
    BudgetKind("max_layers", "max_layers", "layers", lambda c, full: len(c.layers), "adapted layers"),
    BudgetKind(
        "max_serving_overhead_ms_per_token",
        "max_serving_overhead_ms_per_token",
        "ms/token",
        lambda c, full: c.serving_ms,
        "serving overhead per generated token on the serving engine",
        serving=True,
        report="cheapest_serving_overhead_ms_per_token",
        report_format=".6g",
    ),
    BudgetKind(
        "max_serving_overhead_fraction",
        "max_serving_overhead_fraction",
        "fraction",
        lambda c, full: c.serving_fraction,
        "serving overhead as a fraction over the base model on the serving engine",
        allow_zero=True,
        serving=True,
        report="cheapest_serving_overhead_fraction",
        report_format=".4f",
    ),
)

_BY_NAME = {kind.name: kind for kind in BUDGET_KINDS}


def kind_named(name: str) -> BudgetKind:
    return _BY_NAME[name]
