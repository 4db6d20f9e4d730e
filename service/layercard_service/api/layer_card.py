"""LayerCardService: proto <-> domain conversion only."""

from __future__ import annotations

from layercard.v1 import layer_card_pb2_grpc
from layercard_service.api.pending import not_built

__all__ = ["LayerCardServicer"]

_CAPABILITY = "the Layer Card engine"


class LayerCardServicer(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def ComputeLayerCard(self, request, context):
        raise not_built("ComputeLayerCard", _CAPABILITY)
        yield  # pragma: no cover - a server-streaming handler is an async generator

    async def GetLayerCard(self, request, context):
        raise not_built("GetLayerCard", _CAPABILITY)

    async def ListLayerCards(self, request, context):
        raise not_built("ListLayerCards", _CAPABILITY)
