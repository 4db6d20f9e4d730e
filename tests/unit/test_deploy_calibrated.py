"""A deploy of a calibrated serving shape: one greedy verify prompt per replica, the shape's measured latency
instead of a probe, the rest left to live traffic; and the checks every deploy reports.

At the VllmApi seam, as tests/unit/test_deploy.py: in-memory fake vLLM servers, real stores.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from support.fleet import MODEL, URLS, make_env, reason, run_async, until

from layercard.v1 import adapter_pb2
from layercard_client.cli.render import live_verdict_text
from layercard_service.api.adapter import adapter_to_proto, deployment_to_proto
from layercard_service.control.deployments import AdapterManager, DeploySettings
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.persistence.deployments import LatencyMeasurement, ServingShape
from layercard_service.serving.probes import EFFECT_PROMPTS, LATENCY_SAMPLES
from layercard_service.serving.vllm_api import Sampling

SHAPE = ServingShape(MODEL, ("o_proj", "q_proj"), 8, 8)  # support/fleet.py's SETTINGS, the default rank 8
PROBE_COMPLETIONS = 2 * (1 + LATENCY_SAMPLES)  # one warm-up and the interleaved pairs, base and adapter


def completions(env, served: str) -> int:
    """Completion calls on the adapter's served name and the base model while it was being deployed."""
    return len(env.calls("complete", served))


async def calibrate(env, probes: int = 3) -> None:
    """Deploys ``probes`` versions of "echo" with the full probe, which calibrates the shape."""
    for _ in range(probes):
        version = env.publish("echo")
        view = await env.manager.deploy("adapters/echo", version=version)
        assert view.latency.source == "probe"


@run_async
async def test_a_calibrated_shape_verifies_with_one_prompt_per_replica_and_takes_its_latency(env):
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.1
        fake.same_text = True  # the effect shows in log-probabilities only: the full probe takes every prompt
    await calibrate(env)
    # Each uncalibrated deploy ran the full effect probe on both replicas and the latency probe on one.
    assert completions(env, "echo@v1") == len(EFFECT_PROMPTS) * len(URLS) + PROBE_COMPLETIONS // 2
    assert env.store.shape_calibration(SHAPE, 3, 3600).samples == 3

    version = env.publish("echo")
    view = await env.manager.deploy("adapters/echo", version=version, max_overhead_fraction=0.2)
    served = f"echo@v{version}"
    assert view.state == "READY" and env.proxy.routes.served["echo"] == served
    assert completions(env, served) == len(URLS)  # one greedy prompt per replica, no latency probe
    assert view.latency.source == "calibration" and view.latency.samples == 3
    assert view.latency.overhead_fraction == pytest.approx(0.1)
    assert "median of the 3 newest latency probes" in view.latency.basis
    assert env.store.shape_calibration(SHAPE, 3, 3600).samples == 3  # a calibrated deploy adds no probe
    outcomes = [(c.name, c.outcome) for c in view.checks]
    assert outcomes == [
        ("compatibility", "PASSED"),
        ("replicas", "PASSED"),
        ("load", "PASSED"),
        ("effect", "PASSED"),
        ("effect", "PASSED"),
        ("latency", "SKIPPED"),
        ("budget", "PASSED"),
        ("live_latency", "PENDING"),
    ]
    assert [c.replica for c in view.checks if c.name == "effect"] == URLS
    assert "LayercardAdapterLiveOverheadOverBudget" in view.checks[-1].detail


@run_async
async def test_full_latency_probe_probes_a_calibrated_shape_and_adds_to_its_calibration(env):
    await calibrate(env)
    version = env.publish("echo")
    view = await env.manager.deploy("adapters/echo", version=version, full_latency_probe=True)
    assert view.latency.source == "probe"
    latency = next(c for c in view.checks if c.name == "latency")
    assert latency.outcome == "PASSED" and "full probe asked for" in latency.detail
    assert env.store.shape_calibration(SHAPE, 3, 3600).samples == 4
    assert not any(c.name == "live_latency" for c in view.checks)  # probed, and no budget


@run_async
async def test_another_rank_or_server_setting_is_another_shape(env):
    await calibrate(env)
    env.publish("wide", r=4)
    view = await env.manager.deploy("adapters/wide")
    assert view.latency.source == "probe"
    assert "not calibrated yet" in next(c.detail for c in view.checks if c.name == "latency")
    assert env.store.shape_calibration(ServingShape(MODEL, ("o_proj",), 8, 8), 3, 3600) is None
    assert env.store.shape_calibration(ServingShape(MODEL, ("o_proj", "q_proj"), 16, 8), 3, 3600) is None


@run_async
async def test_probes_older_than_the_limit_do_not_calibrate(env):
    await calibrate(env)
    strict = AdapterManager(env.fleet, env.proxy, env.jobs, env.store, DeploySettings(calibration_max_age_seconds=0.0))
    version = env.publish("echo")
    view = await strict.deploy("adapters/echo", version=version)
    assert view.latency.source == "probe"
    assert env.store.shape_calibration(SHAPE, 3, 3600, now=1e12) is None  # every probe far in the past by then


@run_async
async def test_a_calibrated_shape_over_the_budget_fails_before_the_route_moves(env):
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.5
    await calibrate(env)  # v1..v3, v3 serving
    version = env.publish("echo")
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", version=version, max_overhead_fraction=0.2)
    assert reason(err) == "SERVING_BUDGET_EXCEEDED"
    assert err.value.metadata["latency_source"] == "calibration"
    assert "serving shape's calibration" in err.value.message
    assert env.proxy.routes.served["echo"] == "echo@v3" and env.store.get("echo").version == 3
    assert [set(f.loaded) for f in env.replicas] == [{"echo@v3"}, {"echo@v3"}]

    forced = await env.manager.deploy("adapters/echo", version=version, max_overhead_fraction=0.2, force=True)
    budget = next(c for c in forced.checks if c.name == "budget")
    assert budget.outcome == "FAILED_FORCED" and budget.value == pytest.approx(0.5)


@run_async
async def test_a_calibrated_shape_still_catches_an_adapter_with_no_effect(env):
    await calibrate(env)
    version = env.publish("echo")
    env.replicas[0].no_effect.add(f"echo@v{version}")
    with pytest.raises(FailedPrecondition) as err:
        await env.manager.deploy("adapters/echo", version=version)
    assert reason(err) == "ADAPTER_HAS_NO_EFFECT" and "1 probe prompts" in err.value.message
    assert env.proxy.routes.served["echo"] == "echo@v3"


@run_async
async def test_checks_of_validate_only_and_of_a_live_version_and_their_contract(env):
    env.publish("echo")
    checked = await env.manager.deploy("adapters/echo", validate_only=True)
    assert [(c.name, c.outcome) for c in checked.checks] == [
        ("compatibility", "PASSED"),
        ("replicas", "PASSED"),
        ("load", "SKIPPED"),
    ]
    await env.manager.deploy("adapters/echo")
    again = await env.manager.deploy("adapters/echo", max_overhead_fraction=5.0)
    assert [(c.name, c.outcome) for c in again.checks][-2:] == [("load", "SKIPPED"), ("budget", "PASSED")]

    message = deployment_to_proto(again)
    assert [c.name for c in message.checks] == [c.name for c in again.checks]
    assert message.checks[-1].outcome == adapter_pb2.CHECK_OUTCOME_PASSED and message.checks[-1].HasField("value")
    assert message.latency.source == adapter_pb2.LATENCY_SOURCE_PROBE
    version = env.publish("echo")
    swapped = deployment_to_proto(await env.manager.deploy("adapters/echo", version=version))
    effect = [c for c in swapped.checks if c.name == "effect"]
    assert effect and all(c.replica and math.isinf(c.value) for c in effect)  # the fake's texts differ


def test_a_calibration_is_the_median_of_its_probes(tmp_path):
    from layercard_service.persistence.deployments import DeploymentStore

    store = DeploymentStore(tmp_path / "state.db")
    for fraction, base in ((0.1, 100.0), (0.3, 120.0), (0.2, 110.0)):
        m = LatencyMeasurement("http://r", 10.0, 11.0, 3.0, 3.3, fraction, 5, base, base * (1 + fraction), 32)
        store.add_measurement(SHAPE, "echo", 1, m)
    calibration = store.shape_calibration(SHAPE, 3, 3600)
    assert calibration.overhead_fraction == pytest.approx(0.2) and calibration.base_latency_ms == pytest.approx(110)
    assert (calibration.samples, calibration.tokens, calibration.source) == (3, 32, "calibration")
    assert store.shape_calibration(SHAPE, 4, 3600) is None
    store.close()


# --- live traffic -------------------------------------------------------------------------------------------
def live_env(tmp_path, window: float = 0.2, min_requests: int = 3):
    """The fleet env with a short live window; its manager replaces the default one."""
    env = make_env(tmp_path)
    settings = DeploySettings(drain_timeout_seconds=1.0, live_window_seconds=window, live_min_requests=min_requests)
    env.proxy.observers.clear()
    env.manager = AdapterManager(env.fleet, env.proxy, env.jobs, env.store, settings)
    return env


async def traffic(env, requests: int = 4) -> None:
    for _ in range(requests):
        await env.proxy.generate("hi", "", Sampling(max_tokens=4))
        await env.proxy.generate("hi", "echo", Sampling(max_tokens=4))


@run_async
async def test_over_budget_on_live_traffic_rolls_back_to_the_version_before(tmp_path):
    env = live_env(tmp_path)
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=1)
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.1  # the probe sees +10%: within the budget of 20%
    view = await env.manager.deploy("adapters/echo", version=2, max_overhead_fraction=0.2, rollback_over_budget=True)
    live = view.checks[-1]
    assert (live.name, live.outcome) == ("live_latency", "PENDING") and "rolled back to version 1" in live.detail
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.5  # then live traffic runs +50%
    await traffic(env)
    await until(lambda: "echo" in env.manager.live.verdicts, timeout=5)
    verdict = env.manager.live.verdicts["echo"]
    assert verdict.outcome == "over" and verdict.overhead_fraction == pytest.approx(0.5)
    await until(lambda: env.proxy.routes.served.get("echo") == "echo@v1", timeout=5)
    assert env.store.get("echo").version == 1 and env.store.get("echo").budget == 0.2
    await until(lambda: all(set(f.loaded) == {"echo@v1"} for f in env.replicas), timeout=5)
    # The adapter's listing says why version 1 serves again, in the API and in the CLI.
    (listed,), _ = await env.manager.list(10, "")
    message = adapter_to_proto(listed)
    assert message.deployment.version == 1 and message.live_verdict.version == 2
    assert message.live_verdict.outcome == adapter_pb2.LIVE_OUTCOME_OVER and message.live_verdict.budget == 0.2
    assert message.live_verdict.overhead_fraction == pytest.approx(0.5) and message.live_verdict.base_requests == 4
    assert live_verdict_text(message.live_verdict) == "v2 over: +50.0% > 20%"


@run_async
async def test_a_first_version_over_budget_live_is_undeployed_and_within_budget_stays(tmp_path):
    env = live_env(tmp_path)
    env.publish("echo")
    view = await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2, rollback_over_budget=True)
    assert "undeployed" in view.checks[-1].detail
    await traffic(env)  # +0%: within
    await until(lambda: "echo" in env.manager.live.verdicts, timeout=5)
    assert env.manager.live.verdicts["echo"].outcome == "within"
    assert env.proxy.routes.served["echo"] == "echo@v1"

    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=2, max_overhead_fraction=0.2, rollback_over_budget=True)
    await env.manager.undeploy("adapters/echo")  # ends the watch: no verdict, nothing to roll back
    await traffic(env, 0)
    await asyncio.sleep(0.4)
    assert env.manager.live.verdicts["echo"].version == 1 and env.store.get("echo") is None


@run_async
async def test_too_little_live_traffic_is_inconclusive_and_changes_nothing(tmp_path):
    env = live_env(tmp_path, min_requests=50)
    env.publish("echo")
    for fake in env.replicas:
        fake.adapter_latency_factor = 1.1
    await env.manager.deploy("adapters/echo", max_overhead_fraction=0.2, rollback_over_budget=True)
    for fake in env.replicas:
        fake.adapter_latency_factor = 2.0
    await traffic(env)
    await until(lambda: "echo" in env.manager.live.verdicts, timeout=5)
    verdict = env.manager.live.verdicts["echo"]
    assert verdict.outcome == "inconclusive" and verdict.overhead_fraction is None
    assert "needs 50 of each" in verdict.detail
    (listed,), _ = await env.manager.list(10, "")
    message = adapter_to_proto(listed).live_verdict
    assert message.outcome == adapter_pb2.LIVE_OUTCOME_INCONCLUSIVE and not message.HasField("overhead_fraction")
    assert live_verdict_text(message) == "v1 inconclusive"
    assert env.proxy.routes.served["echo"] == "echo@v1"


@run_async
async def test_rollback_needs_a_budget(env):
    env.publish("echo")
    with pytest.raises(InvalidArgument) as err:
        await env.manager.deploy("adapters/echo", rollback_over_budget=True)
    assert err.value.violations[0].field == "rollback_over_budget"
    assert env.log == []


def test_rank_calibrations_are_per_rank_on_one_server_shape(tmp_path):
    from layercard_service.persistence.deployments import DeploymentStore

    store = DeploymentStore(tmp_path / "state.db")
    for rank, fraction in ((4, 0.1), (4, 0.3), (8, 0.5)):
        m = LatencyMeasurement("http://r", 10.0, 11.0, 3.0, 3.3, fraction, 5, 100.0, 100.0 * (1 + fraction), 32)
        store.add_measurement(ServingShape(MODEL, ("o_proj",), 8, rank), "echo", 1, m)
    other = LatencyMeasurement("http://r", 10.0, 11.0, 3.0, 3.3, 9.0, 5)
    store.add_measurement(ServingShape(MODEL, (), 8, 4), "echo", 1, other)  # another server shape
    by_rank = store.rank_calibrations(MODEL, ("o_proj",), 8)
    assert sorted(by_rank) == [4, 8]
    assert by_rank[4].overhead_fraction == pytest.approx(0.2) and by_rank[4].samples == 2
    assert by_rank[4].base_ms_per_token == pytest.approx(3.0) and "rank-4 adapters" in by_rank[4].basis
    assert store.rank_calibrations(MODEL, ("q_proj",), 8) == {}
    store.close()
