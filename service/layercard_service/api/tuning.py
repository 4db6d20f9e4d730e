"""TuningService: proto <-> domain conversion only."""

from __future__ import annotations

from layercard.v1 import tuning_pb2_grpc
from layercard_service.api.pending import not_built

__all__ = ["TuningServicer"]

_CAPABILITY = "the tuning job runner"


class TuningServicer(tuning_pb2_grpc.TuningServiceServicer):
    async def CreateTuningJob(self, request, context):
        raise not_built("CreateTuningJob", _CAPABILITY)

    async def GetTuningJob(self, request, context):
        raise not_built("GetTuningJob", _CAPABILITY)

    async def ListTuningJobs(self, request, context):
        raise not_built("ListTuningJobs", _CAPABILITY)

    async def CancelTuningJob(self, request, context):
        raise not_built("CancelTuningJob", _CAPABILITY)

    async def WatchTuningJob(self, request, context):
        raise not_built("WatchTuningJob", _CAPABILITY)
        yield  # pragma: no cover
