"""The sync and async clients against a real in-process server: health, error mapping, auth, TLS, retries, paging.

Fakes are swapped in only at the servicer seam (``Servicers``), so every call still crosses a real socket, the
real interceptors and the real status details; what the fakes add is a way to count attempts and to page.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from support.server_thread import ServerThread

from layercard.v1 import (
    adapter_pb2,
    inference_pb2,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_client import (
    IDEMPOTENT_METHODS,
    AsyncLayercardClient,
    ClientSettings,
    FailedPrecondition,
    LayercardClient,
    NotFound,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from layercard_client.channel import service_config
from layercard_service import errors as service_errors
from layercard_service.config import ServiceConfig
from layercard_service.server import SERVICE_NAMES, Servicers

TOKEN = "s3cret-token"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountingCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    """Answers UNAVAILABLE (with RetryInfo) and counts the attempts that reached the server."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _fail(self, method: str) -> service_errors.Unavailable:
        self.calls[method] = self.calls.get(method, 0) + 1
        return service_errors.Unavailable("warming up", reason="WARMING_UP", retry_after=0.5)

    async def GetLayerCard(self, request, context):
        raise self._fail("GetLayerCard")

    async def ComputeLayerCard(self, request, context):
        raise self._fail("ComputeLayerCard")
        yield  # pragma: no cover - a server stream is an async generator

    async def ListLayerCards(self, request, context):
        # Three pages of two cards; the token is the offset, as opaque to clients as any other.
        start = int(request.page_token or 0)
        names = [f"layerCards/c{i}" for i in range(start, min(start + 2, 6))]
        token = str(start + 2) if start + 2 < 6 else ""
        cards = [layer_card_pb2.LayerCard(name=name, model=request.model) for name in names]
        return layer_card_pb2.ListLayerCardsResponse(layer_cards=cards, next_page_token=token)


class RecordingJobs(tuning_pb2_grpc.TuningServiceServicer):
    """Returns a job per CreateTuningJob and keeps the requests it saw."""

    def __init__(self) -> None:
        self.requests: list[tuning_pb2.CreateTuningJobRequest] = []

    async def CreateTuningJob(self, request, context):
        self.requests.append(request)
        return tuning_pb2.TuningJob(name="tuningJobs/j1", adapter_id=request.adapter_id, model=request.model)


@pytest.fixture
def fake_server():
    cards, jobs = CountingCards(), RecordingJobs()
    with ServerThread(servicers=Servicers(layer_card=cards, tuning=jobs)) as running:
        running.cards, running.jobs = cards, jobs
        yield running


@pytest.fixture
def auth_server():
    with ServerThread(ServiceConfig(port=0, log_format="text", auth_token=TOKEN)) as running:
        yield running


# health


def test_health_sync(server):
    with LayercardClient(server.address) as client:
        assert client.health() == "SERVING"
        for name in SERVICE_NAMES:
            assert client.health(name) == "SERVING"
        with pytest.raises(NotFound):
            client.health("layercard.v1.NoSuchService")


def test_health_async(server):
    async def check() -> list[str]:
        async with AsyncLayercardClient(server.address) as client:
            return [await client.health(), await client.health(SERVICE_NAMES[0])]

    assert asyncio.run(check()) == ["SERVING", "SERVING"]


# errors


def test_error_raises_typed_with_server_details(server):
    with LayercardClient(server.address) as client, pytest.raises(NotFound) as caught:
        client.deploy_adapter("adapters/nope", version=2)
    err = caught.value
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "adapters/nope" in err.message and "does not exist" in err.message
    assert err.reason == "ADAPTER_NOT_FOUND"
    assert err.domain == "layercard.dev"
    assert err.method == "/layercard.v1.AdapterService/DeployAdapter"
    assert isinstance(err.__cause__, grpc.RpcError)  # raised `from` the transport error


def test_a_stream_error_is_raised_typed_while_iterating(server):
    # The test server has no vLLM: GenerateStream fails once iterated, with the server's details.
    with LayercardClient(server.address) as client, pytest.raises(FailedPrecondition) as caught:
        list(client.generate_stream(prompt="hello"))
    assert caught.value.reason == "NO_VLLM_SERVERS" and "--vllm-urls" in caught.value.message


def test_errors_async(server):
    async def calls() -> tuple[NotFound, FailedPrecondition]:
        async with AsyncLayercardClient(server.address) as client:
            with pytest.raises(NotFound) as unary:
                await client.undeploy_adapter("adapters/nope")
            with pytest.raises(FailedPrecondition) as stream:
                async for _ in client.generate_stream(prompt="hello"):
                    pass
            return unary.value, stream.value

    unary, stream = asyncio.run(calls())
    assert unary.reason == "ADAPTER_NOT_FOUND" and "adapters/nope" in unary.message
    assert stream.reason == "NO_VLLM_SERVERS"


# auth


def test_right_token_is_accepted(auth_server):
    with LayercardClient(auth_server.address, token=TOKEN) as client, pytest.raises(NotFound):
        client.get_tuning_job("abc")  # past the auth interceptor: the handler itself answered


@pytest.mark.parametrize(("token", "reason"), [(None, "MISSING_TOKEN"), ("wrong", "INVALID_TOKEN")])
def test_missing_or_wrong_token_is_unauthenticated(auth_server, token, reason):
    with LayercardClient(auth_server.address, token=token) as client, pytest.raises(Unauthenticated) as caught:
        client.get_tuning_job("abc")
    assert caught.value.reason == reason


def test_health_needs_no_token(auth_server):
    with LayercardClient(auth_server.address) as client:
        assert client.health() == "SERVING"


def test_token_async(auth_server):
    async def calls() -> None:
        async with AsyncLayercardClient(auth_server.address, token=TOKEN) as client:
            assert (await client.list_adapters()).adapters == []  # past the auth interceptor
        async with AsyncLayercardClient(auth_server.address) as client:
            with pytest.raises(Unauthenticated):
                await client.list_adapters()
            assert await client.health() == "SERVING"

    asyncio.run(calls())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_ca_file_and_token_as_call_credentials(tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = ServiceConfig(port=0, log_format="text", auth_token=TOKEN, tls_cert_file=cert, tls_key_file=key)
    with ServerThread(config) as running:
        with LayercardClient(running.address, ca_file=cert, token=TOKEN) as client:
            assert client.settings.secure and client.settings.call_metadata() == ()  # token rides on TLS
            assert client.health() == "SERVING"
            with pytest.raises(NotFound):
                client.get_tuning_job("abc")
        with LayercardClient(running.address, ca_file=cert, token="wrong") as client, pytest.raises(Unauthenticated):
            client.get_tuning_job("abc")


# retries


def test_retry_config_names_real_methods_and_covers_create():
    services = {
        name: service
        for module in (layer_card_pb2, placement_pb2, tuning_pb2, adapter_pb2, inference_pb2)
        for name, service in module.DESCRIPTOR.services_by_name.items()
    }
    for service, methods in IDEMPOTENT_METHODS.items():
        descriptor = services[service]
        for method in methods:
            assert method in descriptor.methods_by_name, f"{service}/{method} is not in the contract"
    config = json.loads(json.dumps(service_config(FAST_RETRY)))  # what the channel is given
    names = config["methodConfig"][0]["name"]
    assert {"service": "layercard.v1.TuningService", "method": "CreateTuningJob"} in names
    assert not any(n.get("method") == "ComputeLayerCard" for n in names)
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_nothing_listening_fails_with_unavailable_in_bounded_time():
    address = f"127.0.0.1:{free_port()}"
    with LayercardClient(settings=ClientSettings(address=address, timeout=None, retry=FAST_RETRY)) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.get_layer_card("abc")
        assert time.monotonic() - started < 60  # three attempts with sub-second backoff: a hang, not a slow CPU, fails


def test_idempotent_call_is_retried_the_configured_times_and_others_are_not(fake_server):
    with LayercardClient(fake_server.address, retry=FAST_RETRY) as client:
        with pytest.raises(Unavailable) as caught:
            client.get_layer_card("abc")
        with pytest.raises(Unavailable):
            list(client.compute_layer_card(model="builtin:tiny", dataset="builtin:cipher"))
    assert fake_server.cards.calls == {"GetLayerCard": FAST_RETRY.max_attempts, "ComputeLayerCard": 1}
    assert caught.value.reason == "WARMING_UP"
    assert caught.value.retry_after == pytest.approx(0.5)


def test_call_gets_through_to_a_server_that_starts_after_the_first_attempt():
    port = free_port()
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=2.0)
    calling = threading.Event()
    outcome: dict[str, object] = {}

    def call() -> None:
        with LayercardClient(f"127.0.0.1:{port}", retry=retry, timeout=20) as client:
            calling.set()
            try:
                client.get_tuning_job("abc")
            except Exception as exc:  # handed to the test thread, which asserts on it
                outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    assert calling.wait(10)
    time.sleep(0.2)  # a refused connect on localhost takes microseconds: the first attempt has failed by now
    with ServerThread(ServiceConfig(port=port, log_format="text")):
        caller.join(timeout=30)
    # NOT_FOUND comes from the server's handler: a later attempt reached the server that was not there before.
    assert isinstance(outcome.get("error"), NotFound), outcome


# requests and paging


def test_create_tuning_job_always_sends_a_request_id(fake_server):
    with LayercardClient(fake_server.address) as client:
        job = client.create_tuning_job(
            model="builtin:tiny",
            training_data="builtin:cipher",
            adapter_id="bot",
            explicit_layers=[0, 1],
            hyperparameters={"steps": 5},
        )
        client.create_tuning_job(
            tuning_pb2.CreateTuningJobRequest(model="builtin:tiny", adapter_id="bot", request_id="mine")
        )
    assert job.adapter_id == "bot"
    first, second = fake_server.jobs.requests
    assert uuid.UUID(first.request_id).version == 4
    assert first.training_data.builtin == "builtin:cipher"
    assert list(first.explicit_layers.layers) == [0, 1] and first.hyperparameters.steps == 5
    assert second.request_id == "mine"


def test_iterators_follow_page_tokens(fake_server):
    with LayercardClient(fake_server.address) as client:
        names = [card.name for card in client.iter_layer_cards(page_size=2, model="m")]
    assert names == [f"layerCards/c{i}" for i in range(6)]

    async def collect() -> list[str]:
        async with AsyncLayercardClient(fake_server.address) as client:
            return [card.name async for card in client.iter_layer_cards(page_size=2)]

    assert asyncio.run(collect()) == names


def test_request_message_and_fields_are_not_mixed(server):
    with LayercardClient(server.address) as client, pytest.raises(TypeError):
        client.list_layer_cards(layer_card_pb2.ListLayerCardsRequest(), page_size=3)
