"""Version swaps and drains: a new version is loaded, verified and routed before the old one drains and unloads;
cancelled deploys and undeploys unload what they loaded and wait for requests in flight.

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import asyncio

import pytest
from support.fleet import URLS, make_env, run_async, until

from layercard_service.errors import NotFound


@run_async
async def test_version_swap_loads_routes_drains_then_unloads(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    gate = asyncio.Event()
    for fake in env.replicas:
        fake.gates["echo@v1"] = gate
    in_flight = asyncio.create_task(env.generate("echo"))  # held on v1 until the gate opens
    await until(lambda: env.proxy.in_flight["echo@v1"] == 1)

    swap = asyncio.create_task(env.manager.deploy("adapters/echo", version=2))
    await until(lambda: env.proxy.routes.served["echo"] == "echo@v2")
    after_route = await env.generate("echo")
    assert after_route.served_model == "echo@v2"  # new requests go to the new version at once
    await asyncio.sleep(0.1)
    assert not swap.done() and not env.calls("unload", "echo@v1")  # draining: v1 still has a request
    assert all("echo@v1" in f.loaded for f in env.replicas)

    gate.set()
    assert (await in_flight).served_model == "echo@v1"  # the old request finished on the old version
    view = await swap
    assert (view.version, view.state) == (2, "READY")
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v2"}, {"echo@v2"}]

    loads = env.calls("load", "echo@v2")
    unloads = env.calls("unload", "echo@v1")
    assert {e[1] for e in loads} == set(URLS) and {e[1] for e in unloads} == set(URLS)
    assert all(route == "echo@v1" for *_, route in loads)  # v2 loaded while v1 was routed
    assert all(route == "echo@v2" for *_, route in unloads)  # v1 unloaded only after the route moved
    finished = env.log.index(next(e for e in env.calls("completed", "echo@v1") if e[3] == "echo@v2"))
    assert all(env.log.index(u) > finished for u in unloads)  # ... and after its request in flight finished


@run_async
async def test_a_drain_that_times_out_unloads_anyway(tmp_path):
    env = make_env(tmp_path, drain_timeout=0.1)
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    for fake in env.replicas:
        fake.gates["echo@v1"] = asyncio.Event()  # never set: the request outlives the drain
    stuck = asyncio.create_task(env.generate("echo"))
    await until(lambda: env.proxy.in_flight["echo@v1"] == 1)
    view = await env.manager.deploy("adapters/echo", version=2)
    assert view.state == "READY" and all(set(f.loaded) == {"echo@v2"} for f in env.replicas)
    stuck.cancel()


@run_async
async def test_deploying_an_older_version_swaps_back_to_it(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=2)
    view = await env.manager.deploy("adapters/echo", version=1)
    assert (view.version, view.state) == (1, "READY")
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert env.proxy.routes.served["echo"] == "echo@v1"


@run_async
async def test_a_swap_with_a_replica_down_is_completed_by_reconcile(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    env.replicas[1].down = True
    assert (await env.manager.deploy("adapters/echo", version=2)).state == "DEGRADED"
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v2"}, {"echo@v1"}]  # v1 left where unreachable
    env.replicas[1].down = False
    assert (await env.generate("echo")).served_model == "echo@v2"  # never v1, on either replica
    assert (await env.generate("echo")).served_model == "echo@v2"
    assert await env.reconciler.reconcile() == {"echo": "READY"}
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v2"}, {"echo@v2"}]


@run_async
async def test_a_version_being_verified_gets_no_traffic_even_by_its_served_name(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    gate = asyncio.Event()
    for fake in env.replicas:
        fake.gates["echo@v2"] = gate
    deploy = asyncio.create_task(env.manager.deploy("adapters/echo", version=2))
    await until(lambda: bool(env.calls("complete", "echo@v2")))
    for fake in env.replicas:
        del fake.gates["echo@v2"]  # the probes already waiting keep waiting; new requests would not
    try:
        with pytest.raises(NotFound):
            await env.generate("echo@v2")
    finally:
        gate.set()
        await deploy


@run_async
async def test_a_cancelled_deploy_unloads_what_it_loaded_and_releases_the_adapter(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    for fake in env.replicas:
        fake.gates["echo@v2"] = asyncio.Event()  # never set: the deploy hangs in its effect probe
    deploy = asyncio.create_task(env.manager.deploy("adapters/echo", version=2))
    await until(lambda: bool(env.calls("complete", "echo@v2")))
    deploy.cancel()  # the caller's deadline
    with pytest.raises(asyncio.CancelledError):
        await deploy
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert env.proxy.routes.served["echo"] == "echo@v1"
    assert not env.manager._locks["echo"].locked()


@run_async
async def test_undeploy_unloads_everywhere_and_stops_serving(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    replicas = await env.manager.undeploy("adapters/echo")
    assert [(r.replica, r.observed_adapters, r.desired_loaded) for r in replicas] == [(u, (), False) for u in URLS]
    assert all(not f.loaded for f in env.replicas)
    assert env.store.get("echo") is None
    with pytest.raises(NotFound):
        await env.generate("echo")
    assert await env.reconciler.reconcile() == {}
    assert all(not f.loaded for f in env.replicas)
    assert await env.manager.undeploy("adapters/echo")  # again: known adapter, nothing to do


@run_async
async def test_undeploy_waits_for_requests_in_flight(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    gate = asyncio.Event()
    for fake in env.replicas:
        fake.gates["echo@v1"] = gate
    request = asyncio.create_task(env.generate("echo"))
    await until(lambda: env.proxy.in_flight["echo@v1"] == 1)
    undeploy = asyncio.create_task(env.manager.undeploy("adapters/echo"))
    await asyncio.sleep(0.1)
    assert not undeploy.done() and all("echo@v1" in f.loaded for f in env.replicas)
    with pytest.raises(NotFound):  # no new requests meanwhile
        await env.generate("echo")
    gate.set()
    assert (await request).served_model == "echo@v1"
    await undeploy
    assert all(not f.loaded for f in env.replicas)
