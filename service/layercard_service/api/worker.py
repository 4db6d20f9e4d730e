"""The internal ``layercard.internal.v1.WorkerService``: tuning workers read their job and report through it.

A thin edge over ``tune.reports.WorkerReports``: every call first checks the job attempt's credential (metadata
``authorization: Bearer <worker token>``), then converts. The public API's bearer token is not checked here
(api/interceptors.py lets these methods through), and a worker token opens nothing else.
"""

from __future__ import annotations

import asyncio
import json

import grpc

from layercard.internal.v1 import worker_pb2, worker_pb2_grpc
from layercard.v1 import tuning_pb2
from layercard_service.domain.jobs import JobState
from layercard_service.errors import InvalidArgument
from layercard_service.persistence.jobs import NewEvent
from layercard_service.runners.worker_reports import Finish, WorkerReports, parse_json_object

__all__ = ["WORKER_SERVICE_NAME", "WorkerServicer"]

WORKER_SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
_PREFIX = "TUNING_JOB_STATE_"


def _state(state: JobState) -> int:
    return tuning_pb2.TuningJobState.Value(_PREFIX + state.value)


def _outcome(value: int) -> JobState:
    name = tuning_pb2.TuningJobState.Name(value) if value in tuning_pb2.TuningJobState.values() else ""
    state = JobState.__members__.get(name.removeprefix(_PREFIX))
    if state is None or not state.ended:
        raise InvalidArgument.field("outcome", f"must be SUCCEEDED, FAILED or CANCELLED, got {name or value}")
    return state


def _token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, reports: WorkerReports) -> None:
        self.reports = reports

    async def _authenticate(self, job_id: str, context: grpc.aio.ServicerContext) -> None:
        await asyncio.to_thread(self.reports.authenticate, job_id, _token(context))

    async def GetJob(self, request, context):
        await self._authenticate(request.job_id, context)
        job = await asyncio.to_thread(self.reports.get_job, request.job_id)
        return worker_pb2.GetJobResponse(
            spec_json=json.dumps(job.spec.to_dict()).encode(),
            state=_state(job.state),
            total_steps=job.total_steps,
            recorded_steps=job.recorded_steps,
        )

    async def ReportProgress(self, request, context):
        await self._authenticate(request.job_id, context)
        events = [
            NewEvent(e.kind, parse_json_object(e.payload_json, f"events[{i}].payload_json"), e.message, e.time or None)
            for i, e in enumerate(request.events)
        ]
        step = request.step if request.HasField("step") else None
        state, recorded = await asyncio.to_thread(
            self.reports.report, request.job_id, request.batch, events, step, request.worker_pid or None
        )
        return worker_pb2.ReportProgressResponse(state=_state(state), recorded=recorded)

    async def FinishJob(self, request, context):
        await self._authenticate(request.job_id, context)
        finish = Finish(
            outcome=_outcome(request.outcome),
            message=request.message,
            error_code=request.error_code,
            error_message=request.error_message,
            staged_adapter_path=request.staged_adapter_path,
            adapter_metadata=parse_json_object(request.adapter_metadata_json, "adapter_metadata_json"),
            result=parse_json_object(request.result_json, "result_json"),
        )
        applied, state, version = await asyncio.to_thread(self.reports.finish, request.job_id, finish)
        return worker_pb2.FinishJobResponse(applied=applied, state=_state(state), adapter_version=version)
