"""The serving side assembled as core.py does, over in-memory vLLM servers (``support.fakes.FakeVllm``) and real
stores: ``make_env`` and its ``Env``, shared by the tests of deploy, swap, reconcile, routes and discovery
(tests/unit/conftest.py makes it the ``env`` fixture); and the small async helpers those tests run on.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from layercard_service.control.deployments import AdapterManager, DeploySettings
from layercard_service.control.reconcile import Reconciler
from layercard_service.persistence.deployments import DeploymentStore
from layercard_service.persistence.jobs import JobStore
from layercard_service.serving.fleet import Fleet, FleetSettings
from layercard_service.serving.inference import InferenceProxy, Routes
from layercard_service.serving.vllm_api import Sampling
from support.adapters import publish_version
from support.fakes import FakeVllm, ListDiscovery

__all__ = ["ADAPTER_CONFIG", "MODEL", "SETTINGS", "URLS", "Env", "make_env", "reason", "run_async", "until"]

MODEL = "builtin:tiny"
ADAPTER_CONFIG = {"r": 8, "peft_type": "LORA", "target_modules": ["o_proj"], "bias": "none"}


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

    def publish(self, adapter_id: str, model: str = MODEL, serving_pool: str = "", **config) -> int:
        folder = self.data_dir / "sources" / f"{adapter_id}-{len(self.jobs.versions(adapter_id)) + 1}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({**ADAPTER_CONFIG, **config}))
        return publish_version(self.data_dir, adapter_id, folder, model=model, serving_pool=serving_pool)

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


def reason(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.reason
