"""The service's exception tree.

Domain code raises these; one gRPC interceptor (``api/interceptors.py``) turns each into its status code
with ``google.rpc.Status`` details. Third-party errors are re-raised as one of these with ``raise ... from exc``.
Anything else that escapes a handler is a bug and becomes INTERNAL with a generic message.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "LayercardError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: ``field`` is a dotted path (``dataset.path``, ``line 3: completion``)."""

    field: str
    description: str


class LayercardError(Exception):
    """Base of every error the service reports to its callers.

    ``reason`` is a stable UPPER_SNAKE identifier for machines (google.rpc.ErrorInfo.reason);
    ``metadata`` adds key/value context; ``violations`` names bad request fields (google.rpc.BadRequest);
    ``retry_after`` (seconds) tells clients when a retry may succeed (google.rpc.RetryInfo).
    """

    code_name = "UNKNOWN"  # a grpc.StatusCode member name; kept a string so the core never imports grpc
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])
        self.retry_after = retry_after


class InvalidArgument(LayercardError):
    code_name = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, name: str, description: str, **kwargs) -> InvalidArgument:
        """The common case: one bad field, described once for the message and the details."""
        return cls(f"{name}: {description}", violations=[FieldViolation(name, description)], **kwargs)


class NotFound(LayercardError):
    code_name = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(LayercardError):
    code_name = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LayercardError):
    code_name = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(LayercardError):
    code_name = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(LayercardError):
    code_name = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(LayercardError):
    code_name = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class PermissionDenied(LayercardError):
    code_name = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(LayercardError):
    code_name = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class Unimplemented(LayercardError):
    code_name = "UNIMPLEMENTED"
    default_reason = "NOT_IMPLEMENTED_YET"


class Cancelled(LayercardError):
    code_name = "CANCELLED"
    default_reason = "CANCELLED"
