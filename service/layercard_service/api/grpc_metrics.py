"""gRPC server metrics for ``grpc.aio`` with the names, labels and values of go-grpc-prometheus.

Fleet dashboards and alert rules written for Go services (go-grpc-prometheus, the de facto standard) work
unchanged on this service:

- ``grpc_server_started_total``       RPCs whose handler started
- ``grpc_server_handled_total``       RPCs finished, with ``grpc_code`` (``OK``, ``NotFound``, ``Canceled`` ...)
- ``grpc_server_msg_received_total``  request messages received (1 per unary request)
- ``grpc_server_msg_sent_total``      response messages sent (1 per successful unary RPC, 1 per stream message)
- ``grpc_server_handling_seconds``    histogram of handler time, Go's default buckets (no ``grpc_code``)

All carry ``grpc_type`` (unary, client_stream, server_stream, bidi_stream), ``grpc_service`` (the full service
name, ``layercard.v1.TuningService``) and ``grpc_method`` (``GetTuningJob``). ``grpc_code`` is the code as
grpc-go's ``codes.Code.String()`` spells it, which is what go-grpc-prometheus writes: CamelCase, and
``Canceled`` with one L. ``GO_CODE_NAMES`` holds the mapping from ``grpc.StatusCode``.

Where it sits in the chain: **outermost**, the first element of ``grpc.aio.server(interceptors=[...])``
(grpc.aio runs the list in order, so the first wraps all the others):

    interceptors = [GrpcMetricsInterceptor(registry), AuthInterceptor(token), ErrorInterceptor()]

- It must be outside ``ErrorInterceptor``: only there has a domain error already become
  ``context.abort_with_status`` (an ``AbortError`` with ``context.code()`` set). Inside it, a ``NotFound``
  would pass by as a plain exception and be counted as ``Unknown``.
- Outside ``AuthInterceptor`` too, as go-grpc-prometheus is conventionally first in Go chains: RPCs refused
  for a missing or bad token are counted as ``Unauthenticated``, which is what an alert on auth failures needs;
  inside auth they would not be counted at all. Health checks and reflection are counted like any RPC.
- The handling time then covers the other interceptors' work, as the caller sees it.

How the final code is found: a handler that returns is ``context.code()`` or ``OK``; an ``AbortError`` (abort,
abort_with_status) is the code the abort set; a client's cancellation reaches the handler as
``asyncio.CancelledError`` and counts as ``Canceled`` (``DeadlineExceeded`` when the deadline has passed); any
other exception is what grpc.aio will send for it: ``Unknown``, or the code set with ``set_code`` first.
RPCs that never reach a handler (unknown method, a client that cancels before its request arrives) are not
counted, as in Go. Streaming responses are written by the wrapper with ``context.write`` (the handler's kind
stays a stream; an async generator becomes a coroutine that writes), so each message is counted once it is
actually sent, and a cancelled stream is seen at once rather than when its generator is garbage-collected.
Synchronous (thread-pool) handlers are passed through uncounted; every handler in this service is async.

What it costs: the counts are plain integers of a per-method record, bumped on the event loop's thread (every
counted handler runs there), and exported by a collector at scrape time, so an RPC pays for a few additions and
a bisect, not for prometheus_client's locks and label lookups. A scrape reads a count between two additions:
each figure is exact, and a histogram's count is its buckets' sum. The counting wrapper of a method's handler is
built once and reused while the chain below hands out the same handler (``bench/results/metrics.md``).

One interceptor per registry: it registers one collector of the five metrics on the registry it is given.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["GO_CODE_NAMES", "GO_DEFAULT_BUCKETS", "GrpcMetricsInterceptor", "split_method"]

# grpc-go's codes.Code.String(), which go-grpc-prometheus writes as grpc_code.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# client_golang's prometheus.DefBuckets (prometheus_client's default adds .075, .75 and 7.5).
GO_DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_DEADLINE_SLACK_SECONDS = 0.05


def split_method(full_method: str) -> tuple[str, str]:
    """``/layercard.v1.TuningService/GetTuningJob`` -> (service, method), like go-grpc-prometheus."""
    name = full_method.removeprefix("/")
    service, sep, method = name.partition("/")
    return (service, method) if sep else ("unknown", "unknown")


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _is_async(behavior) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _failure_code(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status grpc.aio sends for an RPC whose handler raised ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        # The client went away, or its deadline passed (then grpc core cancels the call too). Core's timer can
        # fire a few ms before time_remaining(), on the wall clock, reaches 0: hence the slack.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(exc, grpc.aio.AbortError):
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    # An unexpected exception: grpc.aio sends UNKNOWN unless the handler had set another code first.
    return code if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class _MethodMetrics:
    """One method's counts, bumped on the event loop's thread and read by ``_Collector`` at scrape time."""

    __slots__ = (
        "asynchronous",
        "buckets",
        "handled",
        "inner",
        "labels",
        "received",
        "sent",
        "started",
        "sum",
        "wrapped",
    )

    def __init__(self, labels: tuple[str, str, str], asynchronous: bool) -> None:
        self.labels, self.asynchronous = labels, asynchronous
        # The handler the chain below returned last time, and its counted wrapping: grpc hands out the same
        # handler object per method, so most calls build nothing.
        self.inner: grpc.RpcMethodHandler | None = None
        self.wrapped: grpc.RpcMethodHandler | None = None
        self.started = self.received = self.sent = 0
        self.handled: dict[str, int] = {}  # grpc_code -> RPCs
        self.buckets = [0] * (len(GO_DEFAULT_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def finish(self, code: grpc.StatusCode, started_at: float) -> None:
        elapsed = time.perf_counter() - started_at
        name = GO_CODE_NAMES.get(code, "Unknown")
        self.handled[name] = self.handled.get(name, 0) + 1
        self.buckets[bisect.bisect_left(GO_DEFAULT_BUCKETS, elapsed)] += 1  # le is inclusive: first bound >= elapsed
        self.sum += elapsed


_HELP = {
    "started": "Total number of RPCs started on the server.",
    "handled": "Total number of RPCs completed on the server, regardless of success or failure.",
    "received": "Total number of RPC stream messages received on the server.",
    "sent": "Total number of gRPC stream messages sent by the server.",
    "seconds": "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
}
_BOUNDS = (*(floatToGoString(b) for b in GO_DEFAULT_BUCKETS), "+Inf")


class _Collector(Collector):
    """The five go-grpc-prometheus metrics, built from the per-method counts when Prometheus scrapes."""

    def __init__(self, methods: dict) -> None:
        self._methods = methods

    def describe(self):
        return self._families()

    def _families(self):
        return (
            CounterMetricFamily("grpc_server_started", _HELP["started"], labels=_LABELS),
            CounterMetricFamily("grpc_server_handled", _HELP["handled"], labels=(*_LABELS, "grpc_code")),
            CounterMetricFamily("grpc_server_msg_received", _HELP["received"], labels=_LABELS),
            CounterMetricFamily("grpc_server_msg_sent", _HELP["sent"], labels=_LABELS),
            HistogramMetricFamily("grpc_server_handling_seconds", _HELP["seconds"], labels=_LABELS),
        )

    def collect(self):
        started, handled, received, sent, seconds = families = self._families()
        for m in list(self._methods.values()):  # one C-level copy: the loop thread may add a method meanwhile
            started.add_metric(m.labels, m.started)
            received.add_metric(m.labels, m.received)
            sent.add_metric(m.labels, m.sent)
            for code, count in list(m.handled.items()):
                handled.add_metric((*m.labels, code), count)
            counts, total = list(m.buckets), m.sum
            seconds.add_metric(m.labels, list(zip(_BOUNDS, itertools.accumulate(counts))), total)
        return families


class _CountingContext:
    """The servicer context, counting the messages a streaming handler writes or reads itself."""

    __slots__ = ("_context", "_metrics")

    def __init__(self, context: grpc.aio.ServicerContext, metrics: _MethodMetrics) -> None:
        self._context = context
        self._metrics = metrics

    async def write(self, message) -> None:
        await self._context.write(message)
        self._metrics.sent += 1

    async def read(self):
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._metrics.received += 1
        return message

    def __getattr__(self, name: str):
        return getattr(self._context, name)


async def _counted_requests(requests, metrics: _MethodMetrics):
    async for request in requests:
        metrics.received += 1
        yield request


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC, its messages and its final status code; times its handler. See the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[tuple[str, str], _MethodMetrics] = {}
        registry.register(_Collector(self._methods))

    def _metrics_for(self, full_method: str, handler: grpc.RpcMethodHandler) -> _MethodMetrics:
        grpc_type = _grpc_type(handler)
        key = (full_method, grpc_type)
        metrics = self._methods.get(key)
        if metrics is None:
            behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
            # A method's handler kind never changes: whether it is async is decided once, on its first call.
            metrics = self._methods[key] = _MethodMetrics((grpc_type, *split_method(full_method)), _is_async(behavior))
        return metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc.aio answers UNIMPLEMENTED; go-grpc-prometheus counts nothing either
        metrics = self._metrics_for(handler_call_details.method, handler)
        if not metrics.asynchronous:
            return handler  # a synchronous handler runs in grpc's thread pool: not counted
        if metrics.inner is not handler:
            metrics.inner, metrics.wrapped = handler, _counted(handler, metrics)
        return metrics.wrapped


def _counted(handler: grpc.RpcMethodHandler, metrics: _MethodMetrics) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_observe_unary(handler.unary_unary, metrics, False), **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_observe_unary(handler.stream_unary, metrics, True), **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_observe_stream(handler.unary_stream, metrics, False), **kw)
    return grpc.stream_stream_rpc_method_handler(_observe_stream(handler.stream_stream, metrics, True), **kw)


def _observe_unary(behavior, metrics: _MethodMetrics, request_streaming: bool):
    """A handler with one response: the request (or each streamed one) received, the response sent if OK."""

    async def observed(request, context):
        started_at = time.perf_counter()
        metrics.started += 1
        if request_streaming:
            request, context = _counted_requests(request, metrics), _CountingContext(context, metrics)
        else:
            metrics.received += 1
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            metrics.finish(_failure_code(exc, context), started_at)
            raise
        code = _final_code(context)
        metrics.finish(code, started_at)
        if code is grpc.StatusCode.OK:
            metrics.sent += 1
        return response

    return observed


def _observe_stream(behavior, metrics: _MethodMetrics, request_streaming: bool):
    """A streaming handler, rebuilt as a coroutine that writes (and counts) each response it yields."""

    async def observed(request, context):
        started_at = time.perf_counter()
        metrics.started += 1
        if request_streaming:
            request = _counted_requests(request, metrics)
        else:
            metrics.received += 1
        counting = _CountingContext(context, metrics)
        try:
            if inspect.isasyncgenfunction(behavior):
                # aclosing: on cancellation the handler's generator is closed now, its finally blocks run now.
                async with contextlib.aclosing(behavior(request, counting)) as responses:
                    async for response in responses:
                        await context.write(response)
                        metrics.sent += 1
            else:
                await behavior(request, counting)  # streams with context.write() itself (the health Watch does)
        except BaseException as exc:
            metrics.finish(_failure_code(exc, context), started_at)
            raise
        metrics.finish(_final_code(context), started_at)

    return observed
