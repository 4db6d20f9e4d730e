"""The worker's side of the service's internal API: it reads its job and reports through here, never the database.

``JobChannel`` is the seam: ``GrpcChannel`` calls the service's WorkerService with the attempt's credential;
``InProcessChannel`` calls ``WorkerReports`` directly (tests run the worker in-process on a real job store).
``Reporter`` sits on a channel and makes the service's outages survivable:
- step events are buffered and sent in numbered batches (at most ~5 a second); a batch that got no answer is
  sent again unchanged, with its number, so the service records it once (runners/worker_reports.py);
- while the service is unreachable (UNAVAILABLE, DEADLINE_EXCEEDED; CANCELLED from a service shutting down)
  training goes on and events wait in the buffer (bounded: a full buffer waits for the service); waits grow
  exponentially up to ``BACKOFF_MAX``;
- the cancel poll asks the service before every step (a cheap read there), and answers the last state the
  service sent while it is unreachable;
- unreachable for longer than ``lost_after`` seconds: ``ServiceLost``, and the worker exits EXIT_SERVICE_LOST
  (its job is resumed by the service's restart recovery, from its last checkpoint);
- a refused credential (a newer attempt holds the job): ``CredentialRefused``, the worker exits at once.
A full disk on the service's side comes back as ``ResourceExhausted(DISK_FULL)``, as the store would raise it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from layercard_service.domain.jobs import JobSpec, JobState
from layercard_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    LayercardError,
    NotFound,
    ResourceExhausted,
)
from layercard_service.persistence.jobs import NewEvent
from layercard_service.runners.worker_reports import MAX_BATCH_EVENTS, Finish, WorkerJob, WorkerReports

__all__ = [
    "CredentialRefused",
    "GrpcChannel",
    "InProcessChannel",
    "JobChannel",
    "Reporter",
    "ServiceLost",
    "Unreachable",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 10.0
DOWN_POLL_SECONDS = 1.0
BACKOFF_START, BACKOFF_MAX = 0.1, 5.0
MAX_BUFFERED_EVENTS = 100_000  # ~20 MB of step events: hours of training while the service is away


class Unreachable(Exception):
    """A call the service did not answer (down, restarting, overloaded): worth retrying."""


class ServiceLost(BaseException):
    """The service stayed unreachable past the bound. A BaseException: no ``except Exception`` fails the job."""


class CredentialRefused(BaseException):
    """The service refused this attempt's token: another attempt holds the job now, or it is gone."""


class JobChannel(Protocol):
    def get_job(self) -> WorkerJob: ...

    def report(self, batch: int, events: list[NewEvent], step: int | None, worker_pid: int | None) -> JobState: ...

    def finish(self, finish: Finish) -> tuple[bool, JobState, str]: ...

    def close(self) -> None: ...


class InProcessChannel:
    """The channel without the network: the service's domain object, called directly."""

    def __init__(self, reports: WorkerReports, job_id: str) -> None:
        self.reports, self.job_id = reports, job_id

    def get_job(self) -> WorkerJob:
        return self.reports.get_job(self.job_id)

    def report(self, batch: int, events: list[NewEvent], step: int | None, worker_pid: int | None) -> JobState:
        return self.reports.report(self.job_id, batch, events, step, worker_pid)[0]

    def finish(self, finish: Finish) -> tuple[bool, JobState, str]:
        return self.reports.finish(self.job_id, finish)

    def close(self) -> None:
        pass


class GrpcChannel:
    """The service's WorkerService over gRPC, every call carrying the attempt's credential."""

    def __init__(
        self, address: str, token: str, job_id: str, ca_file: Path | None = None, server_name: str = ""
    ) -> None:
        import grpc  # here, not at the top: the domain modules beside this one never import grpc

        from layercard.internal.v1 import worker_pb2, worker_pb2_grpc

        self._grpc, self._pb = grpc, worker_pb2
        options = [
            # Reconnect soon after a service restart; the Reporter's own backoff paces the calls.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if ca_file is not None:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.job_id = job_id

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        grpc = self._grpc
        try:
            return method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            code, message, reason = exc.code(), exc.details() or "", _reason(exc)
            # The worker never cancels its own calls: CANCELLED is a service stopping with this call in flight.
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise Unreachable(f"{code.name}: {message}") from exc
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise CredentialRefused(f"{code.name}: {message}") from exc
            kind = {
                grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,  # DISK_FULL: the service's disk is full
                grpc.StatusCode.NOT_FOUND: NotFound,
                grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
                grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
            }.get(code, LayercardError)
            raise kind(f"the service answered {code.name}: {message}", reason=reason or None) from exc

    def get_job(self) -> WorkerJob:
        answer = self._call(self._stub.GetJob, self._pb.GetJobRequest(job_id=self.job_id))
        return WorkerJob(
            spec=JobSpec.from_dict(json.loads(answer.spec_json)),
            state=_state(answer.state),
            total_steps=answer.total_steps,
            recorded_steps=dict(answer.recorded_steps),
        )

    def report(self, batch: int, events: list[NewEvent], step: int | None, worker_pid: int | None) -> JobState:
        request = self._pb.ReportProgressRequest(
            job_id=self.job_id,
            batch=batch,
            events=[
                self._pb.WorkerEvent(
                    kind=e.kind, payload_json=json.dumps(e.payload).encode(), message=e.message, time=e.time or 0.0
                )
                for e in events
            ],
            step=step,
            worker_pid=worker_pid or 0,
        )
        return _state(self._call(self._stub.ReportProgress, request).state)

    def finish(self, finish: Finish) -> tuple[bool, JobState, str]:
        from layercard.v1 import tuning_pb2

        request = self._pb.FinishJobRequest(
            job_id=self.job_id,
            outcome=tuning_pb2.TuningJobState.Value(f"TUNING_JOB_STATE_{finish.outcome.value}"),
            message=finish.message,
            error_code=finish.error_code,
            error_message=finish.error_message,
            staged_adapter_path=finish.staged_adapter_path,
            adapter_metadata_json=json.dumps(finish.adapter_metadata).encode(),
            result_json=json.dumps(finish.result).encode(),
        )
        answer = self._call(self._stub.FinishJob, request)
        return answer.applied, _state(answer.state), answer.adapter_version

    def close(self) -> None:
        self._channel.close()


def _state(value: int) -> JobState:
    from layercard.v1 import tuning_pb2

    return JobState(tuning_pb2.TuningJobState.Name(value).removeprefix("TUNING_JOB_STATE_"))


def _reason(exc: Any) -> str:
    """The ErrorInfo reason of a failed call's status details; "" when it has none."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(exc)
    except Exception:  # malformed details: the code alone decides
        return ""
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class Reporter:
    """Buffers, numbers and sends a worker's reports; survives the service's outages (see the module doc)."""

    def __init__(
        self,
        channel: JobChannel,
        *,
        interval: float = 0.2,
        lost_after: float = 300.0,
        max_buffered: int = MAX_BUFFERED_EVENTS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.channel, self.interval, self.lost_after, self.max_buffered = channel, interval, lost_after, max_buffered
        self._clock, self._sleep = clock, sleep
        self._buffer: list[NewEvent] = []
        self._step: int | None = None
        self._unacked: tuple[int, list[NewEvent], int | None] | None = None  # sent, no answer seen yet
        self._batches = 0
        self._state = JobState.RUNNING
        self._last = self._polled = clock()
        self._down_since: float | None = None

    # --- calls with retries -------------------------------------------------------------------------------
    def _call(self, what: str, call: Callable[[], T], wait: bool, within: float | None = None) -> T | None:
        """``call()``'s answer; None when the service is unreachable and ``wait`` is False (or ``within`` ran out).

        ServiceLost once the service has been unreachable for ``lost_after`` seconds.
        """
        delay, started = BACKOFF_START, self._clock()
        while True:
            try:
                answer = call()
            except Unreachable as exc:
                now = self._clock()
                if self._down_since is None:
                    self._down_since = now
                    log.warning("the service is unreachable (%s): %s; retrying with backoff", what, exc)
                if now - self._down_since >= self.lost_after:
                    raise ServiceLost(f"the service was unreachable for {now - self._down_since:.0f} s") from exc
                if not wait or (within is not None and now - started >= within):
                    return None
                self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            if self._down_since is not None:
                log.info("the service answers again (%s)", what)
                self._down_since = None
            return answer

    def get_job(self) -> WorkerJob:
        return self._call("get the job", self.channel.get_job, wait=True)

    def report_pid(self, pid: int) -> None:
        state = self._call("report the pid", lambda: self.channel.report(0, [], None, pid), wait=True)
        self._state = state

    def finish(self, finish: Finish) -> tuple[bool, JobState, str]:
        """Sends every buffered event, then the job's end (a retried end changes nothing: see reports.py)."""
        self.flush()
        return self._call("end the job", lambda: self.channel.finish(finish), wait=True)

    # --- events -------------------------------------------------------------------------------------------
    def add(self, event: NewEvent, step: int | None = None, urgent: bool = False) -> None:
        self._buffer.append(event)
        if step is not None:
            self._step = step
        if len(self._buffer) >= self.max_buffered:
            self.flush()  # bounded: a full buffer waits for the service (or for ServiceLost)
        elif urgent or self._clock() - self._last >= self.interval:
            self.flush(wait=False)

    def unreported(self) -> list[NewEvent]:
        """The events the service has not acknowledged yet, oldest first (kept with each checkpoint)."""
        return [*(self._unacked[1] if self._unacked else []), *self._buffer]

    @property
    def pending(self) -> int:
        """Events not yet recorded by the service."""
        return len(self._buffer) + (len(self._unacked[1]) if self._unacked else 0)

    def flush(self, wait: bool = True, within: float | None = None) -> bool:
        """Sends what is buffered; True when all of it was recorded (False: unreachable and not waiting)."""
        self._last = self._clock()
        while self._unacked is not None or self._buffer or self._step is not None:
            if self._unacked is None:
                events, self._buffer = self._buffer[:MAX_BATCH_EVENTS], self._buffer[MAX_BATCH_EVENTS:]
                if events:
                    self._batches += 1
                self._unacked = (self._batches if events else 0, events, self._step)
                if not self._buffer:
                    self._step = None
            batch, events, step = self._unacked

            def send(batch: int = batch, events: list[NewEvent] = events, step: int | None = step) -> JobState:
                return self.channel.report(batch, events, step, None)

            state = self._call("report progress", send, wait, within)
            if state is None:
                return False
            self._state, self._unacked = state, None
        return True

    def state(self) -> JobState:
        """The job's state, asked before every step (the cancel poll: a read on the service's side, no write).

        While the service is unreachable: the last state it sent, asked again at most every ``DOWN_POLL_SECONDS``.
        """
        now = self._clock()
        if self._down_since is not None and now - self._polled < DOWN_POLL_SECONDS:
            return self._state
        self._polled = now
        state = self._call("poll the state", lambda: self.channel.report(0, [], None, None), wait=False)
        if state is not None:
            self._state = state
        return self._state
