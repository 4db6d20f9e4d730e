"""AdapterManager, Fleet and the inference proxy at the VllmApi seam: in-memory fake vLLM servers, real stores.

Each ``FakeVllm`` keeps the adapters it has loaded and appends every call to one log shared by the fleet, with
the route of the adapter under test at the time of the call, so the order of a version swap (load, route,
drain, unload) can be read back. The latency a fake reports is made up, not slept: the probes only read it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.adapters import publish_version

from layercard.v1 import adapter_pb2
from layercard_service import store as paging
from layercard_service.api import adapter as adapter_api
from layercard_service.api.adapter import deployment_to_proto
from layercard_service.api.paging import ProtoPage
from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LayercardError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from layercard_service.plan.planner import PlacementPlanner, calibrated
from layercard_service.plan.types import BudgetSpec, PlanRequest
from layercard_service.serve.adapters import AdapterManager, DeploySettings
from layercard_service.serve.deploy_store import DeploymentRecord, DeploymentStore, LatencyMeasurement
from layercard_service.serve.fleet import Discovery, DnsDiscovery, Fleet, FleetSettings, StaticDiscovery
from layercard_service.serve.inference import InferenceProxy, Routes
from layercard_service.serve.reconcile import Reconciler
from layercard_service.serve.vllm_api import Completion, CompletionChunk, Sampling, ServedModel, VllmApi
from layercard_service.telemetry import RequestRecord, Telemetry
from layercard_service.tune.job_store import JobStore

BASE = "base-model"
MODEL = "builtin:tiny"
ADAPTER_CONFIG = {"r": 8, "peft_type": "LORA", "target_modules": ["o_proj"], "bias": "none"}
BASE_LATENCY = 0.1  # seconds a fake reports for one base-model completion


def run_async(test):
    """Runs an ``async def`` test body in a fresh event loop (the project does not use pytest-asyncio)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return wrapper


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- the fake vLLM server ------------------------------------------------------------------------------------
class FakeVllm(VllmApi):
    """One vLLM server in memory. The switches below make it misbehave the ways the deploy must handle."""

    def __init__(self, url: str, log: list[tuple]) -> None:
        self.url = url
        self.log = log  # (call, url, served name, route of the watched adapter at that moment)
        self.route: Callable[[], str | None] = lambda: None
        self.loaded: dict[str, str] = {}  # served name -> path
        self.down = False  # every call raises Unavailable
        self.hang = False  # models() never answers
        self.models_error: Exception | None = None  # models() raises it (HttpVllmApi: ValueError on a non-JSON body)
        self.load_error: LayercardError | None = None  # load_adapter raises it (after logging the call)
        self.no_effect: set[str] = set()  # served names that answer exactly like the base model
        self.adapter_latency_factor = 1.0  # adapter completions report this times the base latency
        self.gates: dict[str, asyncio.Event] = {}  # completions on a served name wait for its event
        self.load_gates: dict[str, asyncio.Event] = {}  # loads of a served name wait for its event

    def _call(self, call: str, name: str = "") -> None:
        if self.down:
            raise Unavailable(f"{self.url} is down", reason="VLLM_UNAVAILABLE", retry_after=1.0)
        self.log.append((call, self.url, name, self.route()))

    async def models(self, timeout: float | None = None) -> list[ServedModel]:
        if self.hang:
            await asyncio.Event().wait()
        self._call("models")
        if self.models_error is not None:
            raise self.models_error
        return [ServedModel(BASE, None), *(ServedModel(n, BASE, p) for n, p in self.loaded.items())]

    async def complete(self, model: str, prompt: str, sampling: Sampling) -> Completion:
        self._call("complete", model)
        if model != BASE and model not in self.loaded:
            raise NotFound(f"{self.url} does not serve {model!r}", reason="MODEL_NOT_SERVED")
        if model in self.gates:
            await self.gates[model].wait()
        self.log.append(("completed", self.url, model, self.route()))
        adapted = model != BASE and model not in self.no_effect
        tokens = sampling.max_tokens
        logprobs = tuple(-0.5 if adapted else -1.0 for _ in range(tokens)) if sampling.logprobs else ()
        latency = BASE_LATENCY * (self.adapter_latency_factor if model != BASE else 1.0)
        text = f"[{model}] {prompt}" if adapted else f"[base] {prompt}"
        return Completion(text, "length", len(prompt), tokens, latency / 4, latency, logprobs)

    async def stream(self, model: str, prompt: str, sampling: Sampling) -> AsyncIterator[CompletionChunk]:
        done = await self.complete(model, prompt, sampling)
        yield CompletionChunk(done.text, token_logprobs=done.token_logprobs)
        yield CompletionChunk("", done.finish_reason, done.prompt_tokens, done.completion_tokens)

    async def load_adapter(self, name: str, path: str) -> None:
        self._call("load", name)
        if name in self.load_gates:
            await self.load_gates[name].wait()
        if self.load_error is not None:
            raise self.load_error
        if name in self.loaded:
            raise AlreadyExists(f"{name} is loaded", reason="ADAPTER_ALREADY_LOADED")
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._call("unload", name)
        if name not in self.loaded:
            raise NotFound(f"{name} is not loaded", reason="MODEL_NOT_SERVED")
        del self.loaded[name]


class ListDiscovery(Discovery):
    """Discovery whose answer a test changes (replicas joining and leaving)."""

    def __init__(self, urls: list[str]) -> None:
        self.current = list(urls)

    async def urls(self) -> list[str]:
        return list(self.current)


# --- the system under test, assembled as core.py does --------------------------------------------------------
URLS = ["http://vllm-0:8000", "http://vllm-1:8000"]
SETTINGS = FleetSettings(MODEL, 8, ("o_proj", "q_proj"))  # what the fake servers were "started with"


@dataclass
class Env:
    data_dir: Path
    log: list[tuple]
    fakes: dict[str, FakeVllm]
    discovery: ListDiscovery
    fleet: Fleet
    proxy: InferenceProxy
    jobs: JobStore
    store: DeploymentStore
    manager: AdapterManager
    reconciler: Reconciler
    watched: str = "echo"  # the adapter whose route the log records

    @property
    def replicas(self) -> list[FakeVllm]:
        return [self.fakes[u] for u in URLS]

    def publish(self, adapter_id: str, model: str = MODEL, **config) -> int:
        folder = self.data_dir / "sources" / f"{adapter_id}-{len(self.jobs.versions(adapter_id)) + 1}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({**ADAPTER_CONFIG, **config}))
        return publish_version(self.data_dir, adapter_id, folder, model=model)

    def calls(self, call: str, name: str | None = None) -> list[tuple]:
        return [e for e in self.log if e[0] == call and (name is None or e[2] == name)]

    async def generate(self, adapter: str):
        return await self.proxy.generate("hi", adapter, Sampling(max_tokens=4))


def make_env(
    tmp_path: Path,
    settings: FleetSettings = SETTINGS,
    drain_timeout: float = 5.0,
) -> Env:
    log: list[tuple] = []
    fakes = {url: FakeVllm(url, log) for url in [*URLS, "http://vllm-2:8000"]}
    discovery = ListDiscovery(URLS)
    fleet = Fleet(discovery, settings, connect=lambda url: fakes[url], initial=URLS)
    proxy = InferenceProxy(fleet.members, Routes())
    jobs = JobStore(tmp_path / "state.db")
    store = DeploymentStore(tmp_path / "state.db")
    manager = AdapterManager(fleet, proxy, jobs, store, DeploySettings(drain_timeout_seconds=drain_timeout))
    env = Env(tmp_path, log, fakes, discovery, fleet, proxy, jobs, store, manager, Reconciler(manager, 1.0))
    for fake in fakes.values():
        fake.route = lambda: proxy.routes.served.get(env.watched)
    return env


@pytest.fixture
def env(tmp_path):
    built = make_env(tmp_path)
    yield built
    built.jobs.close()
    built.store.close()


def reason(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.reason


# --- deploy --------------------------------------------------------------------------------------------------
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


# --- undeploy and list ---------------------------------------------------------------------------------------
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


@run_async
async def test_list_pages_and_shows_desired_against_observed(env):
    env.publish("alpha")
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=2)
    first, token = await env.manager.list(page_size=1, page_token="")
    second, end = await env.manager.list(page_size=1, page_token=token)
    assert [a.adapter_id for a in first + second] == ["alpha", "echo"] and token and end == ""
    assert first[0].deployment is None
    echo = second[0]
    assert [v.version for v in echo.versions] == [1, 2] and echo.base_model == MODEL
    assert echo.deployment.version == 2 and echo.deployment.state == "READY"
    assert [r.observed_adapters for r in echo.deployment.replicas] == [("echo@v2",), ("echo@v2",)]
    with pytest.raises(InvalidArgument):
        await env.manager.list(page_size=1, page_token="garbage")


@run_async
async def test_list_pages_are_bounded_in_bytes_by_the_messages_the_api_sends(env, monkeypatch):
    for adapter_id in ("alpha", "beta", "gamma", "delta", "echo"):
        for _ in range(3):
            env.publish(adapter_id)
    page = ProtoPage(adapter_api._adapter)
    one = page.size_of((await env.manager.list(page_size=1, page_token=""))[0][0])
    monkeypatch.setattr(paging, "MAX_LIST_RESPONSE_BYTES", 2 * one + paging.PAGE_TOKEN_RESERVE)  # two per page
    listed, token, pages = [], "", 0
    while True:
        page = ProtoPage(adapter_api._adapter)
        views, token = await env.manager.list(page_size=50, page_token=token, size_of=page.size_of)
        assert 1 <= len(views) <= 2
        listed += [v.adapter_id for v in views]
        pages += 1
        if not token:
            break
    assert listed == ["alpha", "beta", "delta", "echo", "gamma"] and pages == 3


# --- reconcile -----------------------------------------------------------------------------------------------
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


# --- routes --------------------------------------------------------------------------------------------------
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


# --- fleet ---------------------------------------------------------------------------------------------------
@run_async
async def test_observe_marks_down_and_hanging_replicas_unhealthy(env):
    env.replicas[0].down = True
    env.replicas[1].hang = True
    seen = await env.fleet.observe(timeout=0.2)
    assert [(o.healthy, o.base_model) for o in seen.values()] == [(False, None), (False, None)]
    assert "down" in seen[URLS[0]].error and "no answer" in seen[URLS[1]].error


@run_async
async def test_a_replica_answering_garbage_is_unhealthy_and_the_others_are_observed(env):
    env.replicas[0].models_error = ValueError("Expecting value: line 1 column 1 (char 0)")
    seen = await env.fleet.observe()
    assert [o.healthy for o in seen.values()] == [False, True]


@run_async
async def test_dns_discovery_resolves_every_address():
    assert await DnsDiscovery("localhost:8000").urls() == ["http://127.0.0.1:8000"]
    assert await DnsDiscovery("localhost:9000", scheme="https").urls() == ["https://127.0.0.1:9000"]


@pytest.mark.parametrize("target", ["localhost", "localhost:http", ":8000", ""])
def test_dns_discovery_needs_host_and_port(target):
    with pytest.raises(ValueError):
        DnsDiscovery(target)


@run_async
async def test_static_urls_and_a_dns_name_together_make_the_fleet():
    from layercard_service.core import _discovery

    config = ServiceConfig(vllm_urls=("http://10.1.2.3:8000",), vllm_dns="localhost:8000")
    assert sorted(await _discovery(config).urls()) == ["http://10.1.2.3:8000", "http://127.0.0.1:8000"]


def test_config_rejects_a_dns_target_without_a_host():
    with pytest.raises(ConfigError):
        ServiceConfig(vllm_dns=":8000")


# --- the planner calibrated from deploy measurements ---------------------------------------------------------
def _measurement(fraction: float) -> LatencyMeasurement:
    return LatencyMeasurement("http://vllm-0:8000", 10.0, 11.0, 1.0, 1.1, fraction, 5)


def test_the_planner_takes_the_median_measured_vllm_overhead(tmp_path):
    from test_planner import GAINS, make_card  # the synthetic cards of the planner's own tests

    store = DeploymentStore(tmp_path / "state.db")
    for fraction in (0.5, 0.1, 0.3):
        store.add_measurement(MODEL, "echo", 1, 8, ("o_proj",), _measurement(fraction))
    store.add_measurement("other/model", "echo", 1, 8, (), _measurement(5.0))
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
    with pytest.raises(FailedPrecondition) as err:  # nothing measured on this model's fleet yet
        PlacementPlanner(Cards(), serving_calibration=lambda _model: None).plan("layerCards/c", request)
    assert reason(err) == "SERVING_COST_UNKNOWN"
    store.close()


class Recorder(Telemetry):
    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []

    def request_finished(self, record: RequestRecord) -> None:
        self.requests.append(record)


@run_async
async def test_each_request_is_recorded_once_and_unknown_names_share_one_label(env):
    recorder = Recorder()
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
