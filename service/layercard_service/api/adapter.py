"""AdapterService: proto <-> domain conversion only."""

from __future__ import annotations

from layercard.v1 import adapter_pb2_grpc
from layercard_service.api.pending import not_built

__all__ = ["AdapterServicer"]

_CAPABILITY = "vLLM hot-loading (the fleet)"


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    async def DeployAdapter(self, request, context):
        raise not_built("DeployAdapter", _CAPABILITY)

    async def UndeployAdapter(self, request, context):
        raise not_built("UndeployAdapter", _CAPABILITY)

    async def ListAdapters(self, request, context):
        raise not_built("ListAdapters", _CAPABILITY)
