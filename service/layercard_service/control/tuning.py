"""Tuning jobs on request: validation at creation, idempotency, queue limits, cancel and watch.

What can be checked cheaply is checked when the job is created, so a client learns of a bad request at once
(INVALID_ARGUMENT with field violations, NOT_FOUND, PERMISSION_DENIED): the datasets parse, the model exists,
the layers exist in it (from its config.json, without loading weights), the rank is servable. Whatever shows
only during training fails the job with a stable error code instead. No torch in this module: it runs in the
service process, where training never happens.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from layercard_service.control.job_requests import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    MAX_STEPS,
    HyperparameterRequest,
    LoraRequest,
    hyperparameters,
)
from layercard_service.data.sources import (
    DatasetRequest,
    ResolvedDataset,
    read_json_file,
    resolve_dataset,
    resolve_model_path,
)
from layercard_service.domain.jobs import (
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    PlacementSpec,
    check_id,
    job_id_from_name,
)
from layercard_service.domain.plans import Plan, PlanRequest
from layercard_service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from layercard_service.persistence.datasets import DatasetArtifacts
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import paginate
from layercard_service.runners.local import JobRunner, report_job_end

__all__ = ["CreateJob", "HyperparameterRequest", "LoraRequest", "PlannedPlacement", "Planner", "TuningService"]

WATCH_POLL_SECONDS = 0.2
QUEUE_RETRY_SECONDS = 60.0
ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)  # count against the queue limit
# User strings a job echoes back are capped, so that no single job outgrows a List page (persistence/store.py's
# MAX_LIST_RESPONSE_BYTES); the placement's size is capped at the API edge, which knows its encoding.
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME_CHARS = 64


@dataclass(frozen=True)
class PlannedPlacement:
    """A placement the planner chooses at creation: from a stored card under a budget."""

    layer_card: str
    request: PlanRequest  # its steps are replaced by the job's (the hyperparameters' steps, or the default)


class Planner(Protocol):
    """``PlacementPlanner`` (control/planning/planner.py): reads the card and plans; a seam."""

    def plan(self, card_name: str, request: PlanRequest) -> Plan: ...


@dataclass(frozen=True)
class _Inputs:
    model_path: Path
    train: ResolvedDataset
    validation: ResolvedDataset | None


@dataclass(frozen=True)
class CreateJob:
    model: str
    training_data: DatasetRequest
    validation_data: DatasetRequest | None
    placement: PlacementSpec | PlannedPlacement
    hyperparameters: HyperparameterRequest
    adapter_id: str
    job_id: str = ""
    request_id: str = ""


class TuningService:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        model_roots: tuple[Path, ...],
        dataset_roots: tuple[Path, ...],
        *,
        max_lora_rank: int = 16,
        max_concurrent: int = 1,
        queue_size: int = 16,
        poll_seconds: float = WATCH_POLL_SECONDS,
        data_dir: Path | None = None,
        planner: Planner | None = None,
    ) -> None:
        self.store, self.runner = store, runner
        self.planner = planner  # plans card-budget placements; None: they are refused
        # Artifacts live beside the database unless told otherwise (core.py opens <data-dir>/state.db).
        self.data_dir = Path(data_dir) if data_dir is not None else store.path.parent
        self.datasets = DatasetArtifacts(self.data_dir / "artifacts")
        self.model_roots, self.dataset_roots = model_roots, dataset_roots
        self.max_lora_rank, self.poll_seconds = max_lora_rank, poll_seconds
        self.max_concurrent, self.queue_size = max_concurrent, queue_size

    def start(self) -> None:
        self.runner.start()

    def close(self) -> None:
        self.runner.close()
        self.store.close()

    # --- create -------------------------------------------------------------------------------------------
    async def create(self, request: CreateJob) -> JobRecord:
        if request.request_id:
            if len(request.request_id) > 128:
                raise InvalidArgument.field("request_id", "must be at most 128 characters")
            known = await asyncio.to_thread(self.store.find_by_request, request.request_id)
            if known is not None:
                return known  # idempotent retry: the first job, whatever its state
        if not request.adapter_id:
            raise InvalidArgument.field("adapter_id", "is required, e.g. 'support-bot'")
        check_id(request.adapter_id, "adapter_id")
        if request.job_id:
            check_id(request.job_id, "tuning_job_id")
            if await asyncio.to_thread(self.store.get, request.job_id) is not None:
                raise AlreadyExists(
                    f"tuning job 'tuningJobs/{request.job_id}' already exists",
                    reason="TUNING_JOB_EXISTS",
                    metadata={"name": f"tuningJobs/{request.job_id}"},
                )
        # The model and the data first: a bad one is the caller's first error, and the plan needs the data's size.
        inputs = await asyncio.to_thread(self._resolve, request)
        if isinstance(request.placement, PlannedPlacement):
            # Reading the card and the search are short but not free (2^L sets): keep them off the event loop.
            planned = await asyncio.to_thread(
                self._plan, request.placement, request.hyperparameters, len(inputs.train.examples)
            )
            request = replace(request, placement=planned)
        spec, total_steps = await asyncio.to_thread(self._validate, request, inputs)
        active = await asyncio.to_thread(self.store.ids_in, ACTIVE_STATES)
        limit = self.max_concurrent + self.queue_size
        if len(active) >= limit:
            raise ResourceExhausted(
                f"too many tuning jobs queued or running ({len(active)}); try again later",
                reason="TUNING_QUEUE_FULL",
                retry_after=QUEUE_RETRY_SECONDS,
                metadata={"limit": str(limit)},
            )
        job_id = request.job_id or f"job-{uuid.uuid4().hex[:16]}"
        record, created = await asyncio.to_thread(self._insert, job_id, request, spec, total_steps)
        if created:
            self.runner.submit(job_id)
        return record

    def _insert(self, job_id: str, request: CreateJob, spec: JobSpec, total_steps: int) -> tuple[JobRecord, bool]:
        """Stores the inline datasets as artifacts, then the job that refers to them."""
        stored = replace(
            spec,
            training_data=self.datasets.store(spec.training_data),
            validation_data=self.datasets.store(spec.validation_data),
        )
        hashes = [d.inline_sha256 for d in (stored.training_data, stored.validation_data) if d and d.inline_sha256]
        try:
            record, created = self.store.create(job_id, request.request_id or None, stored, total_steps)
        except BaseException:
            self.store.release_datasets(hashes, self.datasets.remove)
            raise
        if created:
            self.datasets.ensure(spec.training_data)
            self.datasets.ensure(spec.validation_data)
        else:  # an idempotent retry: the first job's datasets are the ones kept
            self.store.release_datasets(hashes, self.datasets.remove)
        return record, created

    def _plan(self, planned: PlannedPlacement, hp: HyperparameterRequest, n_train: int) -> PlacementSpec:
        """The plan's placement, with every prediction and its basis kept for GetTuningJob to show."""
        if self.planner is None:
            raise FailedPrecondition("card_budget placements need the placement planner", reason="NO_PLANNER")
        # The plan's reference steps are the job's: a training-time budget then fits them, or fewer. With the run
        # itself (its training set, batch and cache option) the plan prices the frozen-prefix cache as the trainer
        # will use it. Bad values are left to _validate, which names the hyperparameter.
        batch = hp.batch_size if hp.batch_size > 0 else DEFAULT_BATCH_SIZE
        steps = hp.steps if hp.steps is not None and hp.steps > 0 else DEFAULT_STEPS
        if hp.steps is None and hp.epochs is not None and math.isfinite(hp.epochs) and hp.epochs > 0:
            steps = min(math.ceil(hp.epochs * n_train / batch), MAX_STEPS)
        run = replace(
            planned.request,
            steps=steps,
            prefix_cache=hp.prefix_cache is not False,
            train_examples=n_train,
            batch_size=batch,
        )
        return PlacementSpec.from_plan(self.planner.plan(planned.layer_card, run))

    def _resolve(self, request: CreateJob) -> _Inputs:
        """The model's folder and the datasets, parsed; each must exist and the datasets must have examples."""
        model_path = resolve_model_path(request.model, self.model_roots)
        train = resolve_dataset(request.training_data, self.dataset_roots, "training_data")
        validation = None
        if request.validation_data is not None:
            validation = resolve_dataset(request.validation_data, self.dataset_roots, "validation_data")
            if not validation.examples:
                raise InvalidArgument.field("validation_data", "has no examples", reason="INVALID_DATASET")
        if not train.examples:
            raise InvalidArgument.field("training_data", "has no examples", reason="INVALID_DATASET")
        return _Inputs(model_path, train, validation)

    def _validate(self, request: CreateJob, inputs: _Inputs) -> tuple[JobSpec, int]:
        """The synchronous checks; returns the spec with defaults filled in, and the number of steps."""
        model_path, train, validation = inputs.model_path, inputs.train, inputs.validation
        assert isinstance(request.placement, PlacementSpec)  # create() has planned a PlannedPlacement
        placement = self._placement(request.placement, request.hyperparameters.lora, _num_layers(model_path))
        has_validation = validation is not None or bool(train.validation)
        planned_rate = placement.predictions.learning_rate if placement.predictions is not None else 0.0
        hp, total = hyperparameters(
            request.hyperparameters, len(train.examples), placement.steps, has_validation, planned_rate
        )
        ranks = self.runner.ranks_per_job
        if hp.batch_size < ranks:  # each data-parallel rank trains its shard of every batch: none may be empty
            raise InvalidArgument.field(
                "hyperparameters.batch_size",
                f"must be at least the {ranks} data-parallel ranks a job trains on (k8s_gpus), got {hp.batch_size}",
            )
        spec = JobSpec(request.model, request.training_data, request.validation_data, placement, hp, request.adapter_id)
        return spec, total

    def _placement(self, placement: PlacementSpec, lora: LoraRequest | None, layers_in_model: int) -> PlacementSpec:
        field = "hyperparameters.lora" if lora is not None else "placement.lora"
        if lora is not None:  # the hyperparameters' shape overrides the placement's
            placement = replace(
                placement,
                rank=lora.rank if lora.rank is not None else placement.rank,
                alpha=lora.alpha or (2.0 * lora.rank if lora.rank is not None else placement.alpha),
                target_modules=lora.target_modules or placement.target_modules,
                dropout=lora.dropout or placement.dropout,
            )
        if placement.rank < 1 or placement.rank > self.max_lora_rank:
            raise InvalidArgument.field(
                f"{field}.rank",
                f"must be in 1..{self.max_lora_rank} (the server's max_lora_rank), got {placement.rank}",
            )
        if not (math.isfinite(placement.alpha) and placement.alpha > 0):
            raise InvalidArgument.field(f"{field}.alpha", f"must be > 0, got {placement.alpha}")
        if not 0.0 <= placement.dropout < 1.0:
            raise InvalidArgument.field(f"{field}.dropout", f"must be in [0, 1), got {placement.dropout}")
        if not 0 <= placement.steps <= MAX_STEPS:
            raise InvalidArgument.field("placement.steps", f"must be in 0..{MAX_STEPS}, got {placement.steps}")
        if any(not m or not m.replace("_", "").isalnum() for m in placement.target_modules):
            raise InvalidArgument.field(f"{field}.target_modules", "must be module names like 'q_proj'")
        if len(placement.target_modules) > MAX_TARGET_MODULES or any(
            len(m) > MAX_MODULE_NAME_CHARS for m in placement.target_modules
        ):
            raise InvalidArgument.field(
                f"{field}.target_modules",
                f"at most {MAX_TARGET_MODULES} names of at most {MAX_MODULE_NAME_CHARS} characters each",
            )
        layers = placement.layers
        if layers is not None:
            if not layers:
                raise InvalidArgument.field("placement.layers", "must name at least one layer")
            if len(set(layers)) != len(layers):
                raise InvalidArgument.field("placement.layers", f"must not repeat a layer, got {list(layers)}")
            bad = [i for i in layers if not 0 <= i < layers_in_model]
            if bad:
                raise InvalidArgument.field(
                    "placement.layers", f"the model has layers 0..{layers_in_model - 1}; out of range: {bad}"
                )
            placement = replace(placement, layers=tuple(sorted(layers)))
        return placement

    # --- read ---------------------------------------------------------------------------------------------
    def get(self, name: str) -> JobRecord:
        job_id = job_id_from_name(name)
        record = self.store.get(job_id)
        if record is None:
            raise NotFound(f"no tuning job {name!r}", reason="TUNING_JOB_NOT_FOUND", metadata={"name": name})
        return record

    def list(
        self,
        page_size: int,
        page_token: str,
        states: Sequence[JobState],
        size_of: Callable[[JobRecord], int] | None = None,
    ) -> tuple[list[JobRecord], str]:
        """One page of jobs; ``size_of`` (a job's size in the response) bounds the page in bytes too."""

        def fetch(offset: int, limit: int) -> list[JobRecord]:
            return self.store.list(states, offset, limit)

        return paginate(fetch, page_size, page_token, size_of=size_of)

    # --- delete -------------------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """Deletes an ended job with its events, checkpoints, log and unshared inline datasets (AIP-135).

        Adapter versions the job published stay: deployments and later jobs depend on them.
        """
        job_id = job_id_from_name(name)
        state = self.store.delete(job_id, self.datasets.remove)
        if state is None:
            raise NotFound(f"no tuning job {name!r}", reason="TUNING_JOB_NOT_FOUND", metadata={"name": name})
        if not state.ended:
            raise FailedPrecondition(
                f"tuning job {name!r} is {state.value}: only ended jobs can be deleted; cancel it first",
                reason="TUNING_JOB_NOT_ENDED",
                metadata={"name": name, "state": state.value},
            )
        shutil.rmtree(self.data_dir / "artifacts" / "checkpoints" / job_id, ignore_errors=True)
        self.runner.forget(job_id)

    # --- cancel -------------------------------------------------------------------------------------------
    def cancel(self, name: str) -> JobRecord:
        record = self.get(name)
        for _ in range(3):  # the worker may change the state between our read and write: read again
            if record.state == JobState.QUEUED:
                if self.store.transition(
                    record.job_id, [JobState.QUEUED], JobState.CANCELLED, "cancelled while queued"
                ):
                    self.runner.cancel(record.job_id)
                    report_job_end(self.store, self.runner.telemetry, record.job_id)
                    break
            elif record.state == JobState.RUNNING:
                message = "cancel requested: stopping before the next step"
                if self.store.transition(record.job_id, [JobState.RUNNING], JobState.CANCELLING, message):
                    self.runner.cancel(record.job_id)  # a safety net: ends a worker that does not stop by itself
                    break
            else:
                break  # CANCELLING already, or ended: nothing to do
            record = self.get(name)
        return self.get(name)

    # --- watch --------------------------------------------------------------------------------------------
    async def watch(self, name: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after ``after_sequence``: history first, then new ones until the job has ended."""
        if after_sequence < 0:
            raise InvalidArgument.field("after_sequence", f"must be >= 0, got {after_sequence}")
        record = await asyncio.to_thread(self.get, name)
        job_id, last = record.job_id, after_sequence
        while True:
            events = await asyncio.to_thread(self.store.events_after, job_id, last)
            for event in events:
                yield event
                last = event.sequence
            if events:
                continue  # drain the backlog before sleeping
            state = await asyncio.to_thread(self.store.state, job_id)
            if state is None or state.ended:
                # The end state and its event commit together; read once more for events written just before.
                for event in await asyncio.to_thread(self.store.events_after, job_id, last):
                    yield event
                return
            await asyncio.sleep(self.poll_seconds)


def _num_layers(model_path: Path) -> int:
    """Number of blocks from config.json (Llama-style, GPT-2 and GPT-NeoX spellings)."""
    config = read_json_file(model_path / "config.json", "model")  # its errors never quote the file
    if not isinstance(config, dict):
        raise InvalidArgument.field("model", "its config.json is not a JSON object")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config") or {}
    if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
        return text["num_hidden_layers"]
    raise InvalidArgument.field("model", "its config.json does not say how many layers it has")
