"""AdapterService over a real gRPC server without vLLM: every bad input gets its status and details, and the
server keeps serving (health SERVING, a good ListAdapters) after each error."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.adapters import publish_version
from support.server_thread import ServerThread

from layercard.v1 import adapter_pb2, adapter_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.serving.vllm_process import free_port

ADAPTER_CONFIG = {"r": 8, "peft_type": "LORA", "target_modules": ["o_proj"], "bias": "none"}
ADAPTERS = ("echo", "elsewhere")  # echo: compatible, versions 1 and 2; elsewhere: trained on another model


def _publish_all(data_dir, sources):
    source = sources / "adapter"
    source.mkdir(exist_ok=True)
    (source / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    publish_version(data_dir, "echo", source)
    publish_version(data_dir, "echo", source)
    publish_version(data_dir, "elsewhere", source, model="x/other")


def _serve(tmp_path_factory, **settings):
    data_dir = tmp_path_factory.mktemp("state")
    _publish_all(data_dir, tmp_path_factory.mktemp("sources"))
    config = ServiceConfig(port=0, log_format="text", data_dir=data_dir, vllm_model="builtin:tiny", **settings)
    return ServerThread(config)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    """A server with no vLLM configured."""
    with _serve(tmp_path_factory) as running, grpc.insecure_channel(running.address) as channel:
        yield adapter_pb2_grpc.AdapterServiceStub(channel), channel


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    """A server whose one vLLM URL is a closed local port."""
    settings = {"vllm_urls": (f"http://127.0.0.1:{free_port()}",), "reconcile_interval_seconds": 60.0}
    with _serve(tmp_path_factory, **settings) as running, grpc.insecure_channel(running.address) as channel:
        yield adapter_pb2_grpc.AdapterServiceStub(channel), channel


def _details(err: grpc.RpcError) -> dict:
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details on {err.code()}: {err.details()}"
    found = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind] = message
    return found


def _fails(call, request) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)
    return err.value.code(), _details(err.value)


def _reason(details: dict) -> str:
    return details[error_details_pb2.ErrorInfo].reason


def _fields(details: dict) -> list[str]:
    return [v.field for v in details[error_details_pb2.BadRequest].field_violations]


def _still_serving(stub, channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    listed = stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=30)
    assert [a.name for a in listed.adapters] == [f"adapters/{a}" for a in ADAPTERS]


def _deploy(**fields) -> adapter_pb2.DeployAdapterRequest:
    return adapter_pb2.DeployAdapterRequest(**{"adapter": "adapters/echo", **fields})


# --- DeployAdapter -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"adapter": ""}, "adapter"),
        ({"adapter": "echo"}, "adapter"),
        ({"adapter": "adapters/Echo_1"}, "adapter"),
        ({"adapter": "adapters/echo/versions/1"}, "adapter"),
        ({"version": -1}, "version"),
        ({"max_overhead_fraction": -0.1}, "max_overhead_fraction"),
        ({"max_overhead_fraction": float("nan")}, "max_overhead_fraction"),
        ({"rollback_over_budget": True}, "rollback_over_budget"),  # no budget to judge live traffic against
        ({"rollback_over_budget": True, "full_latency_probe": True}, "rollback_over_budget"),
        ({"pool": "gpu"}, "pool"),  # the service has one pool, "default"
        ({"pool": "x" * 10_000}, "pool"),  # named back in the error, cut short
    ],
)
def test_deploy_with_bad_fields_is_invalid_argument(stub, request_fields, field):
    adapters, channel = stub
    code, details = _fails(adapters.DeployAdapter, _deploy(**request_fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(details) == [field]
    _still_serving(adapters, channel)


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [({"adapter": "adapters/nope"}, "ADAPTER_NOT_FOUND"), ({"version": 3}, "VERSION_NOT_FOUND")],
)
def test_deploy_of_something_missing_is_not_found(stub, request_fields, reason):
    adapters, channel = stub
    code, details = _fails(adapters.DeployAdapter, _deploy(**request_fields))
    assert code == grpc.StatusCode.NOT_FOUND
    assert _reason(details) == reason
    _still_serving(adapters, channel)


def test_deploy_of_an_adapter_for_another_model_is_incompatible(stub):
    adapters, channel = stub
    code, details = _fails(adapters.DeployAdapter, _deploy(adapter="adapters/elsewhere"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(details) == "ADAPTER_INCOMPATIBLE"
    assert details[error_details_pb2.ErrorInfo].metadata["version"] == "1"
    _still_serving(adapters, channel)


@pytest.mark.parametrize("validate_only", [False, True])
def test_deploy_without_vllm_is_failed_precondition(stub, validate_only):
    adapters, channel = stub
    code, details = _fails(adapters.DeployAdapter, _deploy(version=2, validate_only=validate_only))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(details) == "NO_VLLM_SERVERS"
    _still_serving(adapters, channel)


def test_deploy_with_vllm_unreachable_is_unavailable_with_a_retry_hint(unreachable):
    adapters, channel = unreachable
    code, details = _fails(adapters.DeployAdapter, _deploy())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert _reason(details) == "VLLM_UNAVAILABLE"
    assert details[error_details_pb2.RetryInfo].retry_delay.ToMilliseconds() > 0
    _still_serving(adapters, channel)
    listed = adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=30)
    assert all(not a.HasField("deployment") for a in listed.adapters)


# --- UndeployAdapter -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "echo", "adapters/", "adapters/Echo"])
def test_undeploy_with_a_malformed_name_is_invalid_argument(stub, name):
    adapters, channel = stub
    code, details = _fails(adapters.UndeployAdapter, adapter_pb2.UndeployAdapterRequest(adapter=name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(details) == ["adapter"]
    _still_serving(adapters, channel)


def test_undeploy_of_an_unknown_adapter_is_not_found(stub):
    adapters, channel = stub
    code, details = _fails(adapters.UndeployAdapter, adapter_pb2.UndeployAdapterRequest(adapter="adapters/nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert _reason(details) == "ADAPTER_NOT_FOUND"
    _still_serving(adapters, channel)


def test_undeploy_of_a_known_adapter_that_is_not_deployed_succeeds(stub, unreachable):
    request = adapter_pb2.UndeployAdapterRequest(adapter="adapters/echo")
    assert list(stub[0].UndeployAdapter(request, timeout=30).replicas) == []  # no fleet: nothing to report
    replicas = unreachable[0].UndeployAdapter(request, timeout=30).replicas
    assert [(r.healthy, r.desired_loaded, bool(r.error)) for r in replicas] == [(False, False, True)]


# --- ListAdapters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_fields", "field"),
    [({"page_token": "garbage"}, "page_token"), ({"page_token": "-1"}, "page_token"), ({"page_size": -1}, "page_size")],
)
def test_list_with_bad_paging_is_invalid_argument(stub, request_fields, field):
    adapters, channel = stub
    code, details = _fails(adapters.ListAdapters, adapter_pb2.ListAdaptersRequest(**request_fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(details) == [field]
    _still_serving(adapters, channel)


def test_list_pages_one_adapter_at_a_time(stub):
    adapters, _channel = stub
    names, token, pages = [], "", 0
    while True:
        page = adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(page_size=1, page_token=token), timeout=30)
        names += [a.name for a in page.adapters]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == [f"adapters/{a}" for a in ADAPTERS] and pages == 2
    echo = adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(page_size=1), timeout=30).adapters[0]
    assert [v.name for v in echo.versions] == ["adapters/echo/versions/1", "adapters/echo/versions/2"]
    assert echo.base_model == "builtin:tiny" and not echo.HasField("deployment")
    assert echo.versions[0].lora.rank == 8 and echo.versions[0].size_bytes > 0
