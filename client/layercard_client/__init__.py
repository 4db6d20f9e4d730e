"""Client of the layercard service: a typed sync and async client over gRPC, and the ``layercard`` CLI.

Light on purpose (grpcio, protobuf, rich; never torch), so other services can depend on it.

    from layercard_client import LayercardClient, NotFound

    with LayercardClient("layercard:50051", token=os.environ["LAYERCARD_TOKEN"]) as client:
        try:
            card = client.get_layer_card("layerCards/abc")
        except NotFound:
            ...
"""

from __future__ import annotations

from layercard_client.aio import AsyncLayercardClient, AsyncResponseStream
from layercard_client.channel import DEFAULT, DEFAULT_ADDRESS, IDEMPOTENT_METHODS, ClientSettings, RetryPolicy
from layercard_client.client import LayercardClient, ResponseStream
from layercard_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ClientConfigError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    LayercardClientError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_ADDRESS",
    "IDEMPOTENT_METHODS",
    "Aborted",
    "AlreadyExists",
    "AsyncLayercardClient",
    "AsyncResponseStream",
    "Cancelled",
    "ClientConfigError",
    "ClientSettings",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "LayercardClient",
    "LayercardClientError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseStream",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
]
