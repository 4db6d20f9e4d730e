"""The gRPC metrics interceptor on a real grpc.aio server (loopback, port 0), in the chain server.py builds.

The chain is metrics (outermost), auth, errors, as the interceptor's docstring asks. A small tuning servicer
raises domain errors for the error interceptor to map; health and reflection are the standard services.
Values are read back from the registry the interceptor was given.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from layercard.v1 import tuning_pb2, tuning_pb2_grpc
from layercard_service.api.grpc_metrics import GO_DEFAULT_BUCKETS, GrpcMetricsInterceptor, split_method
from layercard_service.api.interceptors import AuthInterceptor, ErrorInterceptor
from layercard_service.errors import NotFound

TOKEN = "metrics-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TUNING = "layercard.v1.TuningService"
HEALTH = "grpc.health.v1.Health"
STREAMED = 5


class FakeTuning(tuning_pb2_grpc.TuningServiceServicer):
    """GetTuningJob: found or NotFound; WatchTuningJob: STREAMED events, or one and then waits forever."""

    def __init__(self) -> None:
        self.watch_closed = asyncio.Event()

    async def GetTuningJob(self, request, context):
        if request.name == "tuningJobs/missing":
            raise NotFound("tuning job 'missing' not found")
        return tuning_pb2.TuningJob(name=request.name)

    async def ListTuningJobs(self, request, context):
        raise RuntimeError("a bug")  # the error interceptor answers INTERNAL

    async def CancelTuningJob(self, request, context):
        await asyncio.sleep(30)  # longer than the caller's deadline
        return tuning_pb2.TuningJob(name=request.name)

    async def WatchTuningJob(self, request, context):
        try:
            if request.name == "tuningJobs/forever":
                yield tuning_pb2.TuningJobEvent(sequence=1)
                await asyncio.Event().wait()
            if request.name == "tuningJobs/missing":
                yield tuning_pb2.TuningJobEvent(sequence=1)
                yield tuning_pb2.TuningJobEvent(sequence=2)
                raise NotFound("tuning job 'missing' was deleted")
            for i in range(STREAMED):
                yield tuning_pb2.TuningJobEvent(sequence=i + 1)
        finally:
            self.watch_closed.set()


@contextlib.asynccontextmanager
async def serving():
    registry = CollectorRegistry()
    server = grpc.aio.server(
        interceptors=[GrpcMetricsInterceptor(registry), AuthInterceptor(TOKEN), ErrorInterceptor()]
    )
    tuning = FakeTuning()
    tuning_pb2_grpc.add_TuningServiceServicer_to_server(tuning, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((TUNING, HEALTH, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield registry, channel, tuning
    finally:
        await server.stop(0)


def run(test):
    return asyncio.run(asyncio.wait_for(test(), timeout=15))


def sample(registry, name: str, grpc_type: str, service: str, method: str, **extra) -> float:
    labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, **extra}
    return registry.get_sample_value(name, labels) or 0.0


async def until_handled(registry, grpc_type, service, method, code, count=1.0, timeout=5.0) -> None:
    """The server counts an aborted RPC after its status went out: the client can see it first."""
    for _ in range(int(timeout / 0.01)):
        if sample(registry, "grpc_server_handled_total", grpc_type, service, method, grpc_code=code) >= count:
            return
        await asyncio.sleep(0.01)
    text = generate_latest(registry).decode()
    pytest.fail(f"no grpc_server_handled_total{{grpc_method={method!r}, grpc_code={code!r}}} == {count}:\n{text}")


def test_split_method_like_go_grpc_prometheus():
    assert split_method("/layercard.v1.TuningService/GetTuningJob") == (TUNING, "GetTuningJob")
    assert split_method("nonsense") == ("unknown", "unknown")


def test_unary_ok_and_not_found():
    async def test():
        async with serving() as (registry, channel, _):
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            await stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name="tuningJobs/a"), metadata=AUTH)
            await stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name="tuningJobs/b"), metadata=AUTH)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name="tuningJobs/missing"), metadata=AUTH)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await until_handled(registry, "unary", TUNING, "GetTuningJob", "NotFound")

            s = lambda name, **kw: sample(registry, name, "unary", TUNING, "GetTuningJob", **kw)  # noqa: E731
            assert s("grpc_server_started_total") == 3
            assert s("grpc_server_handled_total", grpc_code="OK") == 2
            assert s("grpc_server_handled_total", grpc_code="NotFound") == 1
            assert s("grpc_server_msg_received_total") == 3
            assert s("grpc_server_msg_sent_total") == 2  # as in Go: no response message on an error
            assert s("grpc_server_handling_seconds_count") == 3
            assert 0 < s("grpc_server_handling_seconds_sum") < 3
            assert s("grpc_server_handling_seconds_bucket", le="10.0") == 3
            buckets = {m.labels["le"] for f in registry.collect() for m in f.samples if m.name.endswith("_bucket")}
            assert buckets == {str(b) for b in GO_DEFAULT_BUCKETS} | {"+Inf"}

    run(test)


def test_unexpected_error_auth_failure_and_deadline():
    async def test():
        async with serving() as (registry, channel, _):
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListTuningJobs(tuning_pb2.ListTuningJobsRequest(), metadata=AUTH)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name="tuningJobs/a"))  # no token
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name="x"), metadata=AUTH, timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await until_handled(registry, "unary", TUNING, "ListTuningJobs", "Internal")
            await until_handled(registry, "unary", TUNING, "GetTuningJob", "Unauthenticated")
            await until_handled(registry, "unary", TUNING, "CancelTuningJob", "DeadlineExceeded")
            assert sample(registry, "grpc_server_msg_sent_total", "unary", TUNING, "ListTuningJobs") == 0

    run(test)


def test_server_stream_counts_each_message_sent():
    async def test():
        async with serving() as (registry, channel, _):
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name="tuningJobs/a"), metadata=AUTH)
            events = [event async for event in call]
            assert [e.sequence for e in events] == list(range(1, STREAMED + 1))
            await until_handled(registry, "server_stream", TUNING, "WatchTuningJob", "OK")

            s = lambda name: sample(registry, name, "server_stream", TUNING, "WatchTuningJob")  # noqa: E731
            assert s("grpc_server_started_total") == 1
            assert s("grpc_server_msg_received_total") == 1
            assert s("grpc_server_msg_sent_total") == STREAMED
            assert s("grpc_server_handling_seconds_count") == 1
            assert sample(registry, "grpc_server_started_total", "unary", TUNING, "WatchTuningJob") == 0

            # A domain error after two messages: mapped by the error interceptor inside, counted here.
            call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name="tuningJobs/missing"), metadata=AUTH)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [event async for event in call]
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await until_handled(registry, "server_stream", TUNING, "WatchTuningJob", "NotFound")
            assert s("grpc_server_started_total") == 2
            assert s("grpc_server_msg_sent_total") == STREAMED + 2

    run(test)


def test_client_cancelled_streams_count_as_canceled():
    async def test():
        async with serving() as (registry, channel, tuning):
            # An async-generator handler (through the error interceptor's guard).
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name="tuningJobs/forever"), metadata=AUTH)
            assert (await call.read()).sequence == 1
            call.cancel()
            await until_handled(registry, "server_stream", TUNING, "WatchTuningJob", "Canceled")
            await asyncio.wait_for(tuning.watch_closed.wait(), 5)  # the handler's generator was closed, not leaked
            assert sample(registry, "grpc_server_msg_sent_total", "server_stream", TUNING, "WatchTuningJob") == 1

            # A coroutine handler that writes with context.write(): the standard health Watch.
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            await until_handled(registry, "server_stream", HEALTH, "Watch", "Canceled")
            assert sample(registry, "grpc_server_msg_sent_total", "server_stream", HEALTH, "Watch") == 1
            assert sample(registry, "grpc_server_handled_total", "server_stream", HEALTH, "Watch", grpc_code="OK") == 0

    run(test)


def test_health_and_reflection_are_counted():
    async def test():
        async with serving() as (registry, channel, _):
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the health servicer's own context.abort
            await until_handled(registry, "unary", HEALTH, "Check", "OK")
            await until_handled(registry, "unary", HEALTH, "Check", "NotFound")

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo(metadata=AUTH)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=TUNING))
            await call.done_writing()
            replies = [reply async for reply in call]
            assert len(replies) == 2
            service, method = reflection.SERVICE_NAME, "ServerReflectionInfo"
            await until_handled(registry, "bidi_stream", service, method, "OK")
            assert sample(registry, "grpc_server_msg_received_total", "bidi_stream", service, method) == 2
            assert sample(registry, "grpc_server_msg_sent_total", "bidi_stream", service, method) == 2

    run(test)


def test_histogram_buckets_are_inclusive_and_cumulative(monkeypatch):
    """A handling time equal to a bound counts in that bound's bucket (le: less or equal), as in Go."""
    from layercard_service.api import grpc_metrics

    registry = CollectorRegistry()
    interceptor = GrpcMetricsInterceptor(registry)

    async def handle(request, context):
        return request

    metrics = interceptor._metrics_for("/a.B/C", grpc.unary_unary_rpc_method_handler(handle))
    assert metrics.asynchronous
    for elapsed in (0.005, 0.0051, 10.0, 11.0):
        monkeypatch.setattr(grpc_metrics.time, "perf_counter", lambda e=elapsed: 100.0 + e)
        metrics.finish(grpc.StatusCode.OK, 100.0)
    s = lambda name, **kw: sample(registry, name, "unary", "a.B", "C", **kw)  # noqa: E731
    assert s("grpc_server_handling_seconds_bucket", le="0.005") == 1
    assert s("grpc_server_handling_seconds_bucket", le="0.01") == 2
    assert s("grpc_server_handling_seconds_bucket", le="10.0") == 3
    assert s("grpc_server_handling_seconds_bucket", le="+Inf") == s("grpc_server_handling_seconds_count") == 4
    assert s("grpc_server_handled_total", grpc_code="OK") == 4
    assert s("grpc_server_handling_seconds_sum") == pytest.approx(0.005 + 0.0051 + 10.0 + 11.0)


def test_wrapped_handlers_are_built_once_per_handler_the_chain_returns():
    """grpc hands out one handler object per method: the metrics and error interceptors wrap it once, and wrap
    again only when the chain below returns another (the auth interceptor's refusal builds one per call)."""

    async def handle(request, context):
        return request

    first, second = (grpc.unary_unary_rpc_method_handler(handle) for _ in range(2))
    returned = [first]

    async def continuation(details):
        return returned[0]

    class Details:
        method, invocation_metadata = "/a.B/C", ()

    class Context:
        def code(self):
            return None

    async def test():
        for interceptor in (GrpcMetricsInterceptor(CollectorRegistry()), ErrorInterceptor()):
            once = await interceptor.intercept_service(continuation, Details)
            assert once is not first and await interceptor.intercept_service(continuation, Details) is once
            returned[0] = second
            other = await interceptor.intercept_service(continuation, Details)
            assert other is not once and await other.unary_unary("ping", Context()) == "ping"
            returned[0] = first

    run(test)
