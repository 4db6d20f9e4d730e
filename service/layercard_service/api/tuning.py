"""TuningService: proto <-> domain conversion only (no torch; the core validates and the runner trains)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from layercard.v1 import common_pb2, placement_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.api.layer_card import dataset_request
from layercard_service.api.paging import ProtoPage
from layercard_service.api.placement import (
    objective_from_name,
    objective_name,
    plan_request_from_card_budget,
    prediction_from_estimate,
)
from layercard_service.control.tuning import (
    CreateJob,
    HyperparameterRequest,
    LoraRequest,
    PlannedPlacement,
    TuningService,
)
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import (
    EvalSummary,
    Hyperparameters,
    JobEvent,
    JobRecord,
    JobState,
    PlacementPredictions,
    PlacementSpec,
)
from layercard_service.domain.plans import CurvePoint, Estimate
from layercard_service.domain.pools import POOL_NAME
from layercard_service.errors import InvalidArgument

__all__ = ["TuningServicer", "event_to_proto", "job_to_proto"]

DEFAULT_RANK = 8
# A job echoes its placement back (every prediction and its basis); a caller's own placement is capped so that
# no job outgrows a List page (store.MAX_LIST_RESPONSE_BYTES). Planned placements are far smaller.
MAX_PLACEMENT_BYTES = 64 * 1024
MAX_ERROR_MESSAGE_CHARS = 4096  # a failure's message is shown up to this length (it may quote the data)

_STATES = {
    JobState.QUEUED: tuning_pb2.TUNING_JOB_STATE_QUEUED,
    JobState.RUNNING: tuning_pb2.TUNING_JOB_STATE_RUNNING,
    JobState.CANCELLING: tuning_pb2.TUNING_JOB_STATE_CANCELLING,
    JobState.SUCCEEDED: tuning_pb2.TUNING_JOB_STATE_SUCCEEDED,
    JobState.FAILED: tuning_pb2.TUNING_JOB_STATE_FAILED,
    JobState.CANCELLED: tuning_pb2.TUNING_JOB_STATE_CANCELLED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_SCHEDULES = {
    tuning_pb2.LEARNING_RATE_SCHEDULE_UNSPECIFIED: "",
    tuning_pb2.LEARNING_RATE_SCHEDULE_CONSTANT: "constant",
    tuning_pb2.LEARNING_RATE_SCHEDULE_LINEAR: "linear",
    tuning_pb2.LEARNING_RATE_SCHEDULE_COSINE: "cosine",
}
_SCHEDULES_BACK = {v: k for k, v in _SCHEDULES.items() if v}
# The Placement fields that are predictions with their basis (PlacementPredictions' Estimates).
_PREDICTIONS = (
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


# --- requests -> domain ---------------------------------------------------------------------------------------
def _lora_request(shape: common_pb2.LoraShape) -> LoraRequest:
    return LoraRequest(
        rank=shape.rank if shape.HasField("rank") else None,
        alpha=shape.alpha,
        target_modules=tuple(shape.target_modules),
        dropout=shape.dropout,
    )


def _placement_from_shape(layers: list[int], shape: common_pb2.LoraShape, **extra: Any) -> PlacementSpec:
    rank = shape.rank if shape.HasField("rank") else DEFAULT_RANK
    return PlacementSpec(
        layers=tuple(layers),
        rank=rank,
        alpha=shape.alpha or 2.0 * rank,
        target_modules=tuple(shape.target_modules),
        dropout=shape.dropout,
        **extra,
    )


def _prediction(message: placement_pb2.Placement, name: str) -> float:
    """A plan's prediction sent back to us: a count or a duration, so finite and >= 0 (int(inf) would raise)."""
    value = getattr(message, name).value
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument.field(f"placement.{name}.value", f"must be a finite number >= 0, got {value}")
    return value


def _estimate(message: placement_pb2.Placement, name: str) -> Estimate | None:
    if not message.HasField(name):
        return None
    prediction = getattr(message, name)
    return Estimate(prediction.value, prediction.unit, prediction.basis)


def _curve_from_proto(message: placement_pb2.Placement) -> tuple[CurvePoint, ...]:
    points = []
    for i, p in enumerate(message.predicted_curve):
        if p.steps < 1 or not all(math.isfinite(v) for v in (p.seconds, p.gain, p.gain_low, p.gain_high)):
            raise InvalidArgument.field(
                f"placement.predicted_curve[{i}]", "must have steps >= 1 and finite seconds and gains"
            )
        points.append(CurvePoint(p.steps, p.seconds, p.gain, p.gain_low, p.gain_high))
    return tuple(points)


def _predictions_from_proto(message: placement_pb2.Placement) -> PlacementPredictions:
    rate = message.learning_rate
    if not (math.isfinite(rate) and 0 <= rate <= 10):
        raise InvalidArgument.field(
            "placement.learning_rate", f"must be in [0, 10] (0: none chosen by the plan), got {rate}"
        )
    return PlacementPredictions(
        objective=objective_name(message.objective),
        predicted_gain_share=message.predicted_gain_share,
        binding_limits=tuple(message.binding_limits),
        rationale=message.rationale,
        score=message.gain_score,
        predicted_curve=_curve_from_proto(message),
        learning_rate=rate,
        **{name: _estimate(message, name) for name in _PREDICTIONS},
    )


def _placement_from_proto(message: placement_pb2.Placement) -> PlacementSpec:
    if message.steps < 0:
        raise InvalidArgument.field("placement.steps", f"must be >= 0 (0: not chosen by the plan), got {message.steps}")
    if message.ByteSize() > MAX_PLACEMENT_BYTES:
        raise InvalidArgument.field(
            "placement", f"is {message.ByteSize()} bytes serialized; at most {MAX_PLACEMENT_BYTES} are accepted"
        )
    return _placement_from_shape(
        list(message.layers),
        message.lora,
        predicted_step_seconds=_prediction(message, "step_seconds"),
        predicted_peak_memory_bytes=int(_prediction(message, "peak_memory_bytes")),
        steps=message.steps,
        layer_card=message.layer_card,
        predictions=_predictions_from_proto(message),
        serving_pool=_pool_name(message.serving_pool),
    )


def _pool_name(name: str) -> str:
    """A plan's serving pool sent back to us: a pool name or empty (whether the pool exists is the deploy's to say)."""
    if name and not POOL_NAME.fullmatch(name):
        raise InvalidArgument.field(
            "placement.serving_pool", f"must be a pool name (a DNS label) or empty, got {name[:80]!r}"
        )
    return name


def _placement(request: tuning_pb2.CreateTuningJobRequest) -> PlacementSpec | PlannedPlacement:
    kind = request.WhichOneof("placement_source")
    if kind == "placement":
        return _placement_from_proto(request.placement)
    if kind == "explicit_layers":
        return _placement_from_shape(list(request.explicit_layers.layers), request.explicit_layers.lora)
    if kind == "card_budget":  # the tuning service plans it
        card_name, plan_request = plan_request_from_card_budget(request.card_budget)
        return PlannedPlacement(card_name, plan_request)
    raise InvalidArgument.field("placement_source", "is required: set placement, card_budget or explicit_layers")


def _hyperparameters(message: tuning_pb2.Hyperparameters) -> HyperparameterRequest:
    length = message.WhichOneof("length")
    if message.schedule not in _SCHEDULES:
        raise InvalidArgument.field("hyperparameters.schedule", f"unknown schedule {message.schedule}")
    return HyperparameterRequest(
        steps=message.steps if length == "steps" else None,
        epochs=message.epochs if length == "epochs" else None,
        learning_rate=message.learning_rate,
        schedule=_SCHEDULES[message.schedule],
        warmup_steps=message.warmup_steps,
        batch_size=message.batch_size,
        lora=_lora_request(message.lora) if message.HasField("lora") else None,
        seed=message.seed,
        eval_interval=message.eval_interval,
        early_stopping_patience=message.early_stopping_patience,
        early_stopping_min_delta=(
            message.early_stopping_min_delta if message.HasField("early_stopping_min_delta") else None
        ),
        early_stopping_min_delta_relative=(
            message.early_stopping_min_delta_relative if message.HasField("early_stopping_min_delta_relative") else None
        ),
        checkpoint_interval=message.checkpoint_interval,
        max_seq_len=message.max_seq_len,
        prefix_cache=message.prefix_cache if message.HasField("prefix_cache") else None,
    )


# --- domain -> responses --------------------------------------------------------------------------------------
def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _dataset_to_proto(request: DatasetRequest | None) -> common_pb2.DatasetSource | None:
    if request is None:
        return None
    if request.builtin:
        return common_pb2.DatasetSource(builtin=request.builtin, split=request.split)
    if request.inline_sha256:  # by reference: the bytes stay in the artifact store, responses stay small
        return common_pb2.DatasetSource(
            inline_jsonl=b"",
            split=request.split,
            inline_jsonl_sha256=request.inline_sha256,
            inline_jsonl_size_bytes=request.inline_size_bytes,
        )
    return common_pb2.DatasetSource(path=request.path, split=request.split)


def _placement_to_proto(spec: PlacementSpec) -> placement_pb2.Placement:
    message = placement_pb2.Placement(
        layer_card=spec.layer_card,
        layers=list(spec.layers or ()),
        lora=common_pb2.LoraShape(
            rank=spec.rank, alpha=spec.alpha, target_modules=list(spec.target_modules), dropout=spec.dropout
        ),
        steps=spec.steps,
        serving_pool=spec.serving_pool,
    )
    predicted = spec.predictions
    if predicted is not None:
        message.objective = objective_from_name(predicted.objective)
        message.predicted_gain_share = predicted.predicted_gain_share
        message.binding_limits.extend(predicted.binding_limits)
        message.rationale = predicted.rationale
        message.gain_score = predicted.score
        message.learning_rate = predicted.learning_rate
        message.predicted_curve.extend(
            placement_pb2.CurvePoint(
                steps=p.steps, seconds=p.seconds, gain=p.gain, gain_low=p.gain_low, gain_high=p.gain_high
            )
            for p in predicted.predicted_curve
        )
        for name in _PREDICTIONS:
            estimate = getattr(predicted, name)
            if estimate is not None:
                getattr(message, name).CopyFrom(prediction_from_estimate(estimate))
    return message


def _hyperparameters_to_proto(hp: Hyperparameters, placement: PlacementSpec) -> tuning_pb2.Hyperparameters:
    message = tuning_pb2.Hyperparameters(
        learning_rate=hp.learning_rate,
        schedule=_SCHEDULES_BACK[hp.schedule],
        warmup_steps=hp.warmup_steps,
        batch_size=hp.batch_size,
        lora=common_pb2.LoraShape(
            rank=placement.rank,
            alpha=placement.alpha,
            target_modules=list(placement.target_modules),
            dropout=placement.dropout,
        ),
        seed=hp.seed,
        eval_interval=hp.eval_interval,
        early_stopping_patience=hp.early_stopping_patience,
        early_stopping_min_delta=hp.early_stopping_min_delta,
        early_stopping_min_delta_relative=hp.early_stopping_min_delta_rel,
        checkpoint_interval=hp.checkpoint_interval,
        max_seq_len=hp.max_seq_len,
        prefix_cache=hp.prefix_cache,
    )
    if hp.epochs:
        message.epochs = hp.epochs
    else:
        message.steps = hp.steps
    return message


def _eval_to_proto(summary: EvalSummary | None) -> tuning_pb2.EvalMetrics | None:
    if summary is None:
        return None
    return tuning_pb2.EvalMetrics(
        step=summary.step, loss=summary.loss, exact_match=summary.exact_match, examples=summary.examples
    )


def job_to_proto(job: JobRecord) -> tuning_pb2.TuningJob:
    spec = job.spec
    message = tuning_pb2.TuningJob(
        name=job.name,
        state=_STATES[job.state],
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        model=spec.model,
        training_data=_dataset_to_proto(spec.training_data),
        validation_data=_dataset_to_proto(spec.validation_data),
        placement=_placement_to_proto(spec.placement),
        hyperparameters=_hyperparameters_to_proto(spec.hyperparameters, spec.placement),
        adapter_id=spec.adapter_id,
        step=job.step,
        total_steps=job.total_steps,
        error_code=job.error_code,
        error_message=job.error_message[:MAX_ERROR_MESSAGE_CHARS],
    )
    if job.result is not None:
        r = job.result
        message.result.CopyFrom(
            tuning_pb2.TuningResult(
                adapter_version=r.adapter_version,
                final_eval=_eval_to_proto(r.final_eval),
                base_eval=_eval_to_proto(r.base_eval),
                measured_step_seconds=r.measured_step_seconds,
                predicted_step_seconds=r.predicted_step_seconds,
                measured_peak_memory_bytes=r.measured_peak_memory_bytes,
                predicted_peak_memory_bytes=r.predicted_peak_memory_bytes,
                tokens_per_second=r.tokens_per_second,
            )
        )
        message.result.training_duration.FromNanoseconds(int(r.training_seconds * 1e9))
    return message


def event_to_proto(event: JobEvent) -> tuning_pb2.TuningJobEvent:
    message = tuning_pb2.TuningJobEvent(sequence=event.sequence, time=_timestamp(event.time), message=event.message)
    p = event.payload
    if event.kind == "state":
        message.state_change = _STATES[JobState(p["state"])]
    elif event.kind == "step":
        message.step.CopyFrom(
            tuning_pb2.StepMetrics(
                step=p["step"],
                loss=p["loss"],
                learning_rate=p["learning_rate"],
                tokens_per_second=p["tokens_per_second"],
            )
        )
        message.step.eta.FromNanoseconds(int(p["eta_seconds"] * 1e9))
    elif event.kind == "eval":
        message.eval.CopyFrom(_eval_to_proto(EvalSummary(p["step"], p["loss"], p["exact_match"], p["examples"])))
    elif event.kind == "checkpoint":
        message.checkpoint.CopyFrom(tuning_pb2.Checkpoint(step=p["step"], path=p["path"]))
    elif event.kind == "note" and isinstance(p.get("prefix_cache"), dict):
        message.prefix_cache.CopyFrom(_prefix_cache_to_proto(p["prefix_cache"]))
    return message  # any other "note": a message alone


def _prefix_cache_to_proto(p: dict) -> tuning_pb2.PrefixCacheReport:
    report = tuning_pb2.PrefixCacheReport(
        enabled=bool(p.get("enabled")),
        reason=str(p.get("reason", "")),
        cached_blocks=int(p.get("cached_blocks", 0)),
        examples=int(p.get("examples", 0)),
        tokens=int(p.get("tokens", 0)),
        size_bytes=int(p.get("bytes", 0)),
        on_disk=bool(p.get("on_disk")),
    )
    report.build_duration.FromNanoseconds(int(float(p.get("build_seconds", 0.0)) * 1e9))
    report.saved_per_step.FromNanoseconds(int(float(p.get("saved_seconds_per_step", 0.0)) * 1e9))
    return report


class TuningServicer(tuning_pb2_grpc.TuningServiceServicer):
    def __init__(self, tuning: TuningService) -> None:
        self.tuning = tuning

    async def CreateTuningJob(self, request, context):
        hp = request.hyperparameters
        create = CreateJob(
            model=request.model,
            training_data=dataset_request(request.training_data),
            validation_data=dataset_request(request.validation_data) if request.HasField("validation_data") else None,
            placement=_placement(request),
            hyperparameters=_hyperparameters(hp),
            adapter_id=request.adapter_id,
            job_id=request.tuning_job_id,
            request_id=request.request_id,
        )
        return job_to_proto(await self.tuning.create(create))

    async def GetTuningJob(self, request, context):
        return job_to_proto(await asyncio.to_thread(self.tuning.get, request.name))

    async def ListTuningJobs(self, request, context):
        states = []
        for value in request.states:
            if value not in _STATES_BACK:
                raise InvalidArgument.field("states", f"unknown or unspecified state {value}")
            states.append(_STATES_BACK[value])
        page = ProtoPage(job_to_proto)
        jobs, token = await asyncio.to_thread(
            self.tuning.list, request.page_size, request.page_token, states, page.size_of
        )
        return tuning_pb2.ListTuningJobsResponse(tuning_jobs=page.messages(jobs), next_page_token=token)

    async def CancelTuningJob(self, request, context):
        return job_to_proto(await asyncio.to_thread(self.tuning.cancel, request.name))

    async def DeleteTuningJob(self, request, context):
        await asyncio.to_thread(self.tuning.delete, request.name)
        return empty_pb2.Empty()

    async def WatchTuningJob(self, request, context):
        events = self.tuning.watch(request.name, request.after_sequence)
        try:
            async for event in events:
                yield event_to_proto(event)
        finally:
            await events.aclose()  # the client went away or the job ended: stop polling
