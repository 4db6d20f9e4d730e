"""kill -9 of vLLM in the middle of a deploy: the deploy fails cleanly or the deployment ends DEGRADED, never
stuck DEPLOYING, and once vLLM is back the fleet serves a version again (the previous one when the deploy failed).

The victim is the second server of the session's pair (tests/e2e/conftest.py), restarted on its port at the end,
as tests/e2e/test_fleet.py does with it: the other tests find it as they expect.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from conftest import MAX_LORA_RANK
from support.adapters import publish_version, train_word_adapter
from support.server_thread import ServerThread

from layercard.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from layercard_service.config import ServiceConfig

pytestmark = pytest.mark.e2e

ADAPTER = "fault-echo"
WORDS = {1: " zebra", 2: " yak"}
SETTLED = {
    adapter_pb2.DEPLOYMENT_STATE_READY,
    adapter_pb2.DEPLOYMENT_STATE_DEGRADED,
    adapter_pb2.DEPLOYMENT_STATE_FAILED,
}


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _deployment(stub) -> adapter_pb2.Deployment:
    listing = stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=60)
    return next(a.deployment for a in listing.adapters if a.name == f"adapters/{ADAPTER}")


def test_vllm_killed_mid_deploy_fails_cleanly_and_the_fleet_recovers(vllm_pair, tmp_path):
    victim = vllm_pair[1]
    words = tmp_path / "adapters"
    data_dir = tmp_path / "state"
    for version, word in WORDS.items():
        publish_version(data_dir, ADAPTER, train_word_adapter(words / str(version), word.strip()))
    config = ServiceConfig(
        port=0,
        log_format="text",
        data_dir=data_dir,
        vllm_urls=(victim.url,),
        vllm_model="builtin:tiny",
        max_lora_rank=MAX_LORA_RANK,
        reconcile_interval_seconds=1.0,
    )
    try:
        with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
            adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
            inference = inference_pb2_grpc.InferenceServiceStub(channel)
            first = adapters.DeployAdapter(
                adapter_pb2.DeployAdapterRequest(adapter=f"adapters/{ADAPTER}", version=1, force=True), timeout=300
            )
            assert first.state == adapter_pb2.DEPLOYMENT_STATE_READY

            outcome: dict[str, object] = {}

            def deploy_v2() -> None:
                request = adapter_pb2.DeployAdapterRequest(adapter=f"adapters/{ADAPTER}", version=2, force=True)
                try:
                    outcome["deployment"] = adapters.DeployAdapter(request, timeout=300)
                except grpc.RpcError as err:
                    outcome["error"] = err

            deploying = threading.Thread(target=deploy_v2)
            deploying.start()
            time.sleep(1.0)  # the load or the latency probe is under way (a deploy takes seconds)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.stop()  # reaps the killed group
            deploying.join(timeout=240)
            assert not deploying.is_alive(), "DeployAdapter hung after vLLM died"

            error = outcome.get("error")
            if error is not None:
                assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()
            else:
                assert outcome["deployment"].state in SETTLED
            _wait_for(lambda: _deployment(adapters).state in SETTLED, 60, "the deployment to leave DEPLOYING")

            victim.start()  # the same port: the same URL
            victim.wait_ready()
            ready = _wait_for(
                lambda: (d := _deployment(adapters)).state == adapter_pb2.DEPLOYMENT_STATE_READY and d,
                120,
                "the deployment to be READY with vLLM back",
            )
            if error is not None:
                assert ready.version == 1  # the failed deploy changed nothing: the previous version serves
            request = inference_pb2.GenerateRequest(
                prompt="word 3:", adapter=ADAPTER, sampling=inference_pb2.SamplingParams(max_tokens=6)
            )
            answer = inference.Generate(request, timeout=120)
            assert answer.served_model == f"{ADAPTER}@v{ready.version}"
            assert answer.text.startswith(WORDS[ready.version][:4])
    finally:
        if not victim.running():
            victim.start()
            victim.wait_ready()
