"""Reconcile: the fleet made to match the desired deployments (restarts, strays, down replicas, discovery).

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import asyncio

from support.fleet import URLS, run_async, until

from layercard_service.persistence.deployments import DeploymentRecord


@run_async
async def test_reconcile_reloads_a_restarted_replica(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    env.replicas[0].loaded.clear()
    assert await env.reconciler.reconcile() == {"echo": "READY"}
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert (await env.generate("echo")).served_model == "echo@v1"


@run_async
async def test_reconcile_unloads_stray_versions_and_leaves_others_alone(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    first = env.replicas[0]
    first.loaded.update({"echo@v2": "/x", "echo@v9": "/x", "someone-else@v1": "/y", "plain": "/z"})
    await env.reconciler.reconcile()
    assert set(first.loaded) == {"echo@v1", "someone-else@v1", "plain"}
    assert {e[2] for e in env.calls("unload")} == {"echo@v2", "echo@v9"}


@run_async
async def test_reconcile_unloads_every_version_of_an_id_no_request_can_name(env):
    # "echo\n" passed the old ^...$ id check; a deploy of it is stored and loaded, but no request can undeploy
    # it now. Reconcile owns the name (the id has versions) and unloads it, so it cannot hold a slot for good.
    env.publish("echo\n")
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    env.store.put(DeploymentRecord("echo\n", 1, "READY", None, 0.0))
    for replica in env.replicas:
        replica.loaded["echo\n@v1"] = "/x"
    assert await env.reconciler.reconcile() == {"echo": "READY"}
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    await env.reconciler.reconcile()  # and it is not loaded back
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]


@run_async
async def test_reconcile_marks_a_down_replica_degraded(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    env.replicas[1].down = True
    assert await env.reconciler.reconcile() == {"echo": "DEGRADED"}
    assert env.store.get("echo").state == "DEGRADED"


@run_async
async def test_reconcile_follows_discovery(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    joined = env.fakes["http://vllm-2:8000"]
    env.discovery.current = [URLS[1], joined.url]  # vllm-0 left, vllm-2 joined
    assert await env.reconciler.reconcile() == {"echo": "READY"}
    assert set(joined.loaded) == {"echo@v1"}
    assert [r.url for r in env.fleet.members()] == [URLS[1], joined.url]
    assert URLS[0] not in env.fleet.last


@run_async
async def test_reconcile_does_not_unload_a_version_a_concurrent_deploy_just_routed(env):
    env.publish("echo")
    env.publish("echo")
    env.publish("other")
    await env.manager.deploy("adapters/echo", version=1)
    await env.manager.deploy("adapters/other")
    first = env.replicas[0]
    del first.loaded["other@v1"]  # so the reconcile round has something to load (an await) on vllm-0

    probe_gate = asyncio.Event()
    for fake in env.replicas:
        fake.gates["echo@v2"] = probe_gate  # the v2 deploy stops in its effect probe, v2 loaded everywhere
    deploy = asyncio.create_task(env.manager.deploy("adapters/echo", version=2))
    await until(lambda: bool(env.calls("complete", "echo@v2")))
    load_gate = asyncio.Event()
    first.load_gates["other@v1"] = load_gate
    loads = len(env.calls("load", "other@v1"))
    reconcile = asyncio.create_task(env.reconciler.reconcile())  # observes echo@v2; desired says echo@v1
    await until(lambda: len(env.calls("load", "other@v1")) > loads)  # the round waits in that load
    assert not deploy.done()
    probe_gate.set()
    assert (await deploy).state == "READY"  # routed to v2, v1 unloaded
    load_gate.set()
    await reconcile
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v2", "other@v1"}] * 2
    assert (await env.generate("echo")).served_model == "echo@v2"
