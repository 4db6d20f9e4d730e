"""Domain metrics: what each telemetry call adds to the registry, and the scrape-time state gauges."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from layercard_service.observability.prometheus import (
    DeployedAdapter,
    ObservedReplica,
    PrometheusTelemetry,
    StateCollector,
)
from layercard_service.telemetry import JobOutcome, RequestRecord


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_requests_are_timed_per_adapter_and_failures_counted_by_reason(registry):
    t = PrometheusTelemetry(registry)
    t.request_finished(RequestRecord("bot", "bot@v2", "http://a", True, 0.1, 0.5, 5, pool="lean"))
    t.request_finished(RequestRecord("", "base", "http://a", True, 0.05, 0.2, 1, pool="lean"))
    t.request_finished(RequestRecord("", "base", "http://gone", True, 0.05, 0.2, 3))  # its replica left the pools
    t.request_finished(RequestRecord("bot", "bot@v2", "http://a", False, 0.0, 0.3, 0, "CANCELLED"))
    get = registry.get_sample_value
    assert get("layercard_inference_request_seconds_count", {"adapter": "bot"}) == 1
    assert get("layercard_inference_request_seconds_sum", {"adapter": "bot"}) == pytest.approx(0.5)
    base_ttft = get("layercard_inference_time_to_first_token_seconds_sum", {"adapter": "base"})
    assert base_ttft == pytest.approx(0.1)  # two base requests at 50 ms
    bot, base = {"adapter": "bot", "pool": "lean"}, {"adapter": "base", "pool": "lean"}
    assert get("layercard_inference_inter_token_seconds_sum", bot) == pytest.approx(0.1)  # 0.4 / 4
    assert get("layercard_inference_inter_token_seconds_count", base) is None  # one token: no gap
    assert get("layercard_inference_inter_token_seconds_count", {"adapter": "base", "pool": "unknown"}) == 1
    assert get("layercard_inference_requests_total", {"adapter": "bot", "outcome": "CANCELLED"}) == 1
    assert get("layercard_inference_requests_total", {"adapter": "bot", "outcome": "ok"}) == 1


def test_jobs_cards_deploys_and_upstream_errors(registry):
    t = PrometheusTelemetry(registry)
    t.job_ended(JobOutcome("SUCCEEDED", 30.0, 2000.0, 0.2, 0.25, 1000, 1500))
    t.job_ended(JobOutcome("FAILED", 3.0, 0.0, 0.0, 0.0, 0, 0))
    t.card_finished(12.0, cached=False, ok=True)
    t.card_finished(0.01, cached=True, ok=True)
    t.deploy_finished("ok", 4.0)
    t.deploy_finished("SERVING_BUDGET_EXCEEDED", 5.0)
    t.upstream_error("http://a", "VLLM_UNAVAILABLE")
    get = registry.get_sample_value
    assert get("layercard_tuning_jobs_ended_total", {"state": "FAILED"}) == 1
    assert get("layercard_tuning_step_time_measured_over_predicted_sum") == pytest.approx(1.25)
    assert get("layercard_tuning_peak_memory_measured_over_predicted_sum") == pytest.approx(1.5)
    assert get("layercard_tuning_step_seconds_count", {"source": "predicted"}) == 1  # the failed job had none
    assert get("layercard_tuning_tokens_per_second_count") == 1
    assert get("layercard_card_compute_seconds_count", {"cache": "hit", "outcome": "ok"}) == 1
    assert get("layercard_adapter_deploys_total", {"outcome": "SERVING_BUDGET_EXCEEDED"}) == 1
    assert get("layercard_vllm_errors_total", {"replica": "http://a", "reason": "VLLM_UNAVAILABLE"}) == 1


def test_state_is_read_at_scrape_time(registry):
    deployments = [("bot", "bot@v2", 0.8, 0.5), ("new", "new@v1", None, None)]
    replicas = [("http://a", True, ("bot@v2", "new@v1")), ("http://b", False, ())]
    jobs = {"RUNNING": 1, "SUCCEEDED": 3}
    registry.register(StateCollector(lambda: jobs, lambda: deployments, lambda: replicas))
    get = registry.get_sample_value
    pool = {"pool": "default"}
    assert get("layercard_tuning_jobs", {"state": "SUCCEEDED"}) == 3
    assert get("layercard_vllm_replica_up", {"replica": "http://b", **pool}) == 0
    assert get("layercard_fleet_desired_adapters", {"replica": "http://a", **pool}) == 2
    assert get("layercard_fleet_missing_adapters", {"replica": "http://a", **pool}) == 0
    assert get("layercard_fleet_missing_adapters", {"replica": "http://b", **pool}) == 2
    assert get("layercard_fleet_adapter_loaded", {"adapter": "bot", "replica": "http://b", **pool}) == 0
    assert get("layercard_adapter_overhead_fraction", {"adapter": "bot", **pool}) == 0.8
    assert get("layercard_adapter_overhead_budget_fraction", {"adapter": "bot", **pool}) == 0.5
    assert get("layercard_adapter_overhead_fraction", {"adapter": "new", **pool}) is None

    jobs["SUCCEEDED"] = 4  # nothing cached: the next scrape sees the change
    assert get("layercard_tuning_jobs", {"state": "SUCCEEDED"}) == 4


def test_each_replica_is_held_to_the_deployments_of_its_own_pool(registry):
    deployments = [
        DeployedAdapter("bot", "bot@v2", 0.1, 0.2, "lean"),
        DeployedAdapter("big", "big@v1", 0.7, None, "full"),
    ]
    replicas = [ObservedReplica("http://l", True, ("bot@v2",), "lean"), ObservedReplica("http://f", True, (), "full")]
    registry.register(StateCollector(dict, lambda: deployments, lambda: replicas))
    get = registry.get_sample_value
    assert get("layercard_fleet_desired_adapters", {"replica": "http://l", "pool": "lean"}) == 1
    assert get("layercard_fleet_missing_adapters", {"replica": "http://l", "pool": "lean"}) == 0
    assert get("layercard_fleet_missing_adapters", {"replica": "http://f", "pool": "full"}) == 1  # big, not bot
    assert get("layercard_fleet_adapter_loaded", {"adapter": "bot", "replica": "http://f", "pool": "full"}) is None
    assert get("layercard_adapter_overhead_fraction", {"adapter": "bot", "pool": "lean"}) == 0.1
