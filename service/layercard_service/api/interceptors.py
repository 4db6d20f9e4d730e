"""Server interceptors for ``grpc.aio``: bearer-token auth and the one place domain errors become statuses.

Both wrap the method handler of the called RPC, keeping its kind (unary or server-streaming), so they work
for streams too. The error interceptor is the only code that knows how a ``LayercardError`` maps to a
``google.rpc.Status`` with details; handlers and the core just raise.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from layercard_service.errors import LayercardError, Unauthenticated

__all__ = ["ERROR_DOMAIN", "AuthInterceptor", "ErrorInterceptor", "to_grpc_status"]

log = logging.getLogger(__name__)

ERROR_DOMAIN = "layercard.dev"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The workers' internal API authenticates each call with its job's credential (api/worker.py), not this token.
INTERNAL_PREFIX = "/layercard.internal.v1."


# Errors echo what the caller sent (a name, a path); clipped so that the status always fits the trailers a
# client accepts (gRPC's default hard limit is 16 KiB of metadata, and non-ASCII text is %-encoded there).
MAX_MESSAGE_BYTES = 1000
MAX_DETAIL_BYTES = 300
MAX_VIOLATIONS = 5
# An infeasible plan's error carries up to 13 (the cheapest plan's figures and the limits it violates); 16 entries
# of at most 64 + 300 bytes stay well inside the trailers.
MAX_METADATA_ENTRIES = 16


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (at a character boundary), marked when cut."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def to_grpc_status(err: LayercardError) -> grpc.Status:
    """Maps a domain error to a status with ErrorInfo, and BadRequest/RetryInfo details when it has them."""
    code = getattr(code_pb2, err.code_name)
    details = []
    metadata = {
        clip(k, 64): clip(str(v), MAX_DETAIL_BYTES) for k, v in list(err.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=clip(err.reason, 64), domain=ERROR_DOMAIN, metadata=metadata)
    details.append(info)
    if err.violations:
        shown = err.violations[:MAX_VIOLATIONS]
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=clip(v.field, MAX_DETAIL_BYTES), description=clip(v.description, MAX_DETAIL_BYTES)
                )
                for v in shown
            ]
        )
        if len(err.violations) > len(shown):
            more = len(err.violations) - len(shown)
            bad.field_violations.add(field="...", description=f"and {more} more")
        details.append(bad)
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code, message=clip(err.message, MAX_MESSAGE_BYTES))
    for detail in details:
        status.details.add().Pack(detail)
    grpc_status = rpc_status.to_status(status)
    if err.retry_after is not None:
        # gRPC's own retry policy reads only this trailer, not RetryInfo: send both so clients that retry
        # automatically also wait as long as the server asks.
        pushback = (("grpc-retry-pushback-ms", str(int(err.retry_after * 1000))),)
        grpc_status = grpc_status._replace(trailing_metadata=grpc_status.trailing_metadata + pushback)
    return grpc_status


def _internal_status(incident: str) -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (incident {incident})")
    return rpc_status.to_status(status)


def _wrap(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """Returns ``handler`` with its behaviour wrapped; client-streaming kinds pass through (the API has none)."""
    if handler is None:
        return None
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kw)
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ``LayercardError`` into its status with details, and anything unexpected into a generic INTERNAL."""

    def __init__(self) -> None:
        # Per method, the handler the chain returned last and its guarded wrapping: grpc hands out the same
        # handler object per method, so most calls build nothing.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard(method, handler)
        if handler is not None:
            self._guarded[method] = (handler, guarded)
        return guarded


def _guard(method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """``handler`` with every exception it raises turned into a status."""

    async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, LayercardError):
            log.info("rpc failed", extra={"method": method, "code": exc.code_name, "reason": exc.reason})
            await context.abort_with_status(to_grpc_status(exc))
        incident = uuid.uuid4().hex[:12]
        log.exception("rpc raised an unexpected error", extra={"method": method, "incident": incident})
        await context.abort_with_status(_internal_status(incident))

    def wrap_unary(behavior):
        async def guarded(request, context):
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc)

        return guarded

    def wrap_stream(behavior):
        if not inspect.isasyncgenfunction(behavior):
            # A coroutine that streams with context.write() (the health Watch does): guard it as unary.
            return wrap_unary(behavior)

        async def guarded(request, context):
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc)

        return guarded

    return _wrap(handler, wrap_unary, wrap_stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks (probes carry no secrets).

    The workers' internal services are left to their own per-job credential: this token neither opens them
    nor is needed for them.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata) -> bool:
        presented = next((value for key, value in metadata or () if key == "authorization"), None)
        if presented is None:
            return False
        if isinstance(presented, str):
            presented = presented.encode()
        return hmac.compare_digest(presented, self._expected)  # constant time: no timing oracle on the token

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith((HEALTH_PREFIX, INTERNAL_PREFIX)):
            return await continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        has_header = any(k == "authorization" for k, _ in handler_call_details.invocation_metadata or ())
        err = Unauthenticated(
            "invalid bearer token" if has_header else "missing metadata 'authorization: Bearer <token>'",
            reason="INVALID_TOKEN" if has_header else "MISSING_TOKEN",
        )
        status = to_grpc_status(err)

        def deny_unary(_behavior):
            async def deny(request, context):
                await context.abort_with_status(status)

            return deny

        def deny_stream(_behavior):
            async def deny(request, context):
                await context.abort_with_status(status)
                yield  # pragma: no cover - makes this an async generator, as a stream handler must be

            return deny

        if handler is not None and (handler.stream_stream is not None or handler.stream_unary is not None):
            # Client-streaming kinds (server reflection) are refused too: nothing but health goes without a token.
            kw = dict(
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
            if handler.stream_unary is not None:
                return grpc.stream_unary_rpc_method_handler(deny_unary(None), **kw)
            return grpc.stream_stream_rpc_method_handler(deny_stream(None), **kw)
        return _wrap(handler, deny_unary, deny_stream)
