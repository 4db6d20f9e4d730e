"""Metrics end to end: a real Prometheus scrapes the service and the real vLLM while real traffic flows.

The traffic is the product's own path: a tuning job trains an adapter, DeployAdapter puts it in vLLM (and a
deploy over its budget is refused), Generate calls go through it and the base model. Prometheus's HTTP API
must then return the gRPC, tuning, deploy, fleet and per-adapter latency series with their labels and
plausible values, and load the project's alerting and recording rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from support.prometheus import PrometheusProcess
from support.server_thread import ServerThread

from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_service.config import ServiceConfig
from layercard_service.data.tasks import get_task

ADAPTER = "metrics-bot"
VALIDATION_JSONL = "".join(
    json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
    for e in get_task("builtin:cipher").validation[:32]
)
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "layercard.yml"


@pytest.fixture(scope="module")
def traffic(vllm_server, tmp_path_factory):
    config = ServiceConfig(
        port=0,
        metrics_port=0,
        log_format="text",
        data_dir=tmp_path_factory.mktemp("state"),
        vllm_urls=(vllm_server.url,),
        max_lora_rank=8,
        job_threads=1,
        reconcile_interval_seconds=1.0,
    )
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        tuning = tuning_pb2_grpc.TuningServiceStub(channel)
        job = tuning.CreateTuningJob(
            tuning_pb2.CreateTuningJobRequest(
                model="builtin:tiny",
                training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
                validation_data=common_pb2.DatasetSource(inline_jsonl=VALIDATION_JSONL.encode()),
                explicit_layers=tuning_pb2.ExplicitLayers(layers=[6, 7], lora=common_pb2.LoraShape(rank=8)),
                hyperparameters=tuning_pb2.Hyperparameters(steps=30, batch_size=8, max_seq_len=64, learning_rate=1e-2),
                adapter_id=ADAPTER,
            ),
            timeout=60,
        )
        list(tuning.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=job.name), timeout=600))  # to its end
        done = tuning.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name), timeout=60)
        assert done.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, done.error_message

        adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
        adapters.DeployAdapter(adapter_pb2.DeployAdapterRequest(adapter=f"adapters/{ADAPTER}"), timeout=300)
        with pytest.raises(grpc.RpcError):  # on vLLM CPU any adapter costs far more than 1 %
            adapters.DeployAdapter(
                adapter_pb2.DeployAdapterRequest(adapter=f"adapters/{ADAPTER}", max_overhead_fraction=0.01),
                timeout=300,
            )
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        for adapter, count in ((ADAPTER, 5), ("", 3)):
            for _ in range(count):
                inference.Generate(
                    inference_pb2.GenerateRequest(
                        prompt="cipher: t s r s =", adapter=adapter, sampling=inference_pb2.SamplingParams(max_tokens=8)
                    ),
                    timeout=120,
                )
        jobs = {
            "layercard": [f"127.0.0.1:{server.server.metrics_port}"],
            "vllm": [vllm_server.url.removeprefix("http://")],
        }
        with PrometheusProcess(jobs, rule_files=[RULES]) as prometheus:
            server.vllm_url = vllm_server.url
            server.prometheus = prometheus
            yield server


def value(prometheus: PrometheusProcess, expr: str, timeout: float = 30.0) -> float:
    """The single value of ``expr`` once Prometheus has scraped it."""
    deadline = time.monotonic() + timeout
    while True:
        result = prometheus.query(expr)
        if result:
            assert len(result) == 1, result
            return float(result[0]["value"][1])
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus has no series for {expr} after {timeout:.0f} s")
        time.sleep(0.5)


def test_grpc_series_count_every_rpc_by_method_and_code(traffic):
    p = traffic.prometheus
    ok = 'grpc_service="layercard.v1.InferenceService",grpc_method="Generate",grpc_code="OK",grpc_type="unary"'
    assert value(p, f"grpc_server_handled_total{{{ok}}}") == 8
    refused = 'grpc_method="DeployAdapter",grpc_code="FailedPrecondition"'
    assert value(p, f"grpc_server_handled_total{{{refused}}}") == 1
    watch = 'grpc_method="WatchTuningJob",grpc_type="server_stream"'
    assert value(p, f"grpc_server_msg_sent_total{{{watch}}}") >= 3
    assert (
        0
        < value(p, 'histogram_quantile(0.5, sum by (le) (grpc_server_handling_seconds_bucket{grpc_method="Generate"}))')
        < 30
    )


def test_tuning_series(traffic):
    p = traffic.prometheus
    assert value(p, 'layercard_tuning_jobs_ended_total{state="SUCCEEDED"}') == 1
    assert value(p, 'layercard_tuning_jobs{state="SUCCEEDED"}') == 1
    assert value(p, 'layercard_tuning_jobs{state="RUNNING"}') == 0
    assert value(p, "layercard_tuning_tokens_per_second_count") == 1
    assert value(p, "layercard_tuning_tokens_per_second_sum") > 10
    assert 0 < value(p, 'layercard_tuning_job_duration_seconds_sum{state="SUCCEEDED"}') < 600


def test_deploy_and_fleet_series(traffic):
    p = traffic.prometheus
    assert value(p, 'layercard_adapter_deploys_total{outcome="ok"}') == 1
    assert value(p, 'layercard_adapter_deploys_total{outcome="SERVING_BUDGET_EXCEEDED"}') == 1
    assert 0 < value(p, 'layercard_adapter_deploy_seconds_sum{outcome="ok"}') < 300
    assert -0.5 < value(p, f'layercard_adapter_overhead_fraction{{adapter="{ADAPTER}"}}') < 20
    replica = f'replica="{traffic.vllm_url}"'
    assert value(p, f"layercard_vllm_replica_up{{{replica}}}") == 1
    assert value(p, f"layercard_fleet_desired_adapters{{{replica}}}") == 1
    assert value(p, f"layercard_fleet_missing_adapters{{{replica}}}") == 0
    assert value(p, f'layercard_fleet_adapter_loaded{{adapter="{ADAPTER}",{replica}}}') == 1


def test_per_adapter_latency_series(traffic):
    p = traffic.prometheus
    assert value(p, f'layercard_inference_request_seconds_count{{adapter="{ADAPTER}"}}') == 5
    assert value(p, 'layercard_inference_request_seconds_count{adapter="base"}') == 3
    assert value(p, f'layercard_inference_requests_total{{adapter="{ADAPTER}",outcome="ok"}}') == 5
    ttft = f'histogram_quantile(0.5, sum by (le) (layercard_inference_time_to_first_token_seconds_bucket{{adapter="{ADAPTER}"}}))'  # noqa: E501
    e2e = f'histogram_quantile(0.5, sum by (le) (layercard_inference_request_seconds_bucket{{adapter="{ADAPTER}"}}))'
    assert 0 < value(p, ttft) <= value(p, e2e) < 30
    # One pool, "default": the pool label is the one a version's live overhead is compared within.
    assert value(p, f'layercard_inference_inter_token_seconds_count{{adapter="{ADAPTER}",pool="default"}}') >= 1


def test_vllm_is_scraped_beside_the_service(traffic):
    # vLLM's own series carry only the base model's name: the per-adapter ones above are what the service adds.
    assert value(traffic.prometheus, 'sum(vllm:e2e_request_latency_seconds_count{job="vllm"})') >= 8


def test_the_project_rules_load_and_evaluate(traffic):
    deadline = time.monotonic() + 30
    while True:
        groups = traffic.prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
            break
        assert time.monotonic() < deadline, "the rules were not evaluated"
        time.sleep(0.5)
    assert {rule["type"] for rule in rules} == {"alerting", "recording"}
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
