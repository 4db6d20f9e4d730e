"""Serving pools: the settings that name them, deploys that choose one, reconcile and routes held to each pool.

Two pools over the fake vLLM servers of support/fleet.py: "lean" (vllm-0, wrapping o_proj) and "full" (vllm-1,
wrapping every module). The planner's side (plans across pools) is in test_vllm_steering.py.
"""

from __future__ import annotations

import asyncio

import pytest
from support.fleet import MODEL, URLS, Env, make_env, reason, run_async, until

from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.control.deployments import AdapterManager, DeploySettings
from layercard_service.control.reconcile import Reconciler
from layercard_service.errors import FailedPrecondition, InvalidArgument, Unavailable
from layercard_service.serving.fleet import Fleet, FleetSettings, Pools, StaticDiscovery
from layercard_service.serving.inference import InferenceProxy, Routes
from layercard_service.serving.pool_spec import PoolSpec, parse_pools
from layercard_service.serving.vllm_api import Sampling

LEAN, FULL = URLS


# --- settings ----------------------------------------------------------------------------------------------------
def test_pools_are_read_from_json_and_take_the_service_rank_where_they_name_none():
    config = ServiceConfig.load(
        ["--vllm-pools", '[{"name": "lean", "dns": "vllm-lean:8000", "target_modules": ["o_proj"]},'
                         ' {"name": "full", "urls": ["http://vllm:8000/"], "max_lora_rank": 16}]',
         "--max-lora-rank", "8"],
        environ={},
    )  # fmt: skip
    assert config.serving_pools() == (
        PoolSpec("lean", (), "vllm-lean:8000", ("o_proj",), 8),
        PoolSpec("full", ("http://vllm:8000",), "", (), 16),
    )


def test_without_pools_the_fleet_is_one_default_pool():
    config = ServiceConfig(vllm_urls=("http://a:8000",), vllm_lora_target_modules=("o_proj",), max_lora_rank=4)
    assert config.serving_pools() == (PoolSpec("default", ("http://a:8000",), "", ("o_proj",), 4),)


@pytest.mark.parametrize(
    "text, says",
    [
        ("not json", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('{"name": "a"}', "non-empty JSON list"),
        ('["a"]', "must be a JSON object"),
        ('[{"urls": ["http://a:1"]}]', "needs a name"),
        ('[{"name": "Lean", "urls": ["http://a:1"]}]', "DNS label"),
        ('[{"name": "a"}]', "needs urls or dns"),
        ('[{"name": "a", "urls": ["ftp://a"]}]', "http(s) URLs"),
        ('[{"name": "a", "dns": "nohost"}]', "host:port"),
        ('[{"name": "a", "urls": "http://a:1"}]', "list of non-empty strings"),
        ('[{"name": "a", "urls": ["http://a:1"], "max_lora_rank": 0}]', "integer >= 1"),
        ('[{"name": "a", "urls": ["http://a:1"], "max_lora_rank": true}]', "integer >= 1"),
        ('[{"name": "a", "urls": ["http://a:1"], "modules": []}]', "unknown keys modules"),
        ('[{"name": "a", "urls": ["http://a:1"]}, {"name": "a", "dns": "b:1"}]', "a repeats"),
    ],
)
def test_bad_pool_settings_are_refused_naming_what_is_wrong(text, says):
    with pytest.raises(ConfigError) as err:
        parse_pools(text)
    assert says in str(err.value)


def test_pools_and_the_single_pool_settings_do_not_mix():
    with pytest.raises(ConfigError, match="leave vllm_urls, vllm_dns and vllm_lora_target_modules unset"):
        ServiceConfig.load(["--vllm-pools", '[{"name": "a", "dns": "a:1"}]', "--vllm-dns", "b:1"], environ={})


# --- deploys and reconcile over two pools ------------------------------------------------------------------------
def two_pools(tmp_path) -> tuple[Env, AdapterManager, Reconciler]:
    env = make_env(tmp_path)

    def pool(url: str, name: str, modules: tuple[str, ...]) -> Fleet:
        settings = FleetSettings(MODEL, 8, modules, name)
        return Fleet(StaticDiscovery([url]), settings, connect=lambda u: env.fakes[u], initial=[url])

    pools = Pools([pool(LEAN, "lean", ("o_proj",)), pool(FULL, "full", ())])
    proxy = InferenceProxy(pools.members, Routes(), pool_of=pools.pool_name)  # as core.py builds it
    manager = AdapterManager(pools, proxy, env.jobs, env.store, DeploySettings(drain_timeout_seconds=1.0))
    env.fakes[LEAN].adapter_latency_factor, env.fakes[FULL].adapter_latency_factor = 1.1, 1.7
    return env, manager, Reconciler(manager, 1.0)


@run_async
async def test_each_request_is_recorded_with_the_pool_that_answered(tmp_path):
    """The pool goes into the inference metrics and the live judge: a version compares with its own pool's base."""
    _, manager, _ = two_pools(tmp_path)
    records = []
    manager.proxy.observers.append(records.append)
    for _ in range(2):  # base requests take turns over both pools' replicas
        await manager.proxy.generate("hi", "", Sampling(max_tokens=4))
    assert sorted((r.replica, r.pool) for r in records) == sorted([(LEAN, "lean"), (FULL, "full")])
    assert manager.fleet.pool_name("http://gone:8000") == ""


@run_async
async def test_an_adapter_goes_to_the_one_pool_that_can_serve_it_and_only_there(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("wide", target_modules=["o_proj", "q_proj"])  # the lean pool does not wrap q_proj
    view = await manager.deploy("adapters/wide")
    assert view.pool == "full" and [r.replica for r in view.replicas] == [FULL]
    assert "wide@v1" in env.fakes[FULL].loaded and not env.fakes[LEAN].loaded
    assert manager.store.get("wide").pool == "full"
    assert any(c.name == "pool" and "the only pool that can serve it" in c.detail for c in view.checks)
    with pytest.raises(FailedPrecondition) as err:  # named outright, the lean pool's problem is the answer
        await manager.deploy("adapters/wide", pool="lean")
    assert (
        reason(err) == "ADAPTER_INCOMPATIBLE" and "do not wrap" in err.value.message and "q_proj" in err.value.message
    )
    assert manager.store.get("wide").pool == "full" and "wide@v1" in env.fakes[FULL].loaded  # nothing changed


@run_async
async def test_a_pool_that_does_not_exist_is_invalid_and_changes_nothing(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("bot")
    with pytest.raises(InvalidArgument) as err:
        await manager.deploy("adapters/bot", pool="gpu")
    assert err.value.message.startswith("pool: ") and "the pools are lean, full" in err.value.message
    assert manager.store.get("bot") is None and not env.calls("load")


@run_async
async def test_with_several_servable_pools_the_plan_then_the_measured_cheapest_chooses(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("planned", serving_pool="full")  # o_proj only: either pool serves it; its plan chose full
    assert (await manager.deploy("adapters/planned")).pool == "full"
    env.publish("free")  # no plan: the leanest pool that serves it, whatever the other pool has measured
    first = await manager.deploy("adapters/free")
    assert first.pool == "lean" and "leanest pool" in next(c.detail for c in first.checks if c.name == "pool")
    assert first.latency.overhead_fraction == pytest.approx(0.1, abs=0.02)
    # A new version stays on the pool it is deployed to, unless the request names another.
    env.publish("planned")
    assert (await manager.deploy("adapters/planned", version=2)).pool == "full"
    moved = await manager.deploy("adapters/planned", version=2, pool="lean")
    assert moved.pool == "lean" and "planned@v2" in env.fakes[LEAN].loaded
    assert not any(n.startswith("planned@") for n in env.fakes[FULL].loaded)  # left the full pool entirely


@run_async
async def test_reconcile_holds_each_replica_to_its_own_pool(tmp_path):
    env, manager, reconciler = two_pools(tmp_path)
    env.publish("bot")
    await manager.deploy("adapters/bot", pool="lean")
    env.fakes[LEAN].loaded.clear()  # the lean replica restarted
    env.fakes[FULL].loaded["bot@v1"] = "/somewhere"  # and a stray copy sits on the full pool
    states = await reconciler.reconcile()
    assert states == {"bot": "READY"}
    assert "bot@v1" in env.fakes[LEAN].loaded and "bot@v1" not in env.fakes[FULL].loaded
    env.fakes[LEAN].down = True  # the adapter's whole pool is down: degraded, even though full answers
    assert (await reconciler.reconcile()) == {"bot": "DEGRADED"}
    assert "bot@v1" not in env.fakes[FULL].loaded


@run_async
async def test_a_deployment_whose_pool_left_the_configuration_is_degraded_and_keeps_its_copies(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("bot")
    await manager.deploy("adapters/bot", pool="lean")
    lean_only = Pools([next(p for p in manager.fleet if p.settings.pool == "lean")])
    renamed = AdapterManager(
        Pools([Fleet(StaticDiscovery([FULL]), FleetSettings(MODEL, 8, (), "full"), connect=lambda u: env.fakes[u],
                     initial=[FULL])]),
        InferenceProxy(lean_only.members, Routes()),
        env.jobs,
        env.store,
    )  # fmt: skip
    env.fakes[FULL].loaded["bot@v1"] = "/somewhere"  # as after a switch to --vllm-pools over the same servers
    assert (await Reconciler(renamed, 1.0).reconcile()) == {"bot": "DEGRADED"}
    assert "bot@v1" in env.fakes[FULL].loaded  # its pool is gone, not elsewhere: the copy keeps serving
    # Redeploying puts it where it can be served now, and the record follows.
    view = await renamed.deploy("adapters/bot")
    assert view.pool == "full" and renamed.store.get("bot").pool == "full"
    assert (await Reconciler(renamed, 1.0).reconcile()) == {"bot": "READY"}


@run_async
async def test_requests_for_a_pools_adapter_reach_only_that_pools_replicas(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("bot")
    await manager.deploy("adapters/bot", pool="full")
    for _ in range(4):
        generated = await manager.proxy.generate("hi", "bot", _sampling())
        assert generated.replica == FULL
    replicas = {(await manager.proxy.generate("hi", "", _sampling())).replica for _ in range(4)}
    assert replicas == {LEAN, FULL}  # the base model is served by every pool


def _sampling():
    from layercard_service.serving.vllm_api import Sampling

    return Sampling(max_tokens=4)


@run_async
async def test_moving_a_version_to_another_pool_lets_its_requests_there_finish(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("bot")
    await manager.deploy("adapters/bot", pool="full")
    env.fakes[FULL].gates["bot@v1"] = gate = asyncio.Event()
    request = asyncio.create_task(manager.proxy.generate("hi", "bot", _sampling()))
    await until(lambda: manager.proxy.in_flight_at[(FULL, "bot@v1")] == 1)
    move = asyncio.create_task(manager.deploy("adapters/bot", pool="lean"))
    await until(lambda: "bot@v1" in env.fakes[LEAN].loaded)
    await asyncio.sleep(0.05)
    assert "bot@v1" in env.fakes[FULL].loaded and not move.done()  # held until the request on full ends
    gate.set()
    assert (await request).replica == FULL
    assert (await move).pool == "lean" and "bot@v1" not in env.fakes[FULL].loaded


@run_async
async def test_a_redeploy_of_the_version_in_place_stays_on_its_pool_and_a_move_is_rolled_back_there(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    env.publish("bot", serving_pool="lean")
    await manager.deploy("adapters/bot", pool="full")  # moved off the plan's pool by hand
    assert (await manager.deploy("adapters/bot")).pool == "full"  # deploying it again does not move it back
    view = await manager.deploy("adapters/bot", pool="lean", max_overhead_fraction=0.5, rollback_over_budget=True)
    live = next(c for c in view.checks if c.name == "live_latency")
    assert "rolled back to version 1" in live.detail  # its place on the full pool, not an undeploy
    assert manager.live._watches["bot"].previous_pool == "full"


@run_async
async def test_without_a_plan_a_pool_with_no_replica_goes_last(tmp_path):
    env, manager, _ = two_pools(tmp_path)
    lean = manager.fleet.get("lean")
    lean.discovery = StaticDiscovery([])  # the lean pool scaled to zero
    await lean.refresh()
    env.publish("bot")
    view = await manager.deploy("adapters/bot")
    assert view.pool == "full" and "bot@v1" in env.fakes[FULL].loaded


@run_async
async def test_a_failed_probe_at_several_streams_does_not_fail_the_deploy(tmp_path, monkeypatch):
    import layercard_service.control.deployments as deployments

    env, manager, _ = two_pools(tmp_path)
    manager.settings = DeploySettings(drain_timeout_seconds=1.0, probe_concurrency=(4,))
    real = deployments.measure_latency

    async def flaky(*args, concurrency: int = 1, **kwargs):
        if concurrency > 1:
            raise Unavailable("gone", reason="VLLM_UNAVAILABLE")
        return await real(*args, concurrency=concurrency, **kwargs)

    monkeypatch.setattr(deployments, "measure_latency", flaky)
    env.publish("bot")
    view = await manager.deploy("adapters/bot", pool="lean")
    skipped = next(c for c in view.checks if c.name == "latency_4_streams")
    assert skipped.outcome == "SKIPPED" and "probe failed" in skipped.detail
    assert view.state == "READY" and view.latency.concurrency == 1


def test_one_replica_in_two_pools_is_refused():
    with pytest.raises(ConfigError, match="in two pools"):
        parse_pools('[{"name": "a", "urls": ["http://x:1"]}, {"name": "b", "urls": ["http://x:1/"]}]')
