"""Routes through the inference proxy: what is served under which name, across restarts and streams, and what
is recorded per request.

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import pytest
from support.fakes import BASE, RecordingTelemetry
from support.fleet import reason, run_async

from layercard_service.control.deployments import AdapterManager
from layercard_service.errors import NotFound
from layercard_service.serving.inference import InferenceProxy, Routes
from layercard_service.serving.vllm_api import Sampling


@run_async
async def test_a_managed_adapter_that_is_not_deployed_is_not_served(env):
    env.publish("echo")
    for fake in env.replicas:
        fake.loaded["echo@v1"] = "/loaded/by/hand"
    with pytest.raises(NotFound) as err:
        await env.generate("echo")
    assert reason(err) == "ADAPTER_NOT_DEPLOYED"


@run_async
async def test_unknown_adapters_resolve_to_their_newest_loaded_version(env):
    for fake in env.replicas:
        fake.loaded.update({"ext@v1": "/a", "ext@v3": "/b", "ext@v2": "/c", "plain": "/d"})
    assert (await env.generate("ext")).served_model == "ext@v3"
    assert (await env.generate("plain")).served_model == "plain"
    assert (await env.generate("")).served_model == BASE
    with pytest.raises(NotFound):
        await env.generate("missing")


@run_async
async def test_routes_survive_a_restart_of_the_service(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    proxy = InferenceProxy(env.fleet.members, Routes())
    AdapterManager(env.fleet, proxy, env.jobs, env.store)
    assert proxy.routes.served == {"echo": "echo@v1"}
    assert (await proxy.generate("hi", "echo", Sampling())).served_model == "echo@v1"


@run_async
async def test_streaming_counts_in_flight_until_the_stream_ends(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    chunks = []
    async for chunk, _replica, name in env.proxy.stream("hi", "echo", Sampling()):
        chunks.append(chunk)
        assert env.proxy.in_flight[name] == 1
    assert "".join(c.text for c in chunks).startswith("[echo@v1]")
    assert not env.proxy.in_flight


@run_async
async def test_each_request_is_recorded_once_and_unknown_names_share_one_label(env):
    recorder = RecordingTelemetry()
    env.proxy.telemetry = recorder
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    await env.generate("echo")
    with pytest.raises(NotFound):
        await env.generate("no-such-adapter")
    chunks = [c async for c, _, _ in env.proxy.stream("hi", "echo", Sampling(max_tokens=4))]
    assert chunks
    ok_generate, missing, ok_stream = recorder.requests
    assert (ok_generate.adapter, ok_generate.ok, ok_generate.served_model) == ("echo", True, "echo@v1")
    assert (missing.adapter, missing.ok, missing.error) == ("unknown", False, "ADAPTER_NOT_DEPLOYED")
    assert ok_stream.ok and 0 < ok_stream.first_token_seconds <= ok_stream.latency_seconds
