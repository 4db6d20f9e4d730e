"""InferenceService without a reachable vLLM: clear statuses, the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import inference_pb2, inference_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.serving.vllm_process import free_port


def _call(config: ServiceConfig, stream: bool = False) -> grpc.RpcError:
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            if stream:
                list(stub.GenerateStream(inference_pb2.GenerateStreamRequest(prompt="hi"), timeout=30))
            else:
                stub.Generate(inference_pb2.GenerateRequest(prompt="hi"), timeout=30)
        return err.value


def test_no_vllm_configured_is_failed_precondition(tmp_path):
    err = _call(ServiceConfig(port=0, log_format="text", data_dir=tmp_path))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--vllm-urls" in err.details()


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_vllm_is_unavailable_with_a_retry_hint(tmp_path, stream):
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path, vllm_urls=(f"http://127.0.0.1:{free_port()}",))
    err = _call(config, stream)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    retry = [d for d in rpc_status.from_call(err).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("prompt", "sampling", "field"),
    [
        ("", {}, "prompt"),
        ("hi", {"temperature": -1.0}, "sampling.temperature"),
        ("hi", {"top_p": 2.0}, "sampling.top_p"),
        ("hi", {"max_tokens": -1}, "sampling.max_tokens"),
        ("hi", {"stop": [""]}, "sampling.stop"),
    ],
)
def test_bad_input_is_invalid_argument_before_any_vllm_call(tmp_path, stream, prompt, sampling, field):
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path)  # no vLLM: validation comes first
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        params = inference_pb2.SamplingParams(**sampling)
        with pytest.raises(grpc.RpcError) as err:
            if stream:
                list(
                    stub.GenerateStream(inference_pb2.GenerateStreamRequest(prompt=prompt, sampling=params), timeout=30)
                )
            else:
                stub.Generate(inference_pb2.GenerateRequest(prompt=prompt, sampling=params), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = error_details_pb2.BadRequest()
        next(d for d in rpc_status.from_call(err.value).details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
        assert [v.field for v in bad.field_violations] == [field]
        health = grpc.insecure_channel(running.address)
        status = health_pb2_grpc.HealthStub(health).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        health.close()


def _message(role: str, content: str = "hi") -> inference_pb2.ChatMessage:
    return inference_pb2.ChatMessage(role=role, content=content)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": "hi", "messages": [_message("user")]}, "messages"),  # both
        ({}, "prompt"),  # neither
        ({"messages": [_message("user"), _message("robot"), _message("user")]}, "messages[1].role"),
        ({"messages": [_message("user"), _message("assistant"), _message("")]}, "messages[2].role"),
        ({"messages": [_message("user", "")]}, "messages[0].content"),
        ({"messages": [_message("user"), _message("assistant")]}, "messages[1].role"),  # the last is the user's
        ({"messages": [_message("user"), _message("system"), _message("user")]}, "messages[1].role"),
        ({"messages": [_message("user")] * 257}, "messages"),
        ({"messages": [_message("user", "x" * 1_000_001)]}, "messages"),
    ],
)
def test_a_bad_conversation_is_invalid_argument_naming_the_message(tmp_path, stream, fields, field):
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path)  # no vLLM: validation comes first
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            if stream:
                list(stub.GenerateStream(inference_pb2.GenerateStreamRequest(**fields), timeout=30))
            else:
                stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        bad = error_details_pb2.BadRequest()
        next(d for d in rpc_status.from_call(err.value).details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
        assert [v.field for v in bad.field_violations] == [field]
        # A good conversation gets past validation to the fleet, of which there is none here.
        with pytest.raises(grpc.RpcError) as later:
            stub.Generate(inference_pb2.GenerateRequest(messages=[_message("user")]), timeout=30)
        assert later.value.code() == grpc.StatusCode.FAILED_PRECONDITION
