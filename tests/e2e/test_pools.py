"""Two real vLLM serving pools of different LoRA settings behind one service: a serving budget steers the plan.

The "lean" pool is ``vllm_lean`` (``--lora-target-modules o_proj``), the "full" pool the second server of the
pair (every LoRA-capable module). Each pool is calibrated the way a fleet is in service: deploys to it, whose
post-load probes measure the pool's overhead at rank 8 (and at 4 streams). Then a plan under a budget between
the two overheads must take the lean pool's modules; the job trains them; the deploy lands on the lean pool, at
the calibrated overhead the plan was priced with, within the budget; a budget no pool meets is refused naming
the cheapest pool. Last, a version forced onto the full pool under a small budget is judged on live traffic and
rolled back to the lean pool's version.

Order matters and is the order of the file.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import pytest
from conftest import MAX_LORA_RANK
from support.adapters import publish_version, train_word_adapter
from support.server_thread import ServerThread
from test_fleet import models_on, wait_for

from layercard.v1 import adapter_pb2, tuning_pb2
from layercard_client.builders import dataset_source
from layercard_client.client import LayercardClient
from layercard_client.errors import FailedPrecondition, InvalidArgument, LayercardClientError
from layercard_service.config import ServiceConfig
from layercard_service.persistence.jobs import JobStore
from layercard_service.serving.pool_spec import PoolSpec

MODEL = "builtin:tiny"
TASK = "builtin:cipher"
CALIBRATION = "pool-calibration"
CALIBRATING_PROBES = 3  # per pool: the service's default serving_calibration_min_probes
LIVE_WINDOW_SECONDS, LIVE_MIN_REQUESTS = 45.0, 8


@pytest.fixture(scope="module")
def service(vllm_pair, vllm_lean, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("state")
    words = tmp_path_factory.mktemp("adapters")
    publish_version(data_dir, CALIBRATION, train_word_adapter(words / "zebra", "zebra"))  # rank 8 on o_proj
    lean, full = vllm_lean.url, vllm_pair[1].url
    config = ServiceConfig(
        port=0,
        log_format="text",
        data_dir=data_dir,
        vllm_pools=(
            PoolSpec("lean", (lean,), target_modules=("o_proj",), max_lora_rank=MAX_LORA_RANK),
            PoolSpec("full", (full,), max_lora_rank=MAX_LORA_RANK),
        ),
        vllm_model=MODEL,
        max_lora_rank=MAX_LORA_RANK,
        reconcile_interval_seconds=1.0,
        live_window_seconds=LIVE_WINDOW_SECONDS,
        live_min_requests=LIVE_MIN_REQUESTS,
        serving_probe_concurrency=(4,),  # probes also measure 4 requests at once
    )
    with ServerThread(config) as running, LayercardClient(running.address) as client:
        client.lean, client.full, client.data_dir = lean, full, data_dir
        client.measured = {}
        yield client
        for adapter in (CALIBRATION, "steered"):  # the pair's servers outlive this module: free their LoRA slots
            with contextlib.suppress(LayercardClientError):
                client.undeploy_adapter(adapter, timeout=120)


def test_each_pool_is_calibrated_by_deploys_to_it(service):
    probes = {"full": [], "lean": []}
    for _ in range(CALIBRATING_PROBES):  # one adapter, moved: each probe measures the pool it lands on
        for pool in ("full", "lean"):
            deployment = service.deploy_adapter(CALIBRATION, pool=pool, full_latency_probe=True, timeout=300)
            assert deployment.pool == pool and deployment.state == adapter_pb2.DEPLOYMENT_STATE_READY
            assert [r.replica for r in deployment.replicas] == [getattr(service, pool)]
            assert deployment.latency.source == adapter_pb2.LATENCY_SOURCE_PROBE
            assert any(c.name == "latency_4_streams" for c in deployment.checks)
            probes[pool].append(deployment.latency.overhead_fraction)
    assert f"{CALIBRATION}@v1" in models_on(service.lean) and f"{CALIBRATION}@v1" not in models_on(service.full)
    service.measured = {pool: statistics.median(found) for pool, found in probes.items()}
    # vLLM wraps every layer of each module type it is started with: the lean pool costs less per request
    # (ENVIRONMENT.md: +13% against +71% to +116%). The rest of this module rests on that gap; one probe swings
    # by tens of points on a busy 2-core machine, so the medians are compared, and only for their order.
    assert 0 < service.measured["lean"] < service.measured["full"], probes


def _budget(service) -> float:
    """Between the two pools' measured overheads: the lean pool meets it, the full one does not."""
    return (service.measured["lean"] + service.measured["full"]) / 2


def test_a_tight_budget_plans_the_lean_pools_modules_and_the_job_trains_them(service):
    stream = service.compute_layer_card(model=MODEL, dataset=dataset_source(TASK), probe_size=16)
    with stream:
        card = next(event.card for event in stream if event.HasField("card"))
    service.card = card.name
    budget = {"max_serving_overhead_fraction": _budget(service)}
    plan = service.plan_placement(card.name, budget=budget)
    assert plan.serving_pool == "lean" and list(plan.lora.target_modules) == ["o_proj"]
    assert plan.serving_overhead_fraction.value == pytest.approx(service.measured["lean"])
    assert "serving pool 'lean'" in plan.serving_overhead_fraction.basis
    # Without the budget the card's own shape adapts every module type: only the full pool can serve it.
    assert service.plan_placement(card.name).serving_pool == "full"
    # A budget for 4 requests at once is priced with the probes at 4 streams.
    loaded = service.plan_placement(card.name, budget={"max_serving_overhead_fraction": 10.0, "serving_concurrency": 4})
    assert "probed at 4 streams" in loaded.serving_overhead_fraction.basis, loaded.serving_overhead_fraction.basis

    job = service.create_tuning_job(
        model=MODEL,
        training_data=dataset_source(TASK),
        adapter_id="steered",
        card_budget={"layer_card": card.name, "budget": budget},
        hyperparameters={"steps": 20, "batch_size": 8},
    )
    with service.watch_tuning_job(job.name, timeout=600) as events:
        for _ in events:
            pass
    job = service.get_tuning_job(job.name)
    assert job.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, job.error
    assert job.placement.serving_pool == "lean" and list(job.placement.lora.target_modules) == ["o_proj"]


def test_the_job_s_adapter_deploys_to_the_lean_pool_within_the_budget(service):
    budget = _budget(service)
    deployment = service.deploy_adapter("steered", max_overhead_fraction=budget, timeout=300)
    assert deployment.pool == "lean" and deployment.state == adapter_pb2.DEPLOYMENT_STATE_READY
    assert [r.replica for r in deployment.replicas] == [service.lean]
    assert any(c.name == "pool" and "chosen by the adapter's plan" in c.detail for c in deployment.checks)
    # Its serving shape (the lean pool's settings, rank 8) is calibrated: the deploy takes the figures the plan was
    # priced with instead of a probe, and live traffic judges it from here (the last test).
    assert deployment.latency.source == adapter_pb2.LATENCY_SOURCE_SHAPE_CALIBRATION
    assert deployment.latency.overhead_fraction == pytest.approx(service.measured["lean"])
    assert deployment.latency.overhead_fraction <= budget
    answer = service.generate(prompt="hello", adapter="steered", sampling={"max_tokens": 4}, timeout=120)
    assert answer.replica == service.lean and answer.served_model == "steered@v1"
    assert "steered@v1" not in models_on(service.full)


def test_a_budget_no_pool_meets_is_refused_naming_the_cheapest_pool(service):
    with pytest.raises(FailedPrecondition) as err:
        service.plan_placement(service.card, budget={"max_serving_overhead_fraction": service.measured["lean"] / 4})
    assert err.value.reason == "BUDGET_INFEASIBLE" and err.value.metadata["cheapest_serving_pool"] == "lean"
    assert "on serving pool 'lean'" in err.value.message
    # A shape over every pool's max rank: no pool can serve it, and each says why.
    with pytest.raises(FailedPrecondition) as err:
        service.plan_placement(
            service.card, budget={"max_serving_overhead_fraction": 1.0}, candidate_ranks=[2 * MAX_LORA_RANK]
        )
    assert err.value.reason == "SERVING_SHAPE_UNSERVABLE"
    assert "serving pool 'lean'" in err.value.message and "serving pool 'full'" in err.value.message


def test_a_pool_that_does_not_exist_is_refused_and_nothing_moves(service):
    with pytest.raises(InvalidArgument) as err:
        service.deploy_adapter("steered", pool="gpu", timeout=60)
    assert err.value.field_violations[0].field == "pool"
    listed = {a.name: a for a in service.list_adapters().adapters}
    assert listed["adapters/steered"].deployment.pool == "lean"
    assert "steered@v1" in models_on(service.lean)


def test_a_version_over_its_budget_on_live_traffic_rolls_back_to_the_pool_it_came_from(service):
    """Version 2 of the lean adapter, forced onto the full pool under a budget of 10%: live traffic shows it over,
    and the service restores version 1 on the lean pool."""
    listed = next(a for a in service.list_adapters().adapters if a.name == "adapters/steered")
    assert listed.deployment.version == 1 and listed.deployment.pool == "lean"
    jobs = JobStore(service.data_dir / "state.db")
    source = Path(jobs.versions("steered")[0].path)
    jobs.close()
    assert publish_version(service.data_dir, "steered", source) == 2  # the same weights, a new version
    budget = 0.1  # the full pool measured +60% to +110% in every run of this module and of bench.serving
    deployment = service.deploy_adapter(
        "steered", version=2, pool="full", max_overhead_fraction=budget, force=True, rollback_over_budget=True,
        timeout=300,
    )  # fmt: skip
    assert deployment.pool == "full" and deployment.version == 2
    assert any(c.name == "live_latency" and c.outcome == adapter_pb2.CHECK_OUTCOME_PENDING for c in deployment.checks)
    # The judge compares with base requests on the version's pool. Base requests take turns over both pools'
    # servers, so two in a row reach both; a judged request has two or more tokens (inter-token time).
    served = {"adapter": 0, "base on full": 0}
    deadline = time.monotonic() + LIVE_WINDOW_SECONDS
    while min(served.values()) < 2 * LIVE_MIN_REQUESTS and time.monotonic() < deadline:
        for adapter in ("steered", "", ""):
            answer = service.generate(prompt="The module", adapter=adapter, sampling={"max_tokens": 8}, timeout=60)
            if answer.usage.completion_tokens >= 2:
                served["adapter"] += adapter == "steered"
                served["base on full"] += not adapter and answer.replica == service.full
    assert min(served.values()) >= LIVE_MIN_REQUESTS, served  # what the judge needs, within its window

    def steered() -> adapter_pb2.Adapter:
        return next(a for a in service.list_adapters().adapters if a.name == "adapters/steered")

    try:
        wait_for(lambda: steered().deployment.version == 1, LIVE_WINDOW_SECONDS + 120, "the rollback")
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}; the adapter's live verdict: {steered().live_verdict}") from None
    verdict = steered().live_verdict  # why version 1 serves again, as the API tells it
    assert verdict.version == 2 and verdict.outcome == adapter_pb2.LIVE_OUTCOME_OVER, verdict
    assert verdict.overhead_fraction > budget and verdict.base_requests >= LIVE_MIN_REQUESTS
    back = steered().deployment
    assert back.pool == "lean"
    assert "steered@v1" in models_on(service.lean) and "steered@v2" not in models_on(service.full)
