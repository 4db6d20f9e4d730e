"""Deploying an adapter version into the fleet: load, verify (effect and latency probes), route; what is
refused before any call; and the deploy measurements the planner calibrates from.

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.fleet import ADAPTER_CONFIG, MODEL, URLS, make_env, reason, run_async

from layercard.v1 import adapter_pb2
from layercard_service.api.adapter import deployment_to_proto
from layercard_service.control.deployments import AdapterManager
from layercard_service.control.planning.planner import PlacementPlanner, calibrated
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from layercard_service.persistence.deployments import DeploymentStore, LatencyMeasurement, ServingShape
from layercard_service.serving.fleet import Fleet, FleetSettings, StaticDiscovery
from layercard_service.serving.inference import InferenceProxy


@run_async
async def test_deploy_loads_verifies_and_routes_on_every_replica(env):
    env.publish("echo")
    view = await env.manager.deploy("adapters/echo")
    assert (view.version, view.state, view.served_name) == (1, "READY", "echo@v1")
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert all(r.healthy and r.desired_loaded for r in view.replicas)
    assert view.latency is not None and view.latency.samples > 0
    assert env.store.get("echo").state == "READY"
    # the effect probe compared adapter and base on every replica before the route moved
    assert {e[1] for e in env.calls("complete", "echo@v1") if e[3] is None} == set(URLS)
    for _ in URLS:  # both replicas, in turn
        generated = await env.generate("echo")
        assert generated.served_model == "echo@v1"
        assert generated.completion.text.startswith("[echo@v1]")


@run_async
async def test_a_replica_down_at_deploy_time_degrades_and_reconcile_completes_it(env):
    env.publish("echo")
    down = env.replicas[1]
    down.down = True
    view = await env.manager.deploy("adapters/echo")
    assert view.state == "DEGRADED"
    assert set(env.replicas[0].loaded) == {"echo@v1"} and not down.loaded
    assert [(r.replica, r.healthy, r.desired_loaded) for r in view.replicas] == [
        (URLS[0], True, True),
        (URLS[1], False, False),
    ]
    assert env.store.get("echo").state == "DEGRADED"
    assert (await env.generate("echo")).served_model == "echo@v1"  # the healthy replica serves it

    down.down = False
    assert await env.reconciler.reconcile() == {"echo": "READY"}
    assert set(down.loaded) == {"echo@v1"}
    assert env.store.get("echo").state == "READY"


@run_async
async def test_a_replica_that_stops_answering_during_the_load_degrades_the_deploy(env):
    env.publish("echo")
    env.replicas[1].load_error = Unavailable("connection reset", reason="VLLM_UNAVAILABLE")
    view = await env.manager.deploy("adapters/echo")
    assert view.state == "DEGRADED"
    assert set(env.replicas[0].loaded) == {"echo@v1"}
    assert env.proxy.routes.served["echo"] == "echo@v1"


@run_async
async def test_a_refused_load_fails_and_unloads_the_new_version_where_it_loaded(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    env.replicas[1].load_error = InvalidArgument("invalid adapter weights")
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", version=2)
    assert reason(err) == "ADAPTER_LOAD_FAILED"
    assert err.value.metadata == {"replica": URLS[1], "served_name": "echo@v2"}
    assert "invalid adapter weights" in err.value.message
    assert [e[1] for e in env.calls("unload", "echo@v2")] == [URLS[0]]  # the replica that took it
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert env.proxy.routes.served["echo"] == "echo@v1" and env.store.get("echo").version == 1
    assert (await env.generate("echo")).served_model == "echo@v1"


@run_async
async def test_runtime_loading_disabled_keeps_its_own_reason(env):
    env.publish("echo")
    env.replicas[0].load_error = FailedPrecondition("start vLLM with the flag", reason="RUNTIME_LORA_DISABLED")
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo")
    assert reason(err) == "RUNTIME_LORA_DISABLED"
    assert all(not f.loaded for f in env.replicas) and env.store.get("echo") is None


@run_async
async def test_an_adapter_with_no_effect_is_rolled_back(env):
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    env.replicas[1].no_effect.add("echo@v2")  # on one replica only: still a failed deploy
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", version=2)
    assert reason(err) == "ADAPTER_HAS_NO_EFFECT"
    assert err.value.metadata["replica"] == URLS[1]
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v1"}, {"echo@v1"}]
    assert env.proxy.routes.served["echo"] == "echo@v1"


@run_async
async def test_a_first_deploy_with_no_effect_leaves_the_adapter_unserved(env):
    env.publish("inert")
    for fake in env.replicas:
        fake.no_effect.add("inert@v1")
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/inert")
    assert reason(err) == "ADAPTER_HAS_NO_EFFECT"
    assert all(not f.loaded for f in env.replicas)
    assert env.store.get("inert") is None and "inert" not in env.proxy.routes.served
    with pytest.raises(NotFound):
        await env.generate("inert")


@run_async
async def test_latency_budget_fails_unless_forced_and_is_measured_either_way(env):
    env.publish("echo")
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.5  # +50 %
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2)
    assert reason(err) == "SERVING_BUDGET_EXCEEDED"
    assert err.value.metadata["overhead_fraction"] == "0.5000"
    assert err.value.metadata["max_overhead_fraction"] == "0.2000"
    assert all(not f.loaded for f in env.replicas) and env.store.get("echo") is None
    calibration = env.store.calibration(MODEL)
    assert calibration is not None and calibration.overhead_fraction == pytest.approx(0.5)

    view = await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2, force=True)
    assert view.state == "READY" and view.latency.overhead_fraction == pytest.approx(0.5)
    assert view.latency.adapter_latency_ms == pytest.approx(1.5 * view.latency.base_latency_ms)
    assert env.store.calibration(MODEL).samples == 2
    assert env.store.get("echo").latency.overhead_fraction == pytest.approx(0.5)


@run_async
async def test_within_budget_deploys_without_force(env):
    env.publish("echo")
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.1
    view = await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2)
    assert view.state == "READY" and view.latency.overhead_fraction == pytest.approx(0.1)


@run_async
async def test_bad_deploy_arguments_are_invalid_before_any_call(env):
    env.publish("echo")
    bad = [
        ({"adapter_name": "echo"}, "adapter"),
        ({"adapter_name": "adapters/"}, "adapter"),
        ({"adapter_name": "adapters/Echo"}, "adapter"),
        ({"adapter_name": "adapters/echo/versions/1"}, "adapter"),
        ({"version": -1}, "version"),
        ({"max_overhead_fraction": -0.5}, "max_overhead_fraction"),
        ({"max_overhead_fraction": math.nan}, "max_overhead_fraction"),
    ]
    for kwargs, field in bad:
        with pytest.raises(InvalidArgument) as err:
            await env.manager.deploy(**{"adapter_name": "adapters/echo", **kwargs})
        assert [v.field for v in err.value.violations] == [field], kwargs
    assert env.log == []


@run_async
async def test_an_artifact_linking_out_of_its_folder_is_refused_before_any_load(env, tmp_path):
    env.publish("echo")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({**ADAPTER_CONFIG, "note": "secret"}))
    artifact = Path(env.jobs.versions("echo")[0].path)
    (artifact / "adapter_config.json").unlink()
    (artifact / "adapter_config.json").symlink_to(outside)  # vLLM would read it through the link
    with pytest.raises(PermissionDenied) as err:
        await env.manager.deploy("adapters/echo")
    assert reason(err) == "PATH_OUTSIDE_ROOTS" and err.value.metadata["resolved_path"] == str(outside)
    assert not env.calls("load")


@run_async
async def test_unknown_adapter_or_version_is_not_found(env):
    env.publish("echo")
    with pytest.raises(NotFound) as err:
        await env.manager.deploy("adapters/nope")
    assert reason(err) == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        await env.manager.deploy("adapters/echo", version=2)
    assert reason(err) == "VERSION_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        await env.manager.undeploy("adapters/nope")
    assert reason(err) == "ADAPTER_NOT_FOUND"
    assert env.log == []


@run_async
async def test_deploying_the_current_version_again_loads_nothing(env):
    env.publish("echo")
    first = await env.manager.deploy("adapters/echo")
    loads = len(env.calls("load"))
    again = await env.manager.deploy("adapters/echo", version=1)
    assert len(env.calls("load")) == loads
    assert (again.version, again.state) == (1, "READY")
    assert again.latency == first.latency


@run_async
async def test_the_live_version_is_held_to_a_budget_asked_for_again(env):
    env.publish("echo")
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.5
    await env.manager.deploy("adapters/echo")
    loads = len(env.calls("load"))
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2)
    assert reason(err) == "SERVING_BUDGET_EXCEEDED" and "is live with 50%" in err.value.message
    assert len(env.calls("load")) == loads and env.store.get("echo").version == 1  # nothing changed
    forced = await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2, force=True)
    assert forced.state == "READY"


@run_async
async def test_deploying_the_current_version_again_loads_it_where_it_is_missing(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    env.replicas[1].loaded.clear()  # restarted
    before = len(env.log)
    view = await env.manager.deploy("adapters/echo")
    assert [e[1] for e in env.log[before:] if e[0] == "load"] == [URLS[1]]
    assert view.state == "READY" and set(env.replicas[1].loaded) == {"echo@v1"}


@run_async
async def test_deploying_the_current_version_again_with_a_replica_down_stays_degraded(env):
    env.publish("echo")
    env.replicas[1].down = True
    assert (await env.manager.deploy("adapters/echo")).state == "DEGRADED"
    again = await env.manager.deploy("adapters/echo")
    assert again.state == "DEGRADED"


@run_async
async def test_validate_only_loads_nothing(env):
    env.publish("echo")
    view = await env.manager.deploy("adapters/echo", validate_only=True)
    assert view.state == "" and view.version == 1 and view.latency is None
    assert {e[0] for e in env.log} == {"models"}
    assert env.store.get("echo") is None and all(not f.loaded for f in env.replicas)
    assert "echo" not in env.proxy.routes.served


@run_async
async def test_deployment_views_convert_to_the_contract(env):
    env.publish("echo")
    checked = deployment_to_proto(await env.manager.deploy("adapters/echo", validate_only=True))
    assert checked.state == adapter_pb2.DEPLOYMENT_STATE_UNSPECIFIED and not checked.HasField("latency")
    deployed = deployment_to_proto(await env.manager.deploy("adapters/echo"))
    assert (deployed.adapter, deployed.version, deployed.served_name) == ("adapters/echo", 1, "echo@v1")
    assert deployed.state == adapter_pb2.DEPLOYMENT_STATE_READY
    assert deployed.latency.samples > 0 and deployed.latency.replica == URLS[0]
    assert [(r.replica, r.desired_loaded, list(r.observed_adapters)) for r in deployed.replicas] == [
        (u, True, ["echo@v1"]) for u in URLS
    ]
    assert list(deployed.replicas[0].lora_target_modules) == ["o_proj", "q_proj"]
    assert deployed.update_time.seconds > 0


@pytest.mark.parametrize(
    ("model", "config", "words"),
    [
        (MODEL, {"r": 16}, "rank 16"),
        ("x/other", {}, "'x/other'"),
        (MODEL, {"target_modules": ["o_proj", "gate_proj"]}, "gate_proj"),
        (MODEL, {"bias": "all"}, "bias"),
    ],
)
@run_async
async def test_an_incompatible_adapter_fails_before_any_call(env, model, config, words):
    env.publish("echo", model=model, **config)
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo")
    assert reason(err) == "ADAPTER_INCOMPATIBLE"
    assert words in err.value.message
    with pytest.raises(FailedPrecondition):
        await env.manager.deploy("adapters/echo", validate_only=True)
    assert env.log == []


@run_async
async def test_no_servers_is_a_failed_precondition_and_all_down_is_unavailable(tmp_path):
    env = make_env(tmp_path)
    env.publish("echo")
    for fake in env.replicas:
        fake.down = True
    with pytest.raises(Unavailable) as err:
        await env.manager.deploy("adapters/echo")
    assert reason(err) == "VLLM_UNAVAILABLE" and err.value.retry_after

    empty = Fleet(StaticDiscovery([]), FleetSettings(MODEL, 8))
    manager = AdapterManager(empty, InferenceProxy(empty.members), env.jobs, env.store)
    with pytest.raises(FailedPrecondition) as err:
        await manager.deploy("adapters/echo")
    assert reason(err) == "NO_VLLM_SERVERS"


def _measurement(fraction: float) -> LatencyMeasurement:
    return LatencyMeasurement("http://vllm-0:8000", 10.0, 11.0, 1.0, 1.1, fraction, 5)


def test_the_planner_takes_the_median_measured_vllm_overhead(tmp_path):
    from test_planner import GAINS, make_card  # the synthetic cards of the planner's own tests

    store = DeploymentStore(tmp_path / "state.db")
    for fraction in (0.5, 0.1, 0.3):
        store.add_measurement(ServingShape(MODEL, ("o_proj",), 8, 8), "echo", 1, _measurement(fraction))
    store.add_measurement(ServingShape("other/model", (), 8, 8), "echo", 1, _measurement(5.0))
    calibration = store.calibration(MODEL)
    assert (calibration.overhead_fraction, calibration.samples) == (pytest.approx(0.3), 3)
    assert store.calibration("never/deployed") is None

    card = make_card(GAINS)
    assert card.serving_cost.vllm_overhead_fraction is None
    assert calibrated(card, calibration).serving_cost.vllm_overhead_fraction == pytest.approx(0.3)
    assert calibrated(card, None) is card

    class Cards:  # the one method the planner reads
        def get(self, name):
            return type("Stored", (), {"card": card, "name": name})()

    request = PlanRequest(budget=BudgetSpec(max_serving_overhead_fraction=0.35))
    plan = PlacementPlanner(Cards(), serving_calibration=store.calibration).plan("layerCards/c", request)
    assert plan.serving_overhead_fraction.value == pytest.approx(0.3)
    assert "post-deploy probes" in plan.serving_overhead_fraction.basis
    # A budget in ms per token on vLLM is the overhead times vLLM's own measured base time (1.0 ms here).
    assert calibration.base_ms_per_token == pytest.approx(1.0)
    per_token = PlanRequest(budget=BudgetSpec(max_serving_overhead_ms_per_token=0.35))
    plan = PlacementPlanner(Cards(), serving_calibration=store.calibration).plan("layerCards/c", per_token)
    assert plan.serving_overhead_ms_per_token.value == pytest.approx(0.3 * 1.0)
    assert "measured base inter-token time" in plan.serving_overhead_ms_per_token.basis
    with pytest.raises(FailedPrecondition) as err:  # nothing measured on this model's fleet yet
        PlacementPlanner(Cards(), serving_calibration=lambda _model: None).plan("layerCards/c", request)
    assert reason(err) == "SERVING_COST_UNKNOWN"
    store.close()
