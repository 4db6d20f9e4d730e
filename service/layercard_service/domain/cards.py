"""The Layer Card as domain types (the API layer converts them to and from ``layercard.v1.LayerCard``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from layercard_service.errors import InvalidArgument

__all__ = [
    "CardDataset",
    "CardSettings",
    "ModuleCard",
    "LayerCardRow",
    "PlacementTiming",
    "CostCalibration",
    "TrainingCostCard",
    "ServingCostCard",
    "VllmPoolCost",
    "VllmRankCost",
    "LayerCardData",
    "LearningRatePilot",
    "DEFAULT_LEARNING_RATE_GRID",
    "PERFORMANCE_LEARNING_RATE",
    "calibrated_gain",
    "performance_checkpoints",
]

MAX_PROBE_SIZE = 4096
MAX_SEQ_LEN = 4096
MAX_RANK = 512
PERFORMANCE_LEARNING_RATE = 1e-3  # the pilot runs' (the tuning jobs' default, so they speak of a user's runs)
# The all-layer pilots' learning rates when a card asks for none: the pilots' own and the placement benchmark's
# (3e-3; 1e-2 never got below the prompt-blind floor there, and a short pilot would not show that).
DEFAULT_LEARNING_RATE_GRID = (PERFORMANCE_LEARNING_RATE, 3e-3)
MAX_LEARNING_RATES = 8
MAX_ALPHA = 1e6  # LoRA alpha (0: 2 * rank); far above any useful value, far below float overflow


def performance_checkpoints(steps: int) -> list[int]:
    """The steps at which a pilot run's held-out gain is recorded: a quarter, half, three quarters and the end."""
    return sorted({max(1, round(steps * f)) for f in (0.25, 0.5, 0.75)} | {steps})


def calibrated_gain(local_gain: float, start_loss: float) -> float:
    """A local quadratic gain (½·Res², nats) as a gain the loss can have: ℓ₀(1 − exp(−g/ℓ₀)), ℓ₀ the loss.

    Where the local figure is small against the loss it is kept (the quadratic model holds there); where it is
    not, it saturates at the loss itself, so no layer or set is ever predicted more nats than the loss has.
    """
    if start_loss <= 0 or local_gain <= 0:
        return 0.0
    return start_loss * -math.expm1(-local_gain / start_loss)


@dataclass(frozen=True)
class CardSettings:
    """What a card is computed with; defaults as documented in the contract."""

    probe_size: int = 256
    rank: int = 8
    alpha: float = 0.0  # 0: 2 * rank
    target_modules: tuple[str, ...] = ()  # empty: every linear module type
    compute_coupling: bool = False
    compute_performance: bool = False
    performance_steps: int = 50
    # The all-layer pilots' learning rates (with compute_performance); empty: DEFAULT_LEARNING_RATE_GRID.
    performance_learning_rates: tuple[float, ...] = ()
    seed: int = 0
    max_seq_len: int = 256
    batch_size: int = 16
    damping: float = 1e-3  # λ = damping · tr(Σ_z) / r
    device: str = ""  # "", "cpu", "cuda"
    precision: str = ""  # "", "float32", "bfloat16", "float16"

    def __post_init__(self) -> None:
        checks = [
            ("probe_size", 2 <= self.probe_size <= MAX_PROBE_SIZE, f"must be in 2..{MAX_PROBE_SIZE}"),
            ("lora.rank", 1 <= self.rank <= MAX_RANK, f"must be in 1..{MAX_RANK}"),
            # Infinity passes ">= 0" and then breaks the Cholesky solve; NaN fails every comparison.
            ("lora.alpha", math.isfinite(self.alpha) and 0 <= self.alpha <= MAX_ALPHA, f"must be in 0..{MAX_ALPHA:g}"),
            ("performance_steps", 1 <= self.performance_steps <= 10_000, "must be in 1..10000"),
            ("max_seq_len", 8 <= self.max_seq_len <= MAX_SEQ_LEN, f"must be in 8..{MAX_SEQ_LEN}"),
            ("batch_size", 1 <= self.batch_size <= 1024, "must be in 1..1024"),
            ("device", self.device in ("", "cpu", "cuda"), "must be cpu or cuda"),
            ("precision", self.precision in ("", "float32", "bfloat16", "float16"), "unknown precision"),
            ("damping", math.isfinite(self.damping) and self.damping > 0, "must be a positive number"),
            (
                "performance_learning_rates",
                len(self.performance_learning_rates) <= MAX_LEARNING_RATES
                and all(math.isfinite(r) and 0 < r <= 1 for r in self.performance_learning_rates),
                f"must be at most {MAX_LEARNING_RATES} learning rates, each in (0, 1]",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidArgument.field(name, f"{rule}, got {getattr(self, name.split('.')[-1])!r}")

    @property
    def learning_rate_grid(self) -> tuple[float, ...]:
        """The all-layer pilots' learning rates, ascending; the single-layer pilots' rate is always one of them."""
        rates = self.performance_learning_rates or DEFAULT_LEARNING_RATE_GRID
        return tuple(sorted({PERFORMANCE_LEARNING_RATE, *rates}))

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


@dataclass
class ModuleCard:
    module_type: str
    resnorm_sq: float
    resnorm_sq_split_half: float
    activation_energy: float
    effective_rank: float
    condition_number: float
    adapter_parameters: int


@dataclass
class LayerCardRow:
    index: int
    resnorm_sq: float
    resnorm_sq_split_half: float
    resnorm_share: float
    predicted_gain: float
    activation_energy: float
    effective_rank: float
    condition_number: float
    modules: list[ModuleCard]
    forward_seconds: float
    backward_seconds: float
    activation_bytes: int
    adapter_parameters: int
    adapter_bytes: int
    peft_serving_overhead_ms_per_token: float
    measured_gain: float | None = None
    # The performance column's pilot curve: held-out gain at performance_checkpoints(performance_steps),
    # the last being measured_gain; empty without the column (or on cards stored before it was recorded).
    measured_gain_curve: list[float] = field(default_factory=list)
    # Mean square of the residual stream entering the block (per hidden unit), over probe tokens; 0 on old cards.
    residual_mean_square: float = 0.0


@dataclass
class LearningRatePilot:
    """A pilot run of LoRA on every layer at one learning rate: held-out gain at the performance checkpoints."""

    learning_rate: float
    gain_curve: list[float]


@dataclass
class PlacementTiming:
    """One measured placement of the cost calibration: a real training step beside the fitted model's figures."""

    layers: list[int]
    measured_seconds: float  # the least over the calibration's rounds (held-out placements: one step)
    predicted_seconds: float
    measured_peak_memory_bytes: int  # the trainer's basis: weights + bytes saved for backward + 4x adapter bytes
    predicted_peak_memory_bytes: int


@dataclass
class CostCalibration:
    """How the per-block time figures were fitted to measured steps, and how well they predict placements the fit
    never saw (card_engine/calibration.py). Every fitted figure at its bound is named in ``notes``."""

    method: str
    rounds: int  # interleaved repetitions of each fitted placement
    measured_steps: int  # training steps the calibration ran (fitted and held-out), forward-only passes excluded
    seconds: float  # wall time of the calibration
    graph_seconds_per_block: float  # fitted: a block inside the backward graph, beyond its no-graph forward
    adapter_seconds_per_block: float  # fitted: an adapted block's extra (mean over blocks)
    fit: list[PlacementTiming]
    held_out: list[PlacementTiming]  # random placements measured after the fit, not used by it
    step_error_p50: float  # relative error |predicted - measured| / measured of the held-out step times
    step_error_p90: float
    memory_error_p50: float
    memory_error_p90: float
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainingCostCard:
    fixed_seconds: float
    per_adapter_seconds: float
    base_memory_bytes: int
    predicted_full_step_seconds: float
    measured_full_step_seconds: float
    predicted_partial_step_seconds: float
    measured_partial_step_seconds: float
    validation_layers: list[int]
    step_time_relative_error: float
    predicted_full_peak_memory_bytes: int
    measured_full_peak_memory_bytes: int
    peak_memory_relative_error: float
    batch_size: int
    seq_len: int
    # Per block, for the planner: costs when only passing gradients through, and the forward of blocks below
    # the lowest adapted one (no adapter, no graph). With LayerCardRow's adapted figures they give time(S), memory(S).
    backward_pass_seconds: list[float] = field(default_factory=list)
    pass_activation_bytes: list[int] = field(default_factory=list)
    forward_pass_seconds: list[float] = field(default_factory=list)
    forward_nograd_seconds: list[float] = field(default_factory=list)
    # How the figures were fitted and their held-out error; None on cards calibrated from one hooked step per block.
    calibration: CostCalibration | None = None
    # The frozen-prefix cache's bytes per training token (hidden size x bytes per value of the hidden states entering
    # a block), for the planner to price it; 0 on cards stored before it was recorded: priced uncached.
    prefix_cache_bytes_per_token: int = 0


@dataclass(frozen=True)
class VllmRankCost:
    """A serving pool's measured adapter overhead at one adapter rank."""

    rank: int
    overhead_fraction: float
    samples: int
    basis: str
    base_ms_per_token: float | None = None


@dataclass(frozen=True)
class VllmPoolCost:
    """One serving pool's LoRA settings and what its probes measured, rank by rank."""

    pool: str
    target_modules: tuple[str, ...]  # empty: every LoRA-capable module
    max_lora_rank: int
    ranks: tuple[VllmRankCost, ...] = ()


@dataclass
class ServingCostCard:
    peft_base_ms_per_token: float
    vllm_overhead_fraction: float | None = None
    vllm_basis: str = "not measured yet: the service measures it on the serving vLLM after a deployment"
    vllm_base_ms_per_token: float | None = None  # the serving vLLM's measured base inter-token time
    # Added when a card is read, never stored: each serving pool's figures, as the planner prices them.
    vllm_pools: tuple[VllmPoolCost, ...] = ()


@dataclass(frozen=True)
class CardDataset:
    """The data a card was computed on, as the contract's ``CardDataset`` shows it.

    ``kind`` is the request's source ("builtin", "path" or "inline"); ``source`` its name: the built-in task,
    the path as given, or the SHA-256 of the inline bytes (which are not kept with the card). ``fingerprint``
    is the hash of the parsed examples the probe sampled from (``ResolvedDataset.fingerprint``).
    """

    kind: str
    source: str
    split: str
    fingerprint: str
    examples_used: int
    examples_total: int
    inline_size_bytes: int = 0


@dataclass
class LayerCardData:
    model: str
    architecture: str
    num_layers: int
    num_parameters: int
    module_types: list[str]
    settings: CardSettings
    layers: list[LayerCardRow]
    training_cost: TrainingCostCard
    serving_cost: ServingCostCard
    probe_loss: float
    probe_examples: int
    probe_tokens: int
    compute_seconds: float
    coupling: list[list[float]] | None = None
    dataset: CardDataset | None = None  # None on cards stored before the dataset was recorded
    # With compute_performance: one all-layer pilot per learning rate of the grid; empty on older cards.
    learning_rate_pilots: list[LearningRatePilot] = field(default_factory=list)
