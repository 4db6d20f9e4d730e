"""InferenceService without a reachable vLLM: clear statuses, the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import inference_pb2, inference_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.serve.vllm_process import free_port


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
