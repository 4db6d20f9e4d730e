"""InferenceService: proto <-> domain conversion only."""

from __future__ import annotations

from layercard.v1 import inference_pb2_grpc
from layercard_service.api.pending import not_built

__all__ = ["InferenceServicer"]

_CAPABILITY = "the inference proxy to vLLM"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request, context):
        raise not_built("Generate", _CAPABILITY)

    async def GenerateStream(self, request, context):
        raise not_built("GenerateStream", _CAPABILITY)
        yield  # pragma: no cover
