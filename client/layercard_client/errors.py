"""The exceptions the client raises: one class per gRPC status code under ``LayercardClientError``.

Every failed RPC surfaces as a subclass of ``LayercardClientError``, raised ``from`` the original
``grpc.RpcError`` so the transport error stays in the traceback. The server's rich status
(``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer) is parsed once here, so callers read
``reason``, ``field_violations`` or ``retry_after`` as attributes instead of decoding protobuf ``Any``s::

    LayercardClientError            any failed RPC: code, message, reason, domain, metadata, ...
    ├── Cancelled                   CANCELLED
    ├── Unknown                     UNKNOWN
    ├── InvalidArgument             INVALID_ARGUMENT (field_violations says which fields)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED
    ├── NotFound                    NOT_FOUND
    ├── AlreadyExists               ALREADY_EXISTS
    ├── PermissionDenied            PERMISSION_DENIED
    ├── ResourceExhausted           RESOURCE_EXHAUSTED (retry_after when the server knows)
    ├── FailedPrecondition          FAILED_PRECONDITION
    ├── Aborted                     ABORTED
    ├── OutOfRange                  OUT_OF_RANGE
    ├── Unimplemented               UNIMPLEMENTED
    ├── Internal                    INTERNAL (a server bug; the message names an incident id)
    ├── Unavailable                 UNAVAILABLE (after the client's own retries, when the method has them)
    ├── DataLoss                    DATA_LOSS
    └── Unauthenticated             UNAUTHENTICATED
    ClientConfigError (ValueError)  bad client settings, raised before any RPC is made

``ClientConfigError`` is deliberately not a ``LayercardClientError``: it is a programming or deployment
mistake on the caller's side (an unreadable CA file), not an answer from the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ClientConfigError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "LayercardClientError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]

# The ErrorInfo domain the layercard server stamps on its errors; others (e.g. from a proxy) may differ.
ERROR_DOMAIN = "layercard.dev"


class ClientConfigError(ValueError):
    """The client was configured wrongly (missing CA file, key without certificate, bad address)."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field, from ``google.rpc.BadRequest``: ``field`` is a dotted path such as ``dataset.path``."""

    field: str
    description: str


class LayercardClientError(Exception):
    """A failed RPC, with the server's rich status unpacked.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the status message, meant for people.
        reason: ``ErrorInfo.reason``, a stable UPPER_SNAKE identifier to branch on in code ("" when absent).
        domain: ``ErrorInfo.domain`` ("layercard.dev" for the service's own errors).
        metadata: ``ErrorInfo.metadata``: key/value context such as the missing capability or resource.
        field_violations: ``BadRequest.field_violations``: which request fields were wrong and why.
        retry_after: seconds from ``RetryInfo`` before a retry may succeed, or None.
        status: the whole ``google.rpc.Status`` when the server sent one, for detail types not unpacked here.
        method: the full gRPC method name, when known.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
        status: status_pb2.Status | None = None,
        method: str = "",
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_after = retry_after
        self.status = status
        self.method = method

    @property
    def code_name(self) -> str:
        """The code as the proto enum spells it, e.g. ``"NOT_FOUND"``."""
        return self.code.name

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for violation in self.field_violations:
            text += f"\n  {violation.field}: {violation.description}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, in the camelCase the protobuf JSON mapping uses, for ``--json`` error output."""
        out: dict[str, Any] = {"code": self.code.name, "message": self.message}
        if self.reason:
            out["reason"] = self.reason
        if self.domain:
            out["domain"] = self.domain
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.field_violations:
            out["fieldViolations"] = [{"field": v.field, "description": v.description} for v in self.field_violations]
        if self.retry_after is not None:
            out["retryAfterSeconds"] = self.retry_after
        if self.method:
            out["method"] = self.method
        return out


class Cancelled(LayercardClientError):
    code = grpc.StatusCode.CANCELLED


class Unknown(LayercardClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LayercardClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LayercardClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LayercardClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LayercardClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LayercardClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LayercardClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LayercardClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LayercardClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(LayercardClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LayercardClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LayercardClientError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LayercardClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(LayercardClientError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LayercardClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[LayercardClientError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` of a failed call, or None when there is none or it cannot be trusted."""
    if not callable(getattr(exc, "trailing_metadata", None)):
        return None  # e.g. an RpcError raised by an interceptor without a call behind it
    try:
        return rpc_status.from_call(exc)
    except (ValueError, pb_message.DecodeError):
        # A status trailer that contradicts the call's code/message (or does not parse) came from something
        # other than the service, e.g. a proxy; the plain code and message are still right.
        return None


def _unpack(status: status_pb2.Status) -> dict[str, Any]:
    """Pulls the detail types the service sends out of their ``Any`` wrappers; unknown types are skipped."""
    found: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            found.setdefault("reason", info.reason)
            found.setdefault("domain", info.domain)
            found.setdefault("metadata", dict(info.metadata))
        elif detail.Is(bad.DESCRIPTOR) and detail.Unpack(bad):
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
            found.setdefault("retry_after", retry.retry_delay.ToNanoseconds() / 1e9)
    if violations:
        found["field_violations"] = tuple(violations)
    return found


def from_rpc_error(exc: grpc.RpcError, method: str = "") -> LayercardClientError:
    """Builds the matching ``LayercardClientError`` subclass from a failed call (sync or ``grpc.aio``).

    The caller raises it ``from exc``; this function only translates, so it is safe to use in ``except``
    blocks of both clients.
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = exc.details() if callable(getattr(exc, "details", None)) else None
    status = _rich_status(exc)
    fields = _unpack(status) if status is not None else {}
    cls = _BY_CODE.get(code, LayercardClientError)
    return cls(message or code.name.lower().replace("_", " "), code=code, status=status, method=method, **fields)
