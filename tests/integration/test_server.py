"""The real server over a real socket: health, reflection, error mapping, auth, TLS, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import layer_card_pb2, layer_card_pb2_grpc, placement_pb2, placement_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.errors import InvalidArgument, Unavailable
from layercard_service.server import SERVICE_NAMES, Servicers

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def details_of(err: grpc.RpcError) -> dict[str, object]:
    """Unpacks the google.rpc.Status details of a failed call by type name."""
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, object] = {}
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                msg = kind()
                any_detail.Unpack(msg)
                found[kind.__name__] = msg
    return found


def test_health_overall_and_per_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="layercard.v1.NoSuchService"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_calls_every_method(server):
    """What grpcurl does: discover every service and method by reflection, then call each with an empty request."""
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert set(SERVICE_NAMES) <= services
        assert "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        called: dict[grpc.StatusCode, int] = {}
        for service_name in SERVICE_NAMES:
            service = pool.FindServiceByName(service_name)
            assert len(service.methods) >= 1
            for method in service.methods:
                request_cls = message_factory.GetMessageClass(method.input_type)
                response_cls = message_factory.GetMessageClass(method.output_type)
                path = f"/{service.full_name}/{method.name}"
                kind = channel.unary_stream if method.server_streaming else channel.unary_unary
                call = kind(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                try:
                    result = call(request_cls(), timeout=5)
                    if method.server_streaming:
                        list(result)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
                    # An empty request is bad input or names what is not built yet; never a crash.
                    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED), path
                    if code == grpc.StatusCode.UNIMPLEMENTED:
                        assert "not built yet" in err.details()
                        assert details_of(err)["ErrorInfo"].metadata["method"] == method.name
                called[code] = called.get(code, 0) + 1
        assert sum(called.values()) == 15  # every RPC of the contract, DeleteTuningJob included


class _FailingPlacement(placement_pb2_grpc.PlacementServiceServicer):
    """Raises whatever the test sets: a fake at the servicer seam to exercise the error interceptor."""

    error: Exception = RuntimeError("secret internal detail")

    async def PlanPlacement(self, request, context):
        raise self.error


class _FailingCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def ComputeLayerCard(self, request, context):
        yield layer_card_pb2.ComputeLayerCardResponse()
        raise InvalidArgument.field("probe_size", "must be positive, got 0")


@pytest.fixture
def failing_server():
    placement = _FailingPlacement()
    with ServerThread(servicers=Servicers(placement=placement, layer_card=_FailingCards())) as running:
        running.placement = placement
        yield running


def test_domain_error_maps_to_status_with_details(failing_server):
    failing_server.placement.error = InvalidArgument.field("k", "must be positive, got -1")
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PlanPlacement(placement_pb2.PlanPlacementRequest(k=-1), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = details_of(err.value)
        assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"
        assert details["ErrorInfo"].domain == "layercard.dev"
        violation = details["BadRequest"].field_violations[0]
        assert (violation.field, violation.description) == ("k", "must be positive, got -1")

        failing_server.placement.error = Unavailable("vLLM is down", reason="VLLM_UNREACHABLE", retry_after=2.5)
        with pytest.raises(grpc.RpcError) as err:
            stub.PlanPlacement(placement_pb2.PlanPlacementRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = details_of(err.value)
        assert details["ErrorInfo"].reason == "VLLM_UNREACHABLE"
        assert details["RetryInfo"].retry_delay.ToNanoseconds() == 2_500_000_000
        assert ("grpc-retry-pushback-ms", "2500") in err.value.trailing_metadata()


def test_unexpected_error_is_generic_internal(failing_server):
    failing_server.placement.error = RuntimeError("secret internal detail")
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PlanPlacement(placement_pb2.PlanPlacementRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()
        assert "incident" in err.value.details()
        # The server keeps serving after a bug in one handler.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == SERVING


def test_stream_error_after_messages_maps_too(failing_server):
    with grpc.insecure_channel(failing_server.address) as channel:
        stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        received = []
        with pytest.raises(grpc.RpcError) as err:
            for message in stub.ComputeLayerCard(layer_card_pb2.ComputeLayerCardRequest(), timeout=5):
                received.append(message)
        assert len(received) == 1
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(err.value)["BadRequest"].field_violations[0].field == "probe_size"


def test_bearer_token_required_except_for_health():
    with ServerThread(ServiceConfig(port=0, auth_token="s3cret", log_format="text")) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            request = placement_pb2.PlanPlacementRequest()
            for metadata, reason in ((None, "MISSING_TOKEN"), ((("authorization", "Bearer wrong"),), "INVALID_TOKEN")):
                with pytest.raises(grpc.RpcError) as err:
                    stub.PlanPlacement(request, metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert details_of(err.value)["ErrorInfo"].reason == reason
            # The right token passes the auth check and reaches the handler, which refuses the empty request.
            with pytest.raises(grpc.RpcError) as err:
                stub.PlanPlacement(request, metadata=(("authorization", "Bearer s3cret"),), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Streams are guarded the same way.
            cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(cards.ComputeLayerCard(layer_card_pb2.ComputeLayerCardRequest(), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # So is server reflection (a bidirectional stream).
            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health needs no token: probes carry none.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == SERVING


def test_token_file_is_read(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-secret\n")
    with ServerThread(ServiceConfig(port=0, auth_token_file=token_file, log_format="text")) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.PlanPlacement(
                    placement_pb2.PlanPlacementRequest(),
                    metadata=(("authorization", "Bearer from-a-secret"),),
                    timeout=5,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past auth, at the handler


def test_message_size_limit():
    with ServerThread(ServiceConfig(port=0, max_message_bytes=4096, log_format="text")) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            big = placement_pb2.PlanPlacementRequest(layer_card="x" * 10_000)
            with pytest.raises(grpc.RpcError) as err:
                stub.PlanPlacement(big, timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == SERVING


class _SlowPlacement(placement_pb2_grpc.PlacementServiceServicer):
    """Holds a call in flight until released, to observe draining."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    async def PlanPlacement(self, request, context):
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 60)
        return placement_pb2.Placement(layers=[1, 2], rationale="finished while draining")


def test_graceful_shutdown_drains_in_flight_call():
    slow = _SlowPlacement()
    running = ServerThread(servicers=Servicers(placement=slow)).start()
    channel = grpc.insecure_channel(running.address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == SERVING
        in_flight = placement_pb2_grpc.PlacementServiceStub(channel).PlanPlacement.future(
            placement_pb2.PlanPlacementRequest(), timeout=30
        )
        assert slow.entered.wait(10)
        stopping = running.submit(running.server.stop(grace=600))
        # Health flips first, so load balancers stop sending work.
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a watcher that saw NOT_SERVING goes away; an open stream would hold the whole grace
        assert not stopping.done()  # draining: it waits for the call in flight
        slow.release.set()
        # The call that was in flight completes normally.
        result = in_flight.result(timeout=20)
        assert result.rationale == "finished while draining"
        stopping.result(timeout=60)  # it waited for the call, not for the whole grace period (600 s)
        # And new calls are refused once stopped.
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        channel.close()
        running.stop()
