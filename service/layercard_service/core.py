"""The domain core the servicers talk to, built once from the config."""

from __future__ import annotations

import os
from dataclasses import dataclass

from layercard_service.card.service import CardService
from layercard_service.config import ServiceConfig
from layercard_service.plan.planner import PlacementPlanner
from layercard_service.serve.inference import InferenceProxy
from layercard_service.serve.vllm_api import HttpVllmApi
from layercard_service.store import Store
from layercard_service.tune.job_store import JobStore
from layercard_service.tune.runner import LocalProcessRunner, worker_command
from layercard_service.tune.service import TuningService

__all__ = ["Core"]


@dataclass
class Core:
    store: Store
    cards: CardService
    tuning: TuningService
    planner: PlacementPlanner
    inference: InferenceProxy

    @classmethod
    def from_config(cls, config: ServiceConfig) -> Core:
        store = Store(config.data_dir)
        cards = CardService(
            store,
            config.model_roots,
            config.dataset_roots,
            max_concurrent=config.max_concurrent_cards,
            queue_size=config.card_queue_size,
        )
        return cls(
            store=store,
            cards=cards,
            tuning=_tuning(config),
            planner=PlacementPlanner(cards),
            inference=InferenceProxy([HttpVllmApi(url) for url in config.vllm_urls]),
        )

    def start(self) -> None:
        """Starts background work: the tuning runner recovers jobs left by the previous process."""
        self.tuning.start()

    def close(self) -> None:
        self.tuning.close()  # workers stop; their jobs stay RUNNING and resume at the next start
        self.store.close()


def _tuning(config: ServiceConfig) -> TuningService:
    jobs = JobStore(config.data_dir / "state.db")  # the same database as Store, its own connection
    threads = config.job_threads or max(1, (os.cpu_count() or 1) // config.max_concurrent_jobs)
    command = worker_command(
        config.data_dir, config.model_roots, config.dataset_roots, config.max_lora_rank, threads=threads
    )
    runner = LocalProcessRunner(jobs, config.data_dir, command, max_concurrent=config.max_concurrent_jobs)
    return TuningService(
        jobs,
        runner,
        config.model_roots,
        config.dataset_roots,
        max_lora_rank=config.max_lora_rank,
        max_concurrent=config.max_concurrent_jobs,
        queue_size=config.job_queue_size,
    )
