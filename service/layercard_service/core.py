"""The domain core the servicers talk to, built once from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from layercard_service.config import ServiceConfig
from layercard_service.control.cards import CardService
from layercard_service.control.deployments import AdapterManager, DeploySettings
from layercard_service.control.planning.planner import PlacementPlanner, calibrated
from layercard_service.control.planning.vllm_fleet import VllmFleet
from layercard_service.control.reconcile import Reconciler
from layercard_service.control.tuning import TuningService
from layercard_service.domain.cards import LayerCardData
from layercard_service.observability.prometheus import DeployedAdapter, ObservedReplica, StateCollector
from layercard_service.persistence import Database, open_database
from layercard_service.persistence.adapter_versions import AdapterVersions
from layercard_service.persistence.deployments import DeploymentStore
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import Store
from layercard_service.runners.local import LocalProcessRunner, service_worker_command
from layercard_service.runners.worker_reports import ServiceEndpoint, WorkerReports
from layercard_service.serving.chat import BaseModelChatTemplate
from layercard_service.serving.fleet import (
    Discovery,
    DnsDiscovery,
    Fleet,
    FleetSettings,
    Pools,
    StaticDiscovery,
    Union,
)
from layercard_service.serving.inference import InferenceProxy, Routes
from layercard_service.serving.pool_spec import PoolSpec
from layercard_service.telemetry import SafeTelemetry, Telemetry

__all__ = ["Core"]


@dataclass
class Core:
    store: Store
    cards: CardService
    tuning: TuningService
    planner: PlacementPlanner
    inference: InferenceProxy
    adapters: AdapterManager
    reconciler: Reconciler
    worker_reports: WorkerReports  # the internal API's domain: what tuning workers report
    db: Database | None = None  # the one database every repository shares; closed last

    @classmethod
    def from_config(cls, config: ServiceConfig, telemetry: Telemetry | None = None) -> Core:
        telemetry = SafeTelemetry(telemetry or Telemetry())
        db = open_database(config.data_dir / "state.db")  # migrated to the current schema here, once
        store = Store(config.data_dir, db)
        cards = CardService(
            store,
            _card_engine,
            config.model_roots,
            config.dataset_roots,
            max_concurrent=config.max_concurrent_cards,
            queue_size=config.card_queue_size,
            telemetry=telemetry,
        )
        deployments = DeploymentStore(db)
        planner = PlacementPlanner(
            cards,
            serving_calibration=deployments.calibration,
            prefix_cache_memory_bytes=config.prefix_cache_memory_bytes,
            vllm_fleet=_vllm_fleet(config, deployments),
        )
        tuning = _tuning(config, telemetry, JobStore(db), planner)  # it plans card-budget placements itself
        fleet = _pools(config)
        template = BaseModelChatTemplate(config.vllm_model)
        proxy = InferenceProxy(fleet.members, Routes(), telemetry, template, pool_of=fleet.pool_name)
        adapters = AdapterManager(
            fleet,
            proxy,
            AdapterVersions(db),
            deployments,
            DeploySettings(
                drain_timeout_seconds=config.drain_timeout_seconds,
                calibrated_min_probes=config.serving_calibration_min_probes,
                calibration_max_age_seconds=config.serving_calibration_max_age_seconds,
                live_window_seconds=config.live_window_seconds,
                live_min_requests=config.live_min_requests,
                probe_concurrency=config.serving_probe_concurrency,
                probe_samples=config.serving_probe_samples,
            ),
            telemetry,
        )
        return cls(
            store=store,
            cards=cards,
            tuning=tuning,
            planner=planner,
            inference=proxy,
            adapters=adapters,
            reconciler=Reconciler(adapters, config.reconcile_interval_seconds),
            worker_reports=WorkerReports(tuning.store, config.data_dir / "artifacts", config.max_lora_rank),
            db=db,
        )

    def with_fleet_serving(self, card: LayerCardData) -> LayerCardData:
        """The card with the serving fleet's measured vLLM overhead and base time, and each pool's figures, as
        the planner plans with."""
        pools = self.planner.vllm_fleet(card.model, 1) if self.planner.vllm_fleet is not None else ()
        return calibrated(card, self.adapters.store.calibration(card.model), pools)

    def state_collector(self) -> StateCollector:
        """Scrape-time gauges: jobs by state, fleet residency, deployed adapters' overhead and budget."""

        def deployments() -> list[DeployedAdapter]:
            records = self.adapters.store.all()
            return [DeployedAdapter(r.adapter_id, r.served_name, r.latency.overhead_fraction if r.latency else None,
                                    r.budget, r.pool) for r in records]  # fmt: skip

        def replicas() -> list[ObservedReplica]:
            # A copy: the event loop updates the fleet's observations while this scrape thread reads them.
            return [ObservedReplica(o.url, o.healthy, o.adapters, pool.settings.pool)
                    for pool in self.adapters.fleet for o in list(pool.last.values())]  # fmt: skip

        return StateCollector(self.tuning.store.count_by_state, deployments, replicas)

    def set_worker_endpoint(self, endpoint: ServiceEndpoint) -> None:
        """Where workers reach this service: known once the server has bound its port, before any worker starts."""
        self.tuning.runner.set_service_endpoint(endpoint)

    def start(self) -> None:
        """Starts background work: the tuning runner recovers jobs left by the previous process."""
        self.tuning.start()

    async def start_serving(self) -> None:
        """Starts the fleet's reconcile loop (on the server's event loop)."""
        self.reconciler.start()

    async def stop_serving(self) -> None:
        await self.reconciler.close()
        await self.adapters.close()  # closes the fleet's HTTP connections too: they belong to this event loop

    def close(self) -> None:
        self.tuning.close()  # workers stop; their jobs stay RUNNING and resume at the next start
        self.adapters.store.close()
        self.store.close()
        if self.db is not None:
            self.db.close()


def _card_engine(*args: Any) -> Any:
    """The card engine, imported on the first card: torch stays out of a server that computes none."""
    from layercard_service.card_engine.run import compute_with_engine

    return compute_with_engine(*args)


def _vllm_fleet(config: ServiceConfig, deployments: DeploymentStore):
    """model -> each serving pool's LoRA settings and per-rank measurements, for the fleet's own model only."""
    pools = config.serving_pools()

    def fleet(model: str, streams: int = 1) -> tuple[VllmFleet, ...]:
        if model != config.vllm_model:
            return ()
        return tuple(_pool_fleet(deployments, model, p, streams) for p in pools)

    return fleet


def _pool_fleet(deployments: DeploymentStore, model: str, pool: PoolSpec, streams: int) -> VllmFleet:
    """A pool's figures at ``streams`` requests at once, or at the nearest count it was probed at (the next above,
    else the highest below), one stream before any probe."""
    probed = deployments.concurrencies(model, pool.target_modules, pool.max_lora_rank)
    above = [c for c in probed if c >= streams]
    level = min(above) if above else max(probed, default=1)
    note = ""
    if level != streams:
        note = f"not probed at {streams} streams: priced at {level}" if probed else "not probed at several streams yet"
    by_rank = deployments.rank_calibrations(model, pool.target_modules, pool.max_lora_rank, level)
    return VllmFleet(pool.target_modules, pool.max_lora_rank, by_rank, pool.name, level, note)


def _pools(config: ServiceConfig) -> Pools:
    """A Fleet per configured pool: its static URLs and/or DNS name, and the LoRA settings its servers run."""
    return Pools([
        Fleet(
            _discovery(p),
            FleetSettings(config.vllm_model, p.max_lora_rank, p.target_modules, p.name),
            initial=p.urls,
        )
        for p in config.serving_pools()
    ])  # fmt: skip


def _discovery(pool: PoolSpec) -> Discovery:
    static = StaticDiscovery(pool.urls)
    return Union([static, DnsDiscovery(pool.dns)]) if pool.dns else static


def _tuning(
    config: ServiceConfig,
    telemetry: Telemetry,
    jobs: JobStore | None = None,
    planner: PlacementPlanner | None = None,
) -> TuningService:
    if jobs is None:  # on its own (tests): a database of its own
        jobs = JobStore(config.data_dir / "state.db")
    if config.job_runner == "kubernetes":  # a batch/v1 Job per tuning job; the client is imported only then
        from layercard_service.runners.kubernetes.runner import kubernetes_runner

        runner = kubernetes_runner(config, jobs, telemetry)
    else:
        threads = config.job_threads or max(1, (os.cpu_count() or 1) // config.max_concurrent_jobs)
        command = service_worker_command(config, threads)
        runner = LocalProcessRunner(
            jobs, config.data_dir, command, max_concurrent=config.max_concurrent_jobs, telemetry=telemetry
        )
    return TuningService(
        jobs,
        runner,
        config.model_roots,
        config.dataset_roots,
        max_lora_rank=config.max_lora_rank,
        max_concurrent=config.max_concurrent_jobs,
        queue_size=config.job_queue_size,
        planner=planner,
    )
