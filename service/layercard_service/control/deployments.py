"""Deploying adapters into every replica of a serving pool: check, load a new version, verify, route, drain, unload.

A deploy never reloads a name in place: version N is loaded as ``{id}@vN`` beside the version serving now, so
traffic keeps flowing while the new one is checked. Only after it changes the model's output on every replica
and fits its latency budget does ``{id}`` route to it; the old version then finishes its requests in flight
and is unloaded. Anything that fails before the route moves unloads what this deploy loaded, so the version
that served before keeps serving. One lock per adapter id orders its deploys; different adapters deploy in
parallel. The desired state is written to SQLite; ``reconcile`` makes every replica match it (new or
restarted replicas get their adapters back, stray versions of managed adapters are unloaded; ``reconcile.py``).

The fleet is one or more pools (serving/fleet.py ``Pools``), each with its own LoRA settings; an adapter lives
on one. A deploy goes to the pool the request names, else the one its plan chose (the version's placement), else
the one it is deployed to now, else the leanest pool that can serve it.

The latency figure comes from a probe after the load, unless the serving shape (base model, the servers' LoRA
settings, the adapter's rank) has ``calibrated_min_probes`` probes younger than ``calibration_max_age_seconds``:
then the deploy verifies with one greedy prompt per replica, takes the shape's median figures, and leaves the
rest to live traffic (the alert ``deploy_checks.LIVE_ALERT``; with ``rollback_over_budget``, live_latency.py's
judge too). Every deploy answers with the checks it ran, skipped or left pending (deploy_checks.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from layercard_service.control.compat import adapter_config, adapter_problems, replica_problems
from layercard_service.control.deploy_checks import (
    DeployCheck,
    budget_check,
    compatibility_check,
    concurrency_check,
    effect_check,
    latency_check,
    live_check,
)
from layercard_service.control.live_latency import LiveLatencyJudge, LiveVerdict, LiveWatch
from layercard_service.domain.jobs import check_id
from layercard_service.domain.pools import DEFAULT_POOL
from layercard_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LayercardError,
    NotFound,
    Unavailable,
)
from layercard_service.persistence.adapter_versions import AdapterVersion, AdapterVersions
from layercard_service.persistence.deployments import (
    DeploymentRecord,
    DeploymentStore,
    LatencyMeasurement,
    ServingShape,
    served_name,
)
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import paginate
from layercard_service.serving.fleet import Fleet, Observation, Pools
from layercard_service.serving.inference import InferenceProxy, served_id
from layercard_service.serving.probes import EFFECT_PROMPTS, LATENCY_SAMPLES, measure_effect, measure_latency
from layercard_service.serving.vllm_api import VllmApi
from layercard_service.telemetry import Telemetry

__all__ = [
    "AdapterManager",
    "AdapterView",
    "DeployCheck",
    "DeploySettings",
    "DeploymentView",
    "ReplicaView",
    "adapter_id_from_name",
]

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapters/"


@dataclass(frozen=True)
class DeploySettings:
    drain_timeout_seconds: float = 30.0  # how long a swap waits for the old version's requests in flight
    calibrated_min_probes: int = 3  # latency probes of a serving shape that make it calibrated
    calibration_max_age_seconds: float = 7 * 86400.0  # older probes do not count: servers and versions change
    live_window_seconds: float = 300.0  # how long a rollback_over_budget deploy is watched on live traffic
    live_min_requests: int = 20  # requests of the version, and of the base model, a live verdict needs
    # Stream counts a latency probe also measures at, after its one-stream pairs: what budgets at a stated
    # concurrency are planned with. Each adds a probe's time to a deploy that probes.
    probe_concurrency: tuple[int, ...] = ()
    probe_samples: int = LATENCY_SAMPLES  # interleaved base/adapter pairs a latency probe times


@dataclass(frozen=True)
class ReplicaView:
    replica: str
    healthy: bool
    observed_adapters: tuple[str, ...]
    desired_loaded: bool
    max_lora_rank: int
    target_modules: tuple[str, ...]
    error: str = ""
    pool: str = ""


@dataclass(frozen=True)
class DeploymentView(DeploymentRecord):
    """The desired deployment with what each replica holds; state "" when validate_only changed nothing."""

    replicas: tuple[ReplicaView, ...] = ()
    checks: tuple[DeployCheck, ...] = ()


@dataclass(frozen=True)
class AdapterView:
    adapter_id: str
    base_model: str
    versions: tuple[AdapterVersion, ...]
    deployment: DeploymentView | None
    live_verdict: LiveVerdict | None = None  # the newest live-traffic verdict on one of its versions


def adapter_id_from_name(name: str) -> str:
    if not name.startswith(ADAPTER_PREFIX):
        raise InvalidArgument.field("adapter", f"must look like 'adapters/{{adapter_id}}', got {name!r}")
    return check_id(name[len(ADAPTER_PREFIX) :], "adapter")


class AdapterManager:
    def __init__(
        self,
        fleet: Pools | Fleet,  # a single Fleet is a fleet of one pool
        proxy: InferenceProxy,
        versions: AdapterVersions | JobStore,
        store: DeploymentStore,
        settings: DeploySettings = DeploySettings(),
        telemetry: Telemetry | None = None,
    ) -> None:
        self.fleet = fleet if isinstance(fleet, Pools) else Pools([fleet])
        self.proxy, self.versions, self.store = proxy, versions, store
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        proxy.routes.managed = versions.has_adapter
        self.live = LiveLatencyJudge(
            settings.live_window_seconds,
            settings.live_min_requests,
            self._roll_back,
            self.telemetry.live_latency_verdict,
        )
        proxy.observers.append(self.live.observe)
        for record in store.all():  # routes survive a restart: the replicas still hold the versions
            proxy.routes.served[record.adapter_id] = record.served_name

    def busy(self, adapter_id: str) -> bool:
        """Whether a deploy or undeploy of ``adapter_id`` is under way (without creating a lock for it)."""
        lock = self._locks.get(adapter_id)
        return lock is not None and lock.locked()

    async def close(self) -> None:
        await self.live.close()
        await self.fleet.close()

    # --- deploy --------------------------------------------------------------------------------------------
    async def deploy(
        self,
        adapter_name: str,
        version: int = 0,
        max_overhead_fraction: float | None = None,
        force: bool = False,
        validate_only: bool = False,
        full_latency_probe: bool = False,
        rollback_over_budget: bool = False,
        pool: str = "",
    ) -> DeploymentView:
        """``pool``: the serving pool to deploy to; "" chooses (the module docstring)."""
        began = time.monotonic()
        try:
            options = _Options(max_overhead_fraction, force, full_latency_probe, rollback_over_budget, pool)
            view = await self._deploy(adapter_name, version, options, validate_only)
        except BaseException as exc:
            if not validate_only:
                self.telemetry.deploy_finished(_outcome(exc), time.monotonic() - began)
            raise
        if not validate_only:
            self.telemetry.deploy_finished("ok", time.monotonic() - began)
        return view

    async def _deploy(self, adapter_name: str, version: int, options: _Options, validate_only: bool) -> DeploymentView:
        adapter_id = adapter_id_from_name(adapter_name)
        if version < 0:
            raise InvalidArgument.field("version", f"must be >= 1, or 0 for the newest, got {version}")
        budget = options.budget
        if budget is not None and not (math.isfinite(budget) and budget >= 0):
            # NaN fails every comparison, so it would never bind; Infinity is no budget: leave the field unset
            raise InvalidArgument.field("max_overhead_fraction", f"must be a finite number >= 0, got {budget}")
        if options.rollback and budget is None:
            raise InvalidArgument.field(
                "rollback_over_budget", "needs max_overhead_fraction: the budget live traffic is judged against"
            )
        if options.pool and self.fleet.get(options.pool) is None:
            raise InvalidArgument.field(
                "pool", f"no serving pool is named {options.pool[:80]!r}; the pools are {', '.join(self.fleet.names)}"
            )
        chosen = self._version(adapter_id, version)
        config = adapter_config(chosen)
        pool, why = self._target_pool(adapter_name, chosen, config, options.pool)
        shape = self._shape(config, pool)
        checks = [compatibility_check(config, shape)]
        if len(self.fleet) > 1:
            checks.append(DeployCheck("pool", "PASSED", f"{pool.settings.describe()}: {why}"))
        async with self._locks[adapter_id]:
            observed = await self._healthy_replicas(pool)
            healthy = sum(o.healthy for o in observed.values())
            checks.append(
                DeployCheck(
                    "replicas", "PASSED", f"{healthy} of {len(observed)} replicas answer and serve a base model"
                )
            )
            if validate_only:
                checks.append(DeployCheck("load", "SKIPPED", "validate_only: nothing loaded"))
                return self._view(
                    adapter_id, chosen.version, "", observed, None, checks=checks, pool=pool.settings.pool
                )
            return await self._deploy_locked(chosen, pool, observed, options, checks)

    def _target_pool(
        self, adapter_name: str, chosen: AdapterVersion, config: dict, requested: str
    ) -> tuple[Fleet, str]:
        """The pool to deploy to and why (see the module docstring); FAILED_PRECONDITION when none can serve it."""
        model = chosen.metadata.get("model", "")
        problems = {p.settings.pool: adapter_problems(config, model, p.settings) for p in self.fleet}
        servable = [p for p in self.fleet if not problems[p.settings.pool]]
        placement = chosen.metadata.get("placement")
        planned = placement.get("serving_pool", "") if isinstance(placement, dict) else ""
        current = self.store.get(chosen.adapter_id)
        here = (current.pool if current else "", "the pool the adapter is deployed to")
        plan = (planned, "chosen by the adapter's plan")
        # The version already deployed stays where it is (someone may have moved it); a new one follows its plan.
        again = current is not None and current.version == chosen.version
        preferred = [(requested, "named by the request"), *((here, plan) if again else (plan, here))]
        for name, why in preferred:
            pool = self.fleet.get(name) if name else None
            if pool is None:
                continue
            if pool in servable:
                return pool, why
            if name == requested:  # named outright: its problems are the answer
                servable = []
                problems = {name: problems[name]}
                break
        if not servable:
            detail = "; ".join(
                (f"pool {name!r}: " if len(problems) > 1 else "") + "; ".join(found) for name, found in problems.items()
            )
            raise FailedPrecondition(
                f"the fleet cannot serve {adapter_name} version {chosen.version}: {detail}",
                reason="ADAPTER_INCOMPATIBLE",
                metadata={"adapter": adapter_name, "version": str(chosen.version)},
            )
        if len(servable) == 1:
            return servable[0], "the only pool that can serve it" if len(self.fleet) > 1 else "the only pool"

        # vLLM's overhead follows the module types it wraps and its max rank: the leanest pool costs least. The
        # serving shape's measured overhead breaks ties between pools alike. A pool with no replica found goes last.
        def leanness(pool: Fleet) -> tuple[bool, float, int, float]:
            wrapped = len(pool.settings.target_modules) or math.inf  # none listed: every LoRA-capable module
            found = self.store.shape_calibration(
                self._shape(config, pool), 1, self.settings.calibration_max_age_seconds
            )
            measured = found.overhead_fraction if found else math.inf
            return (not pool.members(), wrapped, pool.settings.max_lora_rank, measured)

        leanest = min(servable, key=leanness)
        why = "the leanest pool that can serve it (the fewest wrapped module types, then the lowest max rank)"
        return leanest, why if leanest.members() else f"{why}; no pool that can serve it has a replica"

    async def _deploy_locked(
        self,
        chosen: AdapterVersion,
        pool: Fleet,
        observed: dict[str, Observation],
        options: _Options,
        checks: list[DeployCheck],
    ) -> DeploymentView:
        budget, force, full_probe = options.budget, options.force, options.full_probe
        adapter_id, served = chosen.adapter_id, served_name(chosen.adapter_id, chosen.version)
        shape, pool_name = self._shape(adapter_config(chosen), pool), pool.settings.pool
        current = self.store.get(adapter_id)
        healthy = {url: o for url, o in observed.items() if o.healthy}
        same = current is not None and current.version == chosen.version and current.pool == pool_name
        if same and all(served in o.adapters for o in healthy.values()):
            checks.append(DeployCheck("load", "SKIPPED", f"{served} is already live on every healthy replica"))
            if current.latency is not None:  # already live: hold it to the budget asked for now
                checks.append(budget_check(served, current.latency, budget, force, "is live with"))
            state = "READY" if len(healthy) == len(observed) else "DEGRADED"
            return self._view(
                adapter_id, chosen.version, state, observed, current.latency, current.update_time, checks, pool_name
            )

        settings = self.settings
        calibration = None
        if not full_probe:
            calibration = self.store.shape_calibration(
                shape, settings.calibrated_min_probes, settings.calibration_max_age_seconds
            )
        replicas = {r.url: r for r in pool.members() if r.url in healthy}
        path = str(Path(chosen.path).resolve())
        loaded_now: list[VllmApi] = []
        try:
            await self._load_everywhere(replicas, healthy, served, path, loaded_now)
            holding = list(replicas.values())  # the healthy replicas that took the load
            if not holding:
                raise Unavailable("no vLLM server could take the adapter", reason="VLLM_UNAVAILABLE", retry_after=2.0)
            checks.append(
                DeployCheck(
                    "load", "PASSED", f"loaded as {served} on {len(holding)} of {len(healthy)} healthy replicas"
                )
            )
            # A calibrated shape needs only to show the weights act: one greedy prompt per replica.
            prompts = EFFECT_PROMPTS[:1] if calibration is not None else EFFECT_PROMPTS
            for replica in holding:
                effect = await measure_effect(replica, healthy[replica.url].base_model, served, prompts)
                if not effect.changed:
                    raise FailedPrecondition(
                        f"{served} does not change the model's output on {replica.url} (greedy text and every "
                        f"token log-probability equal within {effect.max_logprob_delta:.1e} on {effect.prompts} "
                        "probe prompts): vLLM would be serving the base model under its name",
                        reason="ADAPTER_HAS_NO_EFFECT",
                        metadata={"replica": replica.url, "served_name": served},
                    )
                checks.append(effect_check(effect, replica.url))
            latency, probe_replica = calibration, holding[0]
            base_model = healthy[probe_replica.url].base_model
            if latency is None:
                latency = await measure_latency(probe_replica, base_model, served, self.settings.probe_samples)
                self.store.add_measurement(shape, adapter_id, chosen.version, latency)
            probed_now = calibration is None
            await self._probe_streams(probe_replica, base_model, served, chosen, shape, probed_now, checks)
            checks.append(latency_check(latency, full_probe))
            checks.append(budget_check(served, latency, budget, force, "adds"))
        except BaseException:
            await self.unload(loaded_now, served)  # the version serving before keeps serving
            raise
        # What a rollback restores: the version before, or this version where it served before a pool move.
        moved = current is not None and current.version == chosen.version and current.pool != pool_name
        previous = current if current and (current.version != chosen.version or moved) else None
        self.live.forget(adapter_id)  # a watch of the version this one replaces ends here
        if budget is not None and (calibration is not None or options.rollback):
            checks.append(
                live_check(
                    adapter_id,
                    budget,
                    options.rollback,
                    previous.version if previous else None,
                    settings.live_window_seconds,
                    settings.live_min_requests,
                )
            )

        state = "READY" if len(holding) == len(observed) else "DEGRADED"
        record = DeploymentRecord(adapter_id, chosen.version, state, latency, time.time(), budget, pool_name)
        self.store.put(record)
        self.proxy.routes.served[adapter_id] = served  # from here on, new requests go to the new version
        log.info("adapter routed", extra={"adapter": adapter_id, "served_name": served, "state": state})
        if current and current.version != chosen.version:
            await self._retire(current.served_name)
        elif moved:  # the same version leaves its old pool: its requests in flight there finish first
            old = self.fleet.get(current.pool)
            urls = [r.url for r in old.members()] if old is not None else []
            if not await self.proxy.drain(served, self.settings.drain_timeout_seconds, urls):
                log.warning("drain timed out; unloading anyway", extra={"served_name": served, "pool": current.pool})
        await self._unload_strays(adapter_id, served, pool_name)
        if options.rollback:
            back = (previous.version, previous.pool) if previous else (None, "")
            replicas = frozenset(r.url for r in pool.members())  # its base traffic is what the version compares with
            self.live.watch(LiveWatch(adapter_id, served, chosen.version, budget, *back, replicas=replicas))
        observed_after = await pool.observe()
        return self._view(
            adapter_id, chosen.version, state, observed_after, latency, record.update_time, checks, pool_name
        )

    async def _probe_streams(
        self,
        replica: VllmApi,
        base_model: str | None,
        served: str,
        chosen: AdapterVersion,
        shape: ServingShape,
        probed_now: bool,
        checks: list[DeployCheck],
    ) -> None:
        """The probes at several requests at once (``probe_concurrency``): beside a one-stream probe, and on a
        calibrated shape that has none at that count yet. Best effort: they price budgets at that concurrency
        and hold this deploy to nothing."""
        probed = self.store.concurrencies(shape.model, shape.server_modules, shape.server_max_rank)
        for streams in self.settings.probe_concurrency:
            if streams in probed and not probed_now:
                continue
            try:
                loaded = await measure_latency(
                    replica, base_model, served, self.settings.probe_samples, concurrency=streams
                )
            except LayercardError as exc:
                checks.append(DeployCheck(f"latency_{streams}_streams", "SKIPPED", f"probe failed: {exc}"[:500]))
                continue
            self.store.add_measurement(shape, chosen.adapter_id, chosen.version, loaded)
            checks.append(concurrency_check(loaded))

    @staticmethod
    def _shape(config: dict, pool: Fleet) -> ServingShape:
        s = pool.settings
        rank = config.get("r")
        return ServingShape(s.model, s.target_modules, s.max_lora_rank, rank if isinstance(rank, int) else 0)

    async def _load_everywhere(
        self,
        replicas: dict[str, VllmApi],
        healthy: dict[str, Observation],
        served: str,
        path: str,
        loaded_now: list[VllmApi],
    ) -> None:
        """Loads on every healthy replica at once. A replica that stops answering leaves the deploy degraded;
        any other refusal fails the deploy."""

        async def load(replica: VllmApi) -> None:
            if served in healthy[replica.url].adapters:
                return
            try:
                await replica.load_adapter(served, path)
                loaded_now.append(replica)
            except AlreadyExists:
                pass
            finally:
                self.proxy.forget(replica.url)

        results = await asyncio.gather(*(load(r) for r in replicas.values()), return_exceptions=True)
        for replica, result in zip(list(replicas.values()), results):
            if isinstance(result, Unavailable) and result.reason == "VLLM_UNAVAILABLE":  # no answer at all
                log.warning("replica unavailable during deploy", extra={"replica": replica.url})
                del replicas[replica.url]
            elif isinstance(result, FailedPrecondition):
                raise result  # runtime loading disabled: the message names the setting
            elif isinstance(result, BaseException):
                message = str(result) if isinstance(result, LayercardError) else repr(result)
                raise FailedPrecondition(
                    f"vLLM server {replica.url} refused to load {served}: {message}",
                    reason="ADAPTER_LOAD_FAILED",
                    metadata={"replica": replica.url, "served_name": served},
                ) from result

    async def _retire(self, old: str) -> None:
        """Lets requests in flight on ``old`` finish, then unloads it everywhere."""
        if not await self.proxy.drain(old, self.settings.drain_timeout_seconds):
            log.warning("drain timed out; unloading anyway", extra={"served_name": old})
        await self.unload(self.fleet.members(), old)

    async def unload(self, replicas: Sequence[VllmApi], served: str) -> None:
        """Best effort: a replica that is gone or refuses is left to the reconcile loop."""
        for replica in replicas:
            try:
                await replica.unload_adapter(served)
            except NotFound:
                pass
            except LayercardError as exc:
                log.warning("unload failed", extra={"replica": replica.url, "served_name": served, "error": str(exc)})
            self.proxy.forget(replica.url)

    async def _unload_strays(self, adapter_id: str, keep: str | None, pool: str = "") -> None:
        """Unloads every version of ``adapter_id`` from every replica, but ``keep`` on the replicas of ``pool``."""
        for url, observation in (await self.fleet.observe()).items():
            home = self.pool_name(url) == pool
            strays = [n for n in observation.adapters if served_id(n) == adapter_id and not (n == keep and home)]
            replica = self.replica(url)
            for name in strays:
                if replica is not None:
                    await self.unload([replica], name)

    # --- undeploy ------------------------------------------------------------------------------------------
    async def undeploy(self, adapter_name: str) -> list[ReplicaView]:
        adapter_id = adapter_id_from_name(adapter_name)
        async with self._locks[adapter_id]:
            current = self.store.get(adapter_id)
            if current is None and not self.versions.has_adapter(adapter_id):
                raise NotFound(f"adapter {adapter_name!r} does not exist", reason="ADAPTER_NOT_FOUND")
            observed = await self._undeploy_locked(adapter_id, current)
        return [self._replica_view(o, None) for o in observed.values()]

    async def _undeploy_locked(self, adapter_id: str, current: DeploymentRecord | None) -> dict[str, Observation]:
        self.live.forget(adapter_id)
        self.store.delete(adapter_id)
        self.proxy.routes.served.pop(adapter_id, None)  # a known, undeployed adapter is not served
        if current is not None:
            await self.proxy.drain(current.served_name, self.settings.drain_timeout_seconds)
        await self._unload_strays(adapter_id, keep=None)
        return await self.fleet.observe()

    # --- rollback on live latency ------------------------------------------------------------------------
    async def _roll_back(self, watch: LiveWatch, verdict: LiveVerdict) -> None:
        """Restores the version that served before ``watch``'s (undeploys, if none) unless a deploy since then
        has replaced it."""
        async with self._locks[watch.adapter_id]:
            current = self.store.get(watch.adapter_id)
            if current is None or current.version != watch.version:
                return
            log.warning(
                "rolling back: over its latency budget on live traffic",
                extra={"adapter": watch.adapter_id, "version": watch.version, "detail": verdict.detail,
                       "to_version": watch.previous_version or 0},
            )  # fmt: skip
            if watch.previous_version is None:
                await self._undeploy_locked(watch.adapter_id, current)
                return
            chosen = self._version(watch.adapter_id, watch.previous_version)
            pool = self.fleet.get(watch.previous_pool) or self.fleet.get(current.pool)
            if pool is None:  # both pools left the configuration since: nowhere to restore it
                await self._undeploy_locked(watch.adapter_id, current)
                return
            # It served before this one: force, and the budget it is judged by stays on the record and in metrics.
            options = _Options(watch.budget, force=True)
            await self._deploy_locked(chosen, pool, await self._healthy_replicas(pool), options, [])

    # --- list ----------------------------------------------------------------------------------------------
    async def list(
        self, page_size: int, page_token: str, size_of: Callable[[AdapterView], int] | None = None
    ) -> tuple[list[AdapterView], str]:
        """One page of adapters; ``size_of`` (an adapter's size in the response) bounds the page in bytes too."""
        paginate(lambda offset, limit: [], page_size, page_token)  # a bad page_size or token fails before the fleet
        observed = await self.fleet.observe()

        def fetch(offset: int, limit: int) -> list[AdapterView]:
            return [self._adapter_view(i, observed) for i in self.versions.adapter_ids(offset, limit)]

        return paginate(fetch, page_size, page_token, size_of=size_of)

    def _adapter_view(self, adapter_id: str, observed: dict[str, Observation]) -> AdapterView:
        versions = tuple(self.versions.versions(adapter_id))
        record = self.store.get(adapter_id)
        deployment = None
        if record is not None:
            home = {url: o for url, o in observed.items() if self.pool_name(url) == record.pool}
            deployment = self._view(
                adapter_id, record.version, record.state, home, record.latency, record.update_time, pool=record.pool
            )
        model = versions[-1].metadata.get("model", "") if versions else ""
        return AdapterView(adapter_id, model, versions, deployment, self.live.verdicts.get(adapter_id))

    # --- helpers -------------------------------------------------------------------------------------------
    def _version(self, adapter_id: str, version: int) -> AdapterVersion:
        versions = self.versions.versions(adapter_id)
        if not versions:
            raise NotFound(f"adapter 'adapters/{adapter_id}' does not exist", reason="ADAPTER_NOT_FOUND")
        if version == 0:
            return versions[-1]
        for v in versions:
            if v.version == version:
                return v
        have = ", ".join(str(v.version) for v in versions)
        raise NotFound(
            f"adapter 'adapters/{adapter_id}' has no version {version} (it has {have})", reason="VERSION_NOT_FOUND"
        )

    async def _healthy_replicas(self, pool: Fleet) -> dict[str, Observation]:
        """The pool's replicas as observed now; FAILED_PRECONDITION or UNAVAILABLE when none can take a deploy."""
        if not pool.members():
            await pool.refresh()
        if not pool.members():
            where = f"in {pool.settings.describe()}" if len(self.fleet) > 1 else "(set --vllm-urls or --vllm-dns)"
            raise FailedPrecondition(
                f"no vLLM servers are configured {where}",
                reason="NO_VLLM_SERVERS",
                metadata={"pool": pool.settings.pool},
            )
        observed = await pool.observe()
        healthy = [o for o in observed.values() if o.healthy]
        if not healthy:
            raise Unavailable(
                "no vLLM server can be reached: " + "; ".join(o.error for o in observed.values()),
                reason="VLLM_UNAVAILABLE",
                retry_after=2.0,
            )
        problems = [p for o in healthy for p in replica_problems(o)]
        if problems:
            raise FailedPrecondition("; ".join(problems), reason="REPLICA_NOT_READY")
        return observed

    def replica(self, url: str) -> VllmApi | None:
        return next((r for r in self.fleet.members() if r.url == url), None)

    def pool_name(self, url: str) -> str | None:
        pool = self.fleet.pool_of(url)
        return pool.settings.pool if pool is not None else None

    def _replica_view(self, o: Observation, served: str | None) -> ReplicaView:
        pool = self.fleet.pool_of(o.url)
        s = pool.settings if pool is not None else next(iter(self.fleet)).settings
        loaded = served is not None and served in o.adapters
        return ReplicaView(o.url, o.healthy, o.adapters, loaded, s.max_lora_rank, s.target_modules, o.error, s.pool)

    def _view(
        self,
        adapter_id: str,
        version: int,
        state: str,
        observed: dict[str, Observation],
        latency: LatencyMeasurement | None,
        update_time: float = 0.0,
        checks: Sequence[DeployCheck] = (),
        pool: str = DEFAULT_POOL,
    ) -> DeploymentView:
        served = served_name(adapter_id, version)
        replicas = tuple(self._replica_view(o, served) for o in observed.values())
        return DeploymentView(
            adapter_id,
            version,
            state,
            latency,
            update_time or time.time(),
            pool=pool,
            replicas=replicas,
            checks=tuple(checks),
        )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, LayercardError):
        return exc.reason
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"


@dataclass(frozen=True)
class _Options:
    budget: float | None  # max_overhead_fraction
    force: bool = False
    full_probe: bool = False
    rollback: bool = False  # rollback_over_budget
    pool: str = ""  # the pool asked for; "": chosen
