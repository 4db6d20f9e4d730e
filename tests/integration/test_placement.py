"""PlacementService over a real socket: a real card from the built-in model, plans under budgets, bad inputs."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, placement_pb2, placement_pb2_grpc
from layercard_service.config import ServiceConfig


@pytest.fixture(scope="module")
def planning(tmp_path_factory):
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path_factory.mktemp("state"))
    with ServerThread(config) as running:
        with grpc.insecure_channel(running.address) as channel:
            cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
            compute = layer_card_pb2.ComputeLayerCardRequest(
                model="builtin:tiny",
                dataset=common_pb2.DatasetSource(builtin="builtin:cipher"),
                probe_size=32,
                max_seq_len=48,
            )
            running.card = list(cards.ComputeLayerCard(compute, timeout=600))[-1].card
            running.stub = placement_pb2_grpc.PlacementServiceStub(channel)
            running.health = health_pb2_grpc.HealthStub(channel)
            yield running


def plan(server, **fields) -> placement_pb2.Placement:
    fields.setdefault("layer_card", server.card.name)
    return server.stub.PlanPlacement(placement_pb2.PlanPlacementRequest(**fields), timeout=30)


def test_plan_without_budget_adapts_every_layer(planning):
    p = plan(planning)
    assert list(p.layers) == list(range(8))
    assert p.layer_card == planning.card.name
    assert p.objective == placement_pb2.OBJECTIVE_ACCURACY
    assert p.lora.rank == 8 and len(p.lora.target_modules) == 7
    assert p.predicted_gain_share == pytest.approx(1.0)
    assert p.step_fraction_of_full.value == pytest.approx(1.0)
    assert p.gain_score == "resnorm"
    for field in ("predicted_gain", "step_seconds", "peak_memory_bytes", "adapter_parameters", "adapter_bytes"):
        assert getattr(p, field).basis, field


def test_plan_under_a_step_budget_matches_the_card_cost_model(planning):
    p = plan(planning, budget=placement_pb2.Budget(max_step_fraction_of_full=0.8))
    assert p.step_fraction_of_full.value <= 0.8
    assert len(p.layers) < 8
    assert "max_step_fraction_of_full" in p.binding_limits
    assert p.rationale


def test_plan_with_a_training_time_budget_chooses_steps(planning):
    full_step = plan(planning).step_seconds.value
    limit = duration_pb2.Duration()
    limit.FromNanoseconds(int(100 * full_step * 1e9))
    p = plan(planning, budget=placement_pb2.Budget(max_training_time=limit), steps=200)
    # A cached plan pays the frozen-prefix cache's building pass before its steps.
    build = p.prefix_cache_build_seconds.value if p.HasField("prefix_cache_build_seconds") else 0.0
    assert 0 < build + p.steps * p.step_seconds.value <= 100 * full_step * (1 + 1e-6)
    assert abs(p.steps - (100 * full_step - build) / p.step_seconds.value) < 1.01


@pytest.mark.parametrize("objective", [placement_pb2.OBJECTIVE_EFFICIENCY, placement_pb2.OBJECTIVE_FIXED_K])
def test_a_huge_training_time_plans_no_more_steps_than_a_job_takes(planning, objective):
    """The steps that fit in about 292 billion years overflowed the contract's int32 (INTERNAL before)."""
    limit = duration_pb2.Duration(seconds=9_223_372_036)
    p = plan(planning, budget=placement_pb2.Budget(max_training_time=limit), objective=objective, k=2)
    if objective == placement_pb2.OBJECTIVE_EFFICIENCY:  # the steps to the target on the learning curve, capped
        assert 0 < p.steps <= 1_000_000
    else:
        assert p.steps == 1_000_000


def test_peft_serving_budget_and_fixed_k(planning):
    one_layer = planning.card.layers[0].peft_serving_overhead_ms_per_token
    p = plan(
        planning,
        objective=placement_pb2.OBJECTIVE_FIXED_K,
        k=2,
        budget=placement_pb2.Budget(
            serving_engine=common_pb2.SERVING_ENGINE_PEFT, max_serving_overhead_ms_per_token=2.5 * one_layer
        ),
    )
    assert len(p.layers) == 2
    assert p.serving_overhead_ms_per_token.value == pytest.approx(2 * one_layer, rel=1e-3)


def _details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest]:
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    for detail in rpc_status.from_call(err).details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
    return info, bad


def test_infeasible_budget_is_failed_precondition_with_the_cheapest_plan(planning):
    with pytest.raises(grpc.RpcError) as err:
        plan(planning, budget=placement_pb2.Budget(max_step_fraction_of_full=0.05))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = _details(err.value)
    assert info.reason == "BUDGET_INFEASIBLE"
    assert len(info.metadata["cheapest_layers"].split(",")) == 1  # a single upper block is the cheapest step
    assert float(info.metadata["cheapest_step_fraction_of_full"]) > 0.05


def test_the_card_prices_the_frozen_prefix_cache(planning):
    """A budget between the cheapest cached and uncached steps plans only with the cache; off, it is infeasible
    and the error names the cheapest plan's cost as the trainer would run it."""
    assert planning.card.training_cost.prefix_cache_bytes_per_token > 0

    def cheapest(**fields) -> tuple[dict, str]:
        with pytest.raises(grpc.RpcError) as err:
            plan(planning, budget=placement_pb2.Budget(max_step_fraction_of_full=0.01), **fields)
        return dict(_details(err.value)[0].metadata), err.value.details()

    cached, message = cheapest()
    uncached, off_message = cheapest(prefix_cache=False)
    assert cached["cheapest_prefix_cache"] == "on" and "with the frozen-prefix cache (" in message
    assert uncached["cheapest_prefix_cache"] == "off" and "the request turns the frozen-prefix cache off" in off_message
    low, high = float(cached["cheapest_step_fraction_of_full"]), float(uncached["cheapest_step_fraction_of_full"])
    assert low < high and float(cached["cheapest_uncached_step_seconds"]) == pytest.approx(
        float(uncached["cheapest_step_seconds"]), rel=1e-4
    )

    budget = placement_pb2.Budget(max_step_fraction_of_full=(low + high) / 2)
    p = plan(planning, budget=budget)
    assert p.step_fraction_of_full.value <= (low + high) / 2 and min(p.layers) > 0
    assert p.HasField("prefix_cache_build_seconds") and p.prefix_cache_bytes.value > 0
    assert "frozen-prefix cache over blocks 0.." in p.step_seconds.basis
    with pytest.raises(grpc.RpcError) as err:
        plan(planning, budget=budget, prefix_cache=False)
    assert _details(err.value)[0].reason == "BUDGET_INFEASIBLE"
    # 10 steps over 10,000 examples see each at most once: the trainer would not build the cache, nor does the plan.
    with pytest.raises(grpc.RpcError) as err:
        plan(planning, budget=budget, train_examples=10_000, steps=10)
    assert "see each of its 10000 examples at most once" in err.value.details()


def test_vllm_budget_before_any_measurement(planning):
    with pytest.raises(grpc.RpcError) as err:
        plan(planning, budget=placement_pb2.Budget(max_serving_overhead_fraction=0.5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _details(err.value)[0].reason == "SERVING_COST_UNKNOWN"


BAD = [
    ("no card", dict(layer_card=""), grpc.StatusCode.INVALID_ARGUMENT, "layer_card"),
    ("not a card name", dict(layer_card="cards/x"), grpc.StatusCode.INVALID_ARGUMENT, "layer_card"),
    ("unknown card", dict(layer_card="layerCards/nope"), grpc.StatusCode.NOT_FOUND, None),
    ("unknown objective", dict(objective=42), grpc.StatusCode.INVALID_ARGUMENT, "objective"),
    ("fixed k without k", dict(objective=placement_pb2.OBJECTIVE_FIXED_K), grpc.StatusCode.INVALID_ARGUMENT, "k"),
    ("k over layers", dict(objective=placement_pb2.OBJECTIVE_FIXED_K, k=9), grpc.StatusCode.INVALID_ARGUMENT, "k"),
    ("target over 1", dict(target_gain_fraction=1.5), grpc.StatusCode.INVALID_ARGUMENT, "target_gain_fraction"),
    ("rank 0", dict(candidate_ranks=[0]), grpc.StatusCode.INVALID_ARGUMENT, "candidate_ranks"),
    (
        "module the card lacks",
        dict(candidate_module_sets=["c_attn"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "candidate_module_sets",
    ),
    ("unknown score", dict(gain_score="magic"), grpc.StatusCode.INVALID_ARGUMENT, "gain_score"),
    (
        "negative budget",
        dict(budget=placement_pb2.Budget(max_step_seconds=-1.0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "budget.max_step_seconds",
    ),
    (
        "zero training time",
        dict(budget=placement_pb2.Budget(max_training_time=duration_pb2.Duration())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "budget.max_training_time",
    ),
    (
        "negative serving concurrency",
        dict(budget=placement_pb2.Budget(serving_concurrency=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "budget.serving_concurrency",
    ),
    (
        "serving concurrency over 1024",
        dict(budget=placement_pb2.Budget(serving_concurrency=1025)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "budget.serving_concurrency",
    ),
    ("negative steps", dict(steps=-5), grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    ("negative train_examples", dict(train_examples=-1), grpc.StatusCode.INVALID_ARGUMENT, "train_examples"),
    ("negative batch_size", dict(batch_size=-8), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
]


@pytest.mark.parametrize(("case", "fields", "code", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(planning, case, fields, code, field):
    with pytest.raises(grpc.RpcError) as err:
        plan(planning, **fields)
    assert err.value.code() == code, err.value.details()
    if field is not None:
        _, bad = _details(err.value)
        assert [v.field for v in bad.field_violations] == [field]
    health = planning.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert list(plan(planning).layers) == list(range(8))  # state intact: the card still plans


def test_cli_plan_prints_the_plan_and_its_json(planning, capsys):
    from layercard_client.cli import main

    argv = ["--address", planning.address, "--json", "plan", planning.card.name, "--max-step-fraction", "0.8"]
    assert main([*argv, "--max-training-time", "12.5", "--steps", "100", "--gain-score", "split_half"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["gainScore"] == "split_half" and printed["stepFractionOfFull"]["value"] <= 0.8
    assert main(["--address", planning.address, "plan", planning.card.name, "--max-step-fraction", "0.01"]) != 0
    assert "BUDGET_INFEASIBLE" in capsys.readouterr().err
