"""The service's domain figures as Prometheus series.

Events (a card computed, a job ended, a deploy, an inference request) are counted and timed as they happen by
``PrometheusTelemetry``. State (jobs by state, what each replica holds against what it should, each deployed
adapter's measured overhead and budget) is read when Prometheus scrapes, by ``StateCollector``, so it is never
stale and never needs bookkeeping. Label values are bounded: outcomes and states are fixed sets, adapters are
the ones deployed (a request for anything else fails before it is recorded), replicas are the fleet's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from layercard_service.domain.pools import DEFAULT_POOL
from layercard_service.telemetry import JobOutcome, RequestRecord, Telemetry

__all__ = ["BASE_MODEL_LABEL", "DeployedAdapter", "ObservedReplica", "PrometheusTelemetry", "StateCollector"]

log = logging.getLogger(__name__)

BASE_MODEL_LABEL = "base"  # the adapter label of requests to the base model

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_LONG = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
_RATIO = (0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
_STEP = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PrometheusTelemetry(Telemetry):
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.card_seconds = Histogram(
            "layercard_card_compute_seconds",
            "Wall time of ComputeLayerCard calls, by whether the card was computed or answered from the store.",
            ["cache", "outcome"],
            buckets=_LONG,
            registry=r,
        )
        self.jobs_ended = Counter(
            "layercard_tuning_jobs_ended", "Tuning jobs whose worker finished, by final state.", ["state"], registry=r
        )
        for state in ("SUCCEEDED", "FAILED", "CANCELLED"):  # from 0, so increase() sees the first failure
            self.jobs_ended.labels(state)
        self.job_seconds = Histogram(
            "layercard_tuning_job_duration_seconds",
            "Wall time of tuning jobs from start to end, by final state.",
            ["state"],
            buckets=_LONG,
            registry=r,
        )
        self.job_tokens = Histogram(
            "layercard_tuning_tokens_per_second",
            "Training throughput of each finished job.",
            buckets=(100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000),
            registry=r,
        )
        self.step_seconds = Histogram(
            "layercard_tuning_step_seconds",
            "Training step time of finished jobs: the plan's prediction and the measurement.",
            ["source"],
            buckets=_STEP,
            registry=r,
        )
        self.step_ratio = Histogram(
            "layercard_tuning_step_time_measured_over_predicted",
            "Measured over predicted training step time, per finished job with a prediction.",
            buckets=_RATIO,
            registry=r,
        )
        self.memory_ratio = Histogram(
            "layercard_tuning_peak_memory_measured_over_predicted",
            "Measured over predicted peak training memory, per finished job with a prediction.",
            buckets=_RATIO,
            registry=r,
        )
        self.deploys = Counter(
            "layercard_adapter_deploys", "DeployAdapter calls by outcome (ok or the failure's reason).", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.live_verdicts = Counter(
            "layercard_adapter_live_verdicts",
            "Live-traffic latency verdicts on deployed versions watched for rollback (within, over: rolled back, "
            "inconclusive: too little traffic).",
            ["outcome"],
            registry=r,
        )
        self.deploy_seconds = Histogram(
            "layercard_adapter_deploy_seconds",
            "Wall time of DeployAdapter calls (checks, load, verification, latency probe, swap).",
            ["outcome"],
            buckets=_LATENCY,
            registry=r,
        )
        self.requests = Counter(
            "layercard_inference_requests",
            "Inference requests through the service, by adapter and outcome (ok or the failure's reason).",
            ["adapter", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "layercard_inference_time_to_first_token_seconds",
            "Time to first token of successful inference requests, by adapter.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token = Histogram(
            "layercard_inference_inter_token_seconds",
            "Mean time between generated tokens of successful inference requests, by adapter and by the serving "
            "pool that answered (a version's live overhead compares with its own pool's base requests).",
            ["adapter", "pool"],
            buckets=_INTER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "layercard_inference_request_seconds",
            "End-to-end latency of successful inference requests, by adapter.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream = Counter(
            "layercard_vllm_errors", "Failed calls to vLLM servers, by replica and reason.", ["replica", "reason"],
            registry=r,
        )  # fmt: skip

    def card_finished(self, seconds: float, cached: bool, ok: bool) -> None:
        labels = ("hit" if cached else "miss", "ok" if ok else "error")
        self.card_seconds.labels(*labels).observe(seconds)

    def job_ended(self, o: JobOutcome) -> None:
        self.jobs_ended.labels(o.state).inc()
        self.job_seconds.labels(o.state).observe(o.seconds)
        if o.tokens_per_second > 0:
            self.job_tokens.observe(o.tokens_per_second)
        if o.measured_step_seconds > 0:
            self.step_seconds.labels("measured").observe(o.measured_step_seconds)
        if o.predicted_step_seconds > 0:
            self.step_seconds.labels("predicted").observe(o.predicted_step_seconds)
            if o.measured_step_seconds > 0:
                self.step_ratio.observe(o.measured_step_seconds / o.predicted_step_seconds)
        if o.predicted_peak_memory_bytes > 0 and o.measured_peak_memory_bytes > 0:
            self.memory_ratio.observe(o.measured_peak_memory_bytes / o.predicted_peak_memory_bytes)

    def deploy_finished(self, outcome: str, seconds: float) -> None:
        self.deploys.labels(outcome).inc()
        self.deploy_seconds.labels(outcome).observe(seconds)

    def live_latency_verdict(self, outcome: str) -> None:
        self.live_verdicts.labels(outcome).inc()

    def request_finished(self, r: RequestRecord) -> None:
        adapter = r.adapter or BASE_MODEL_LABEL
        self.requests.labels(adapter, "ok" if r.ok else r.error or "error").inc()
        if not r.ok:
            return
        self.e2e.labels(adapter).observe(r.latency_seconds)
        self.ttft.labels(adapter).observe(r.first_token_seconds)
        if r.inter_token_seconds is not None:
            self.inter_token.labels(adapter, r.pool or "unknown").observe(r.inter_token_seconds)

    def upstream_error(self, replica: str, reason: str) -> None:
        self.upstream.labels(replica, reason).inc()


def _read(source: Callable, default):
    try:
        return source()
    except Exception:
        log.exception("a metrics source failed during a scrape")
        return default


class DeployedAdapter(NamedTuple):
    adapter: str
    served: str  # the served name of its desired version
    overhead: float | None  # measured overhead fraction, or None
    budget: float | None
    pool: str = DEFAULT_POOL


class ObservedReplica(NamedTuple):
    url: str
    healthy: bool
    loaded: tuple[str, ...]  # served names
    pool: str = DEFAULT_POOL


class StateCollector(Collector):
    """Gauges read at scrape time from the stores and the fleet's last observation.

    ``jobs_by_state`` returns {state: count}; ``deployments`` the desired deployments, ``replicas`` the replicas as
    last observed. A replica is held to the deployments of its own pool.
    """

    def __init__(
        self,
        jobs_by_state: Callable[[], dict[str, int]],
        deployments: Callable[[], list[DeployedAdapter]],
        replicas: Callable[[], list[ObservedReplica]],
    ) -> None:
        self.jobs_by_state, self.deployments, self.replicas = jobs_by_state, deployments, replicas

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Each source may fail (a locked database): its gauges are left out, the rest of the scrape still works.
        jobs = GaugeMetricFamily("layercard_tuning_jobs", "Tuning jobs by current state.", labels=["state"])
        for state, count in sorted(_read(self.jobs_by_state, {}).items()):
            jobs.add_metric([state], count)
        yield jobs

        deployments = [DeployedAdapter(*d) for d in _read(self.deployments, [])]
        replicas = [ObservedReplica(*r) for r in _read(self.replicas, [])]
        up = GaugeMetricFamily(
            "layercard_vllm_replica_up", "1 when the replica answered its last check.", labels=["replica", "pool"]
        )
        desired = GaugeMetricFamily(
            "layercard_fleet_desired_adapters",
            "Adapters that should be loaded on the replica (those deployed to its pool).",
            labels=["replica", "pool"],
        )
        missing = GaugeMetricFamily(
            "layercard_fleet_missing_adapters",
            "Desired adapters the replica does not report as loaded (its /v1/models).",
            labels=["replica", "pool"],
        )
        loaded = GaugeMetricFamily(
            "layercard_fleet_adapter_loaded",
            "1 when the replica holds the adapter's desired version, by adapter and replica of its pool.",
            labels=["adapter", "replica", "pool"],
        )
        for r in replicas:
            home = [d for d in deployments if d.pool == r.pool]
            up.add_metric([r.url, r.pool], 1.0 if r.healthy else 0.0)
            desired.add_metric([r.url, r.pool], len(home))
            missing.add_metric([r.url, r.pool], sum(1 for d in home if d.served not in r.loaded))
            for d in home:
                loaded.add_metric([d.adapter, r.url, r.pool], 1.0 if d.served in r.loaded else 0.0)
        yield from (up, desired, missing, loaded)

        overhead = GaugeMetricFamily(
            "layercard_adapter_overhead_fraction",
            "Latency overhead of the deployed version over the base model, measured after its load.",
            labels=["adapter", "pool"],
        )
        budget = GaugeMetricFamily(
            "layercard_adapter_overhead_budget_fraction",
            "The latency-overhead budget the deployed version was deployed under.",
            labels=["adapter", "pool"],
        )
        for d in deployments:
            if d.overhead is not None:
                overhead.add_metric([d.adapter, d.pool], d.overhead)
            if d.budget is not None:
                budget.add_metric([d.adapter, d.pool], d.budget)
        yield from (overhead, budget)
