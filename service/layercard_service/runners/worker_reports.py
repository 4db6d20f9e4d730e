"""What tuning workers report, received on the service's side: the domain behind the internal WorkerService.

A worker never opens the service's database: it reads its job and writes its progress, events and end through
the service (api/worker.py is the gRPC edge over ``WorkerReports``; trainer/reporter.py is the worker's client).
Each worker attempt holds a credential of its own: the runner makes a random token when it starts the attempt
(``issue_worker_token``), stores only its SHA-256 in the job store (so a running Kubernetes worker still
authenticates after a service restart) and hands the token to the worker in its environment, never in argv.
A new attempt's token replaces the old one, so a stale worker of the same job is refused.

Reports are idempotent: a worker numbers its event batches per attempt and retries a batch with its number,
and a number already recorded is acknowledged without writing it again. Ending a job is a state transition
(from RUNNING or CANCELLING only), so a retried FinishJob after one that went through changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layercard_service.domain.jobs import JobResult, JobSpec, JobState, check_id
from layercard_service.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from layercard_service.persistence.jobs import JobStore, NewEvent
from layercard_service.trainer.artifact import staged_adapter_at

__all__ = [
    "EVENT_KINDS",
    "EXIT_CREDENTIAL_REFUSED",
    "EXIT_DISK_FULL",
    "EXIT_SERVICE_LOST",
    "MAX_BATCH_EVENTS",
    "TOKEN_ENV",
    "Finish",
    "ServiceEndpoint",
    "WorkerJob",
    "WorkerReports",
    "issue_worker_token",
    "parse_json_object",
    "token_digest",
]

# How a worker exits when it cannot end its job itself; the runner that started it records the end.
EXIT_DISK_FULL = 28  # ENOSPC's number: the service's disk is full, the job's end could not be written
EXIT_SERVICE_LOST = 75  # EX_TEMPFAIL: the service stayed unreachable; its restart recovery resumes the job
EXIT_CREDENTIAL_REFUSED = 77  # EX_NOPERM: the token was refused (a newer attempt of the job holds the credential)
TOKEN_ENV = "LAYERCARD_WORKER_TOKEN"  # the worker's credential: in its environment, never on its command line
EVENT_KINDS = frozenset({"step", "eval", "checkpoint", "note"})  # "state" events are the service's own
MAX_BATCH_EVENTS = 1000
_ACTIVE = (JobState.RUNNING, JobState.CANCELLING)


@dataclass(frozen=True)
class ServiceEndpoint:
    """Where a worker reaches the service: the address, and the CA and name to check when it serves TLS."""

    address: str
    ca_file: Path | None = None
    server_name: str = ""  # "": the address's host

    def worker_args(self) -> list[str]:
        args = ["--service-address", self.address]
        if self.ca_file is not None:
            args += ["--service-ca-file", str(self.ca_file)]
        if self.server_name:
            args += ["--service-server-name", self.server_name]
        return args


@dataclass(frozen=True)
class WorkerJob:
    """What a worker reads of its job."""

    spec: JobSpec
    state: JobState
    total_steps: int
    recorded_steps: dict[str, int]  # the highest step of each kind of event already in the history


@dataclass(frozen=True)
class Finish:
    """How a worker ends its job. SUCCEEDED carries the staged adapter; FAILED its code and message."""

    outcome: JobState
    message: str = ""
    error_code: str = ""
    error_message: str = ""
    staged_adapter_path: str = ""
    adapter_metadata: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # JobResult's fields but adapter_version


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_worker_token(store: JobStore, job_id: str) -> str:
    """A fresh credential for the job's next worker attempt; only its digest is stored."""
    token = secrets.token_urlsafe(32)
    store.set_worker_credential(job_id, token_digest(token))
    return token


class WorkerReports:
    """The service's side of the workers' reports, over the job store."""

    def __init__(self, store: JobStore, artifacts: Path, max_lora_rank: int) -> None:
        self.store, self.artifacts, self.max_lora_rank = store, Path(artifacts), max_lora_rank

    def authenticate(self, job_id: str, token: str | None) -> None:
        """The token must be the current credential of this job's worker."""
        if not token:
            raise Unauthenticated(
                "missing metadata 'authorization: Bearer <worker token>'", reason="MISSING_WORKER_TOKEN"
            )
        owner = self.store.job_of_credential(token_digest(token))
        if owner is None:
            raise Unauthenticated(
                "the worker token is not the credential of any running job", reason="INVALID_WORKER_TOKEN"
            )
        if owner != job_id:
            raise PermissionDenied(
                f"the worker token is another job's, not job {job_id!r}'s",
                reason="WORKER_TOKEN_OF_ANOTHER_JOB",
                metadata={"job_id": job_id},
            )

    def get_job(self, job_id: str) -> WorkerJob:
        job = self.store.get(check_id(job_id, "job_id"))
        if job is None:
            raise NotFound(f"tuning job {job_id!r} not found", reason="TUNING_JOB_NOT_FOUND")
        return WorkerJob(job.spec, job.state, job.total_steps, self._recorded_steps(job_id))

    def report(
        self, job_id: str, batch: int, events: list[NewEvent], step: int | None, worker_pid: int | None
    ) -> tuple[JobState, bool]:
        """Records a batch; (the job's state, whether it was written: False for a retried batch)."""
        check_id(job_id, "job_id")
        if batch < 0:
            raise InvalidArgument.field("batch", f"must be >= 0, got {batch}")
        if events and batch == 0:
            raise InvalidArgument.field("batch", "a batch with events needs its number (1, 2, ...) for retries")
        if len(events) > MAX_BATCH_EVENTS:
            raise InvalidArgument.field("events", f"at most {MAX_BATCH_EVENTS} per batch, got {len(events)}")
        for i, event in enumerate(events):
            if event.kind not in EVENT_KINDS:
                raise InvalidArgument.field(
                    f"events[{i}].kind", f"must be one of {sorted(EVENT_KINDS)}, got {event.kind!r}"
                )
        if step is not None and step < 0:
            raise InvalidArgument.field("step", f"must be >= 0, got {step}")
        if worker_pid is not None and worker_pid < 0:
            raise InvalidArgument.field("worker_pid", f"must be >= 0, got {worker_pid}")
        if not events and step is None and worker_pid is None:  # the cancel poll, before every step: a read
            state, written = self.store.state(job_id), False
        else:
            state, written = self.store.record_report(job_id, batch, events, step, worker_pid, _ACTIVE)
        if state is None:
            raise NotFound(f"tuning job {job_id!r} not found", reason="TUNING_JOB_NOT_FOUND")
        return state, written

    def finish(self, job_id: str, finish: Finish) -> tuple[bool, JobState, str]:
        """Ends the job; (applied, its state now, the published adapter version or "")."""
        job = self.store.get(check_id(job_id, "job_id"))
        if job is None:
            raise NotFound(f"tuning job {job_id!r} not found", reason="TUNING_JOB_NOT_FOUND")
        published = ""
        if finish.outcome == JobState.SUCCEEDED:
            spec = job.spec
            if job.state != JobState.RUNNING:  # ended or cancelling: nothing is published, the staged folder stays
                return False, job.state, ""
            staged = staged_adapter_at(
                self.artifacts, spec.adapter_id, job_id, finish.staged_adapter_path, self.max_lora_rank
            )
            fields = {k: v for k, v in finish.result.items() if k != "adapter_version"}
            try:
                JobResult.from_dict({"adapter_version": "", **fields})
            except (TypeError, ValueError) as exc:
                raise InvalidArgument.field("result_json", f"not a job result: {exc}") from exc

            def publish(db) -> JobResult:
                nonlocal published
                version = staged.publish(db, finish.adapter_metadata)
                published = f"adapters/{spec.adapter_id}/versions/{version.version}"
                return JobResult.from_dict({**fields, "adapter_version": published})

            applied = self.store.transition(
                job_id, [JobState.RUNNING], JobState.SUCCEEDED, finish.message, result=publish
            )
        elif finish.outcome == JobState.FAILED:
            if not finish.error_code:
                raise InvalidArgument.field("error_code", "a FAILED outcome needs its error code")
            applied = self.store.transition(
                job_id,
                _ACTIVE,
                JobState.FAILED,
                finish.message or finish.error_message,
                error_code=finish.error_code,
                error_message=finish.error_message,
            )
        elif finish.outcome == JobState.CANCELLED:
            applied = self.store.transition(job_id, [JobState.CANCELLING], JobState.CANCELLED, finish.message)
        else:
            raise InvalidArgument.field(
                "outcome", f"must be SUCCEEDED, FAILED or CANCELLED, got {finish.outcome.value}"
            )
        return applied, self.store.state(job_id) or job.state, published

    def _recorded_steps(self, job_id: str) -> dict[str, int]:
        highest: dict[str, int] = {}
        after = 0
        while batch := self.store.events_after(job_id, after):
            for event in batch:
                step = event.payload.get("step")
                if event.kind in ("step", "eval", "checkpoint") and isinstance(step, int):
                    highest[event.kind] = max(highest.get(event.kind, -1), step)
            after = batch[-1].sequence
        return highest


def parse_json_object(data: bytes, field_name: str) -> dict[str, Any]:
    """A JSON object sent as bytes; InvalidArgument naming the field otherwise."""
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument.field(field_name, f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument.field(field_name, f"must be a JSON object, got {type(value).__name__}")
    return value
