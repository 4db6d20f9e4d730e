"""Tuning jobs as domain types: states, the accepted spec (stored as JSON), events and results.

No torch here: the service process imports this module on the event loop's side, the worker on its own.
Specs round-trip through plain dicts (``to_dict``/``from_dict``) because they live in SQLite as JSON and are
read by a worker process that may be a newer or older build: unknown keys are ignored, missing ones default.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.plans import CurvePoint, Estimate, Plan
from layercard_service.errors import InvalidArgument

__all__ = [
    "END_STATES",
    "ID_PATTERN",
    "JOB_PREFIX",
    "SCHEDULES",
    "EvalSummary",
    "Hyperparameters",
    "JobEvent",
    "JobRecord",
    "JobResult",
    "JobSpec",
    "JobState",
    "PlacementPredictions",
    "PlacementSpec",
    "check_id",
    "dataset_from_dict",
    "dataset_to_dict",
    "job_id_from_name",
]

JOB_PREFIX = "tuningJobs/"
# AIP-122 resource ids. Always fullmatch: "$" (and so re.match with ^...$) accepts a trailing newline.
ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
SCHEDULES = ("constant", "linear", "cosine")


class JobState(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in END_STATES


END_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def check_id(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument.field(
            field_name, f"must match {ID_PATTERN.pattern} (lowercase letters, digits, '-'), got {value!r}"
        )
    return value


def job_id_from_name(name: str) -> str:
    """``tuningJobs/{id}`` -> id; anything else is the caller's error."""
    if not name.startswith(JOB_PREFIX) or not ID_PATTERN.fullmatch(name[len(JOB_PREFIX) :]):
        raise InvalidArgument.field("name", f"must look like 'tuningJobs/{{tuning_job_id}}', got {name!r}")
    return name[len(JOB_PREFIX) :]


def dataset_to_dict(request: DatasetRequest | None) -> dict[str, Any] | None:
    """A dataset as a job record keeps it: inline data by reference (persistence/datasets.py), never its bytes."""
    if request is None:
        return None
    if request.inline_jsonl is not None and not request.inline_sha256:
        raise ValueError("inline datasets are stored as artifacts before the job is written")
    out: dict[str, Any] = {"builtin": request.builtin, "path": request.path, "split": request.split}
    if request.inline_sha256:
        out["inline_jsonl_sha256"] = request.inline_sha256
        out["inline_jsonl_size_bytes"] = request.inline_size_bytes
    return out


def dataset_from_dict(raw: dict[str, Any] | None) -> DatasetRequest | None:
    if raw is None:
        return None
    common = {"builtin": raw.get("builtin", ""), "path": raw.get("path", ""), "split": raw.get("split", "")}
    inline = raw.get("inline_jsonl_b64")
    if inline is not None:  # a record from before inline datasets were artifacts: the bytes are in it
        data = base64.b64decode(inline)
        digest = hashlib.sha256(data).hexdigest()
        return DatasetRequest(inline_jsonl=data, inline_sha256=digest, inline_size_bytes=len(data), **common)
    return DatasetRequest(
        inline_sha256=raw.get("inline_jsonl_sha256", ""),
        inline_size_bytes=int(raw.get("inline_jsonl_size_bytes", 0)),
        **common,
    )


_ESTIMATES = (
    "predicted_gain",
    "step_seconds",
    "step_fraction_of_full",
    "peak_memory_bytes",
    "adapter_parameters",
    "adapter_bytes",
    "serving_overhead_ms_per_token",
    "serving_overhead_fraction",
    "prefix_cache_build_seconds",
    "prefix_cache_bytes",
)
# Old records kept the placement as protobuf JSON (``detail``); its enum names, read without protobuf.
_DETAIL_OBJECTIVES = {
    "OBJECTIVE_ACCURACY": "accuracy",
    "OBJECTIVE_EFFICIENCY": "efficiency",
    "OBJECTIVE_BALANCED": "balanced",
    "OBJECTIVE_FIXED_K": "fixed_k",
}


@dataclass(frozen=True)
class PlacementPredictions:
    """What a plan predicted for a placement, each figure with its basis, so that GetTuningJob can show them.

    A plan's figures (domain/plans.py ``Plan`` less the adapter's shape, which ``PlacementSpec`` holds); a caller's
    own placement may leave any of them out (None).
    """

    objective: str = ""  # one of domain/plans.py OBJECTIVES; "": not said
    predicted_gain: Estimate | None = None
    predicted_gain_share: float = 0.0
    step_seconds: Estimate | None = None
    step_fraction_of_full: Estimate | None = None
    peak_memory_bytes: Estimate | None = None
    adapter_parameters: Estimate | None = None
    adapter_bytes: Estimate | None = None
    serving_overhead_ms_per_token: Estimate | None = None
    serving_overhead_fraction: Estimate | None = None
    prefix_cache_build_seconds: Estimate | None = None  # set when the step is priced with the frozen-prefix cache
    prefix_cache_bytes: Estimate | None = None
    binding_limits: tuple[str, ...] = ()
    rationale: str = ""
    score: str = ""
    predicted_curve: tuple[CurvePoint, ...] = ()  # empty: none predicted, or a record from before it was kept
    learning_rate: float = 0.0  # the plan's; 0: none chosen

    @classmethod
    def from_plan(cls, plan: Plan) -> PlacementPredictions:
        return cls(
            objective=plan.objective,
            predicted_gain_share=plan.predicted_gain_share,
            binding_limits=plan.binding_limits,
            rationale=plan.rationale,
            score=plan.score,
            predicted_curve=plan.predicted_curve,
            learning_rate=plan.learning_rate,
            **{name: getattr(plan, name) for name in _ESTIMATES},
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlacementPredictions:
        values = _known(cls, raw)
        for name in _ESTIMATES:
            if values.get(name) is not None:
                values[name] = Estimate(**_known(Estimate, values[name]))
        values["binding_limits"] = tuple(values.get("binding_limits", ()))
        values["predicted_curve"] = tuple(
            CurvePoint(**_known(CurvePoint, p)) for p in values.get("predicted_curve", ())
        )
        return cls(**values)

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> PlacementPredictions:
        """From an old record's ``detail``: protobuf JSON of the Placement (lowerCamelCase names, defaults left
        out, enums by name, non-finite doubles as strings)."""

        def get(name: str, default: Any = None) -> Any:
            head, *rest = name.split("_")
            return detail.get("".join([head, *(part.title() for part in rest)]), detail.get(name, default))

        def estimate(name: str) -> Estimate | None:
            raw = get(name)
            if not isinstance(raw, dict):
                return None
            return Estimate(float(raw.get("value", 0.0)), str(raw.get("unit", "")), str(raw.get("basis", "")))

        return cls(
            objective=_DETAIL_OBJECTIVES.get(get("objective"), ""),
            predicted_gain_share=float(get("predicted_gain_share", 0.0)),
            binding_limits=tuple(str(v) for v in get("binding_limits", ())),
            rationale=str(get("rationale", "")),
            score=str(get("gain_score", "")),
            **{name: estimate(name) for name in _ESTIMATES},
        )


@dataclass(frozen=True)
class PlacementSpec:
    """Where the adapter goes and what the plan predicted (0 when nothing was predicted).

    ``predictions`` keeps every prediction with its basis, for GetTuningJob to show; the worker reads only the
    two figures it compares its measurements with (``predicted_step_seconds``, ``predicted_peak_memory_bytes``).
    """

    layers: tuple[int, ...] | None  # None: every layer
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()  # empty: every linear module type of the architecture
    dropout: float = 0.0
    predicted_step_seconds: float = 0.0
    predicted_peak_memory_bytes: int = 0
    steps: int = 0  # steps the plan chose (a total-training-time budget); 0: not chosen
    layer_card: str = ""
    predictions: PlacementPredictions | None = None  # None: explicit layers, nothing predicted
    serving_pool: str = ""  # the pool the plan chose, where deploys of the job's adapter go; "": not planned

    @classmethod
    def from_plan(cls, plan: Plan) -> PlacementSpec:
        return cls(
            layers=plan.layers,
            rank=plan.rank,
            alpha=plan.alpha,
            target_modules=plan.target_modules,
            predicted_step_seconds=plan.step_seconds.value,
            predicted_peak_memory_bytes=int(plan.peak_memory_bytes.value),
            steps=plan.steps,
            layer_card=plan.layer_card,
            predictions=PlacementPredictions.from_plan(plan),
            serving_pool=plan.serving_pool,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlacementSpec:
        values = _known(cls, raw)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        values["target_modules"] = tuple(values.get("target_modules", ()))
        if values.get("predictions") is not None:
            values["predictions"] = PlacementPredictions.from_dict(values["predictions"])
        elif raw.get("detail"):  # a record from before predictions were domain data
            values["predictions"] = PlacementPredictions.from_detail(raw["detail"])
        return cls(**values)


@dataclass(frozen=True)
class Hyperparameters:
    """Training settings with every default filled in at creation (``steps`` is resolved from epochs)."""

    steps: int = 200
    epochs: float = 0.0  # as requested; 0 when steps were given
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 16
    seed: int = 0
    eval_interval: int = 0  # 0: at the end only
    early_stopping_patience: int = 0
    # An evaluation improves only when its loss falls below the best by more than
    # max(abs, rel * |best|): smaller moves are float noise (summation order differs between CPUs) or noise of
    # the validation sample, and counting them as progress would keep a stalled run alive.
    early_stopping_min_delta: float = 1e-4
    early_stopping_min_delta_rel: float = 1e-3
    checkpoint_interval: int = 50
    max_seq_len: int = 256
    # Cache the hidden states entering the lowest adapted block (trainer/prefix_cache.py): on wherever it is
    # exact, which the job's events report; False turns it off.
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("early_stopping_min_delta", "early_stopping_min_delta_rel"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument.field(f"hyperparameters.{name}", f"must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class JobSpec:
    model: str
    training_data: DatasetRequest
    validation_data: DatasetRequest | None  # None: the built-in task's validation split, or no evaluation
    placement: PlacementSpec
    hyperparameters: Hyperparameters
    adapter_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "training_data": dataset_to_dict(self.training_data),
            "validation_data": dataset_to_dict(self.validation_data),
            "placement": dataclasses.asdict(self.placement),
            "hyperparameters": dataclasses.asdict(self.hyperparameters),
            "adapter_id": self.adapter_id,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobSpec:
        return cls(
            model=raw["model"],
            training_data=dataset_from_dict(raw["training_data"]),
            validation_data=dataset_from_dict(raw.get("validation_data")),
            placement=PlacementSpec.from_dict(raw["placement"]),
            hyperparameters=Hyperparameters(**_known(Hyperparameters, raw.get("hyperparameters", {}))),
            adapter_id=raw["adapter_id"],
        )


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


@dataclass(frozen=True)
class EvalSummary:
    step: int
    loss: float
    exact_match: float
    examples: int


@dataclass(frozen=True)
class JobResult:
    adapter_version: str  # "adapters/{adapter_id}/versions/{n}"
    final_eval: EvalSummary | None
    base_eval: EvalSummary | None
    measured_step_seconds: float
    predicted_step_seconds: float
    measured_peak_memory_bytes: int
    predicted_peak_memory_bytes: int
    training_seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobResult:
        values = _known(cls, raw)
        for key in ("final_eval", "base_eval"):
            if values.get(key) is not None:
                values[key] = EvalSummary(**values[key])
        return cls(**values)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request_id: str | None
    state: JobState
    spec: JobSpec
    create_time: float
    start_time: float | None
    end_time: float | None
    step: int
    total_steps: int
    error_code: str
    error_message: str
    result: JobResult | None

    @property
    def name(self) -> str:
        return JOB_PREFIX + self.job_id


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history. ``kind`` is state | step | eval | checkpoint; ``payload`` its fields."""

    job_id: str
    sequence: int
    time: float
    kind: str
    payload: dict[str, Any]
    message: str = ""
