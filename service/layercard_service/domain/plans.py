"""What a placement request asks for and what a plan answers, as domain types (the API converts them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from layercard_service.domain.budgets import BUDGET_KINDS, BudgetKind
from layercard_service.errors import InvalidArgument

__all__ = ["OBJECTIVES", "ENGINES", "BudgetSpec", "PlanRequest", "Estimate", "CurvePoint", "Plan"]

OBJECTIVES = ("accuracy", "efficiency", "balanced", "fixed_k")
ENGINES = ("vllm", "peft")
MAX_SERVING_CONCURRENCY = 1024
MAX_CANDIDATE_RANK = 512
DEFAULT_STEPS = 200


@dataclass(frozen=True)
class BudgetSpec:
    """Limits a plan must respect; None means no limit. One field per kind of domain/budgets.py's table."""

    max_step_seconds: float | None = None
    max_step_fraction_of_full: float | None = None
    max_peak_memory_bytes: int | None = None
    max_adapter_parameters: int | None = None
    max_adapter_bytes: int | None = None
    max_layers: int | None = None
    max_serving_overhead_ms_per_token: float | None = None
    max_serving_overhead_fraction: float | None = None
    serving_engine: str = "vllm"
    max_training_seconds: float | None = None
    serving_concurrency: int = 1  # the requests at once a vLLM serving budget holds for

    def __post_init__(self) -> None:
        for kind in BUDGET_KINDS:
            kind.validate(self.limit(kind))
        if not 1 <= self.serving_concurrency <= MAX_SERVING_CONCURRENCY:
            raise InvalidArgument.field(
                "budget.serving_concurrency",
                f"must be in 1..{MAX_SERVING_CONCURRENCY} (0 on the wire: one), got {self.serving_concurrency}",
            )
        if self.serving_engine not in ENGINES:
            raise InvalidArgument.field(
                "budget.serving_engine", f"must be one of {ENGINES}, got {self.serving_engine!r}"
            )

    def limit(self, kind: BudgetKind) -> float | None:
        return getattr(self, kind.name)

    @property
    def limits_serving(self) -> bool:
        return any(kind.serving and self.limit(kind) is not None for kind in BUDGET_KINDS)


@dataclass(frozen=True)
class PlanRequest:
    objective: str = "accuracy"
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    target_gain_fraction: float = 0.9  # efficiency: share of full-layer predicted gain to reach
    k: int = 0  # fixed_k: number of layers
    candidate_ranks: tuple[int, ...] = ()  # empty: the card's rank
    candidate_module_sets: tuple[tuple[str, ...], ...] = ()  # empty: the card's module types
    steps: int = DEFAULT_STEPS  # with max_training_seconds: the fewest steps the training needs
    score: str = ""  # per-layer gain score (control/planning/gains.py); empty: the default
    # The run, for the frozen-prefix cache: whether the job may use it (Hyperparameters.prefix_cache), its training
    # set's examples (0: the card's dataset's, or its probe's) and its batch size (0: the card's).
    prefix_cache: bool = True
    train_examples: int = 0
    batch_size: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InvalidArgument.field("objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 < self.target_gain_fraction <= 1.0:
            raise InvalidArgument.field("target_gain_fraction", f"must be in (0, 1], got {self.target_gain_fraction!r}")
        if self.objective == "fixed_k" and self.k < 1:
            raise InvalidArgument.field("k", f"must be at least 1 for the fixed_k objective, got {self.k!r}")
        if self.k < 0:
            raise InvalidArgument.field("k", f"must be >= 0, got {self.k!r}")
        for rank in self.candidate_ranks:
            if not 1 <= rank <= MAX_CANDIDATE_RANK:
                raise InvalidArgument.field("candidate_ranks", f"ranks must be in 1..{MAX_CANDIDATE_RANK}, got {rank}")
        for modules in self.candidate_module_sets:
            if not modules or not all(modules):
                raise InvalidArgument.field("candidate_module_sets", "each set must name at least one module type")
        if self.steps < 1:
            raise InvalidArgument.field("steps", f"must be at least 1, got {self.steps!r}")
        for name in ("train_examples", "batch_size"):
            if getattr(self, name) < 0:
                raise InvalidArgument.field(name, f"must be >= 0 (0: the card's), got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Estimate:
    """A predicted figure and where it comes from."""

    value: float
    unit: str
    basis: str


@dataclass(frozen=True)
class CurvePoint:
    steps: int
    seconds: float  # predicted training time to this step: the cache's building pass and the steps
    gain: float  # nats
    gain_low: float
    gain_high: float


@dataclass(frozen=True)
class Plan:
    layers: tuple[int, ...]  # depth order
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    objective: str
    predicted_gain: Estimate
    predicted_gain_share: float
    step_seconds: Estimate
    step_fraction_of_full: Estimate
    peak_memory_bytes: Estimate
    adapter_parameters: Estimate
    adapter_bytes: Estimate
    serving_overhead_ms_per_token: Estimate | None
    serving_overhead_fraction: Estimate | None
    steps: int  # the steps that fit a total training time, or reach the efficiency target; else 0
    binding_limits: tuple[str, ...]
    rationale: str
    score: str = ""
    layer_card: str = ""
    # Set when the step is priced with the frozen-prefix cache: its building pass and its size.
    prefix_cache_build_seconds: Estimate | None = None
    prefix_cache_bytes: Estimate | None = None
    # The chosen set's predicted learning curve (control/planning/learning.py) and the learning rate it holds for
    # (0: a prior, measured at no learning rate).
    predicted_curve: tuple[CurvePoint, ...] = ()
    learning_rate: float = 0.0
    serving_pool: str = ""  # the vLLM serving pool the plan is priced on and its adapter deploys to; "": unknown
