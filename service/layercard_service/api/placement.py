"""PlacementService: proto <-> domain conversion only."""

from __future__ import annotations

from layercard.v1 import placement_pb2_grpc
from layercard_service.api.pending import not_built

__all__ = ["PlacementServicer"]


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    async def PlanPlacement(self, request, context):
        raise not_built("PlanPlacement", "the placement planner")
