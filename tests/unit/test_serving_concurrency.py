"""Serving cost at several requests at once: probes at N streams, stored apart, and budgets priced at them.

The deploys run on support/fleet.py's fake vLLM servers; the plans on test_planner.py's synthetic cards.
"""

from __future__ import annotations

import pytest
from support.fakes import BASE
from support.fleet import MODEL, make_env, run_async
from test_planner import GAINS, make_card, plan

from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.control.deployments import AdapterManager, DeploySettings
from layercard_service.core import _pool_fleet
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.persistence.deployments import DeploymentStore, LatencyMeasurement, ServingShape
from layercard_service.serving.pool_spec import PoolSpec
from layercard_service.serving.probes import measure_latency

POOL = PoolSpec("lean", ("http://a:8000",), "", ("o_proj",), 8)
SHAPE = ServingShape(MODEL, ("o_proj",), 8, 8)


def _probe(overhead: float, streams: int) -> LatencyMeasurement:
    return LatencyMeasurement("http://a:8000", 40.0, 44.0, 2.0, 2.0 * (1 + overhead), overhead, 5, concurrency=streams)


@run_async
async def test_a_probe_at_n_streams_sends_n_requests_at_once_per_side(tmp_path):
    env = make_env(tmp_path)
    fake = env.replicas[0]
    fake.loaded["bot@v1"] = "/a"
    fake.adapter_latency_factor = 1.5
    m = await measure_latency(fake, BASE, "bot@v1", samples=2, concurrency=3)
    assert m.concurrency == 3 and m.overhead_fraction == pytest.approx(0.5)
    assert len(env.calls("complete", "bot@v1")) == 1 + 2 * 3  # a warm-up, then 3 at once in each of 2 pairs


@run_async
async def test_a_deploy_probes_at_the_configured_stream_counts_and_holds_the_budget_to_one_stream(tmp_path):
    env = make_env(tmp_path)
    manager = AdapterManager(env.fleet, env.proxy, env.jobs, env.store, DeploySettings(probe_concurrency=(4,)))
    env.publish("bot")
    view = await manager.deploy("adapters/bot", max_overhead_fraction=1.0)
    names = [c.name for c in view.checks]
    assert "latency_4_streams" in names and names.index("latency_4_streams") < names.index("budget")
    assert view.latency.concurrency == 1  # the deploy's own figure, which the budget was held to
    settings = env.fleet.settings
    at_four = env.store.rank_calibrations(MODEL, settings.target_modules, settings.max_lora_rank, 4)
    assert at_four[8].samples == 1 and "at 4 streams" in at_four[8].basis


def test_measurements_at_other_stream_counts_stay_out_of_one_stream_figures(tmp_path):
    store = DeploymentStore(tmp_path / "state.db")
    for overhead, streams in ((0.1, 1), (0.1, 1), (0.1, 1), (0.6, 4)):
        store.add_measurement(SHAPE, "bot", 1, _probe(overhead, streams))
    assert store.concurrencies(MODEL, ("o_proj",), 8) == (1, 4)
    assert store.shape_calibration(SHAPE, 3, 3600.0).overhead_fraction == pytest.approx(0.1)
    assert store.calibration(MODEL).overhead_fraction == pytest.approx(0.1)
    assert store.rank_calibrations(MODEL, ("o_proj",), 8, 4)[8].overhead_fraction == pytest.approx(0.6)


def test_a_budget_at_n_streams_is_priced_at_n_streams_or_the_nearest_count_probed(tmp_path):
    store = DeploymentStore(tmp_path / "state.db")
    store.add_measurement(SHAPE, "bot", 1, _probe(0.1, 1))
    store.add_measurement(SHAPE, "bot", 1, _probe(0.6, 4))
    card = make_card(GAINS, vllm_fraction=0.1)
    one = plan(card, budget={"max_serving_overhead_fraction": 1.0}, vllm=_pool_fleet(store, MODEL, POOL, 1))
    assert one.serving_overhead_fraction.value == pytest.approx(0.1)
    four = plan(card, budget={"max_serving_overhead_fraction": 1.0}, vllm=_pool_fleet(store, MODEL, POOL, 4))
    assert four.serving_overhead_fraction.value == pytest.approx(0.6)
    assert "probed at 4 streams" in four.serving_overhead_fraction.basis
    eight = _pool_fleet(store, MODEL, POOL, 8)  # never probed at 8: the highest count below
    assert (eight.streams, eight.by_rank[8].overhead_fraction) == (4, pytest.approx(0.6))
    assert "not probed at 8 streams" in eight.describe()
    with pytest.raises(FailedPrecondition) as err:  # within it at one stream, over it at 4 (0.6 > 0.5)
        plan(card, budget={"max_serving_overhead_fraction": 0.5}, vllm=_pool_fleet(store, MODEL, POOL, 4))
    assert err.value.reason == "BUDGET_INFEASIBLE"


@pytest.mark.parametrize("streams", [0, -1, 1025])
def test_a_budgets_concurrency_out_of_range_is_invalid(streams):
    with pytest.raises(InvalidArgument, match=r"budget\.serving_concurrency"):
        plan(make_card(GAINS), budget={"serving_concurrency": streams})


@pytest.mark.parametrize("text", ["1", "65", "4,x"])
def test_bad_probe_stream_counts_are_refused(text):
    with pytest.raises(ConfigError):
        ServiceConfig.load(["--serving-probe-concurrency", text], environ={})
    assert ServiceConfig.load(["--serving-probe-concurrency", "4,8"], environ={}).serving_probe_concurrency == (4, 8)


@run_async
async def test_a_deploy_probe_times_the_configured_number_of_pairs(tmp_path):
    """--serving-probe-samples: a steadier figure for a tight budget's check, at the price of a slower deploy."""
    env = make_env(tmp_path)
    settings = DeploySettings(probe_concurrency=(4,), probe_samples=9)
    manager = AdapterManager(env.fleet, env.proxy, env.jobs, env.store, settings)
    env.publish("bot")
    view = await manager.deploy("adapters/bot", max_overhead_fraction=1.0)
    assert view.latency.samples == 9
    one_stream, at_four = 1 + 9, 1 + 9 * 4  # a warm-up, then each pair's adapter side: 1 request, or 4 at once
    effect = len(env.calls("complete", "bot@v1")) - one_stream - at_four
    assert 0 < effect <= 3  # what is left is the effect probe's greedy prompts (it stops at the first that differs)


@pytest.mark.parametrize("text", ["0", "101", "x"])
def test_bad_probe_sample_counts_are_refused(text):
    with pytest.raises(ConfigError):
        ServiceConfig.load(["--serving-probe-samples", text], environ={})
    assert ServiceConfig.load(["--serving-probe-samples", "15"], environ={}).serving_probe_samples == 15
