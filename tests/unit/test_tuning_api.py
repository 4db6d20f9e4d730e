"""The tuning servicer's conversions, with a real job store and fakes at two seams: the planner and the runner.

The servicer only converts: a card_budget reaches the tuning service as a ``PlannedPlacement``, which the
service plans through its planner, keeping the plan's predictions as domain data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from google.protobuf.json_format import MessageToDict
from support.fakes import RecordingRunner

from layercard.v1 import common_pb2, placement_pb2, tuning_pb2
from layercard_service.api.tuning import TuningServicer, event_to_proto, job_to_proto
from layercard_service.control.tuning import CreateJob, PlannedPlacement, TuningService
from layercard_service.domain.jobs import EvalSummary, JobEvent, JobResult, JobSpec, JobState
from layercard_service.domain.plans import CurvePoint, Estimate, Plan
from layercard_service.errors import FailedPrecondition, NotFound
from layercard_service.persistence.jobs import JobStore


class FakePlanner:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.error = error

    def plan(self, card_name, request) -> Plan:
        self.calls.append((card_name, request))
        if self.error is not None:
            raise self.error

        def e(value: float, unit: str) -> Estimate:
            return Estimate(value, unit, f"test basis for {unit}")

        return Plan(
            layers=(3, 6),
            rank=4,
            alpha=8.0,
            target_modules=("q_proj", "v_proj"),
            objective="accuracy",
            predicted_gain=e(0.4, "fraction"),
            predicted_gain_share=0.8,
            step_seconds=e(0.05, "s"),
            step_fraction_of_full=e(0.5, "fraction"),
            peak_memory_bytes=e(1.5e6, "bytes"),
            adapter_parameters=e(4096, "params"),
            adapter_bytes=e(16384, "bytes"),
            serving_overhead_ms_per_token=None,
            serving_overhead_fraction=None,
            steps=120,
            binding_limits=("max_training_time",),
            rationale="because",
            layer_card=card_name,
            predicted_curve=(CurvePoint(60, 3.0, 0.2, 0.1, 0.3), CurvePoint(120, 6.0, 0.4, 0.3, 0.5)),
            learning_rate=3e-3,
        )


@pytest.fixture
def parts(tmp_path):
    store = JobStore(tmp_path / "state.db")
    runner, planner = RecordingRunner(), FakePlanner()
    yield store, runner, TuningService(store, runner, (), (), max_lora_rank=16, planner=planner), planner
    store.close()


def _card_budget_request(**hp) -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        card_budget=tuning_pb2.CardBudget(
            layer_card="layerCards/abc",
            objective=placement_pb2.OBJECTIVE_ACCURACY,
            budget=placement_pb2.Budget(max_step_fraction_of_full=0.5),
        ),
        hyperparameters=tuning_pb2.Hyperparameters(**hp),
        adapter_id="planned",
    )


def test_card_budget_is_planned_and_the_predictions_are_kept(parts):
    store, runner, service, planner = parts
    job = asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(), None))
    card_name, plan_request = planner.calls[0]
    assert card_name == "layerCards/abc" and plan_request.steps == 200
    assert plan_request.budget.max_step_fraction_of_full == 0.5
    assert list(job.placement.layers) == [3, 6] and job.placement.lora.rank == 4
    assert job.placement.step_seconds.value == 0.05 and job.placement.step_seconds.basis == "test basis for s"
    assert job.placement.rationale == "because" and job.placement.layer_card == "layerCards/abc"
    assert job.total_steps == 120  # the plan chose the steps that fit its training-time budget
    assert runner.submitted == [job.name.split("/")[1]]
    # Kept as domain data: the plan's figures with their basis, in the spec's JSON, no protobuf.
    predictions = store.get(job.name.split("/")[1]).spec.placement.predictions
    assert predictions.step_seconds == Estimate(0.05, "s", "test basis for s")
    assert predictions.binding_limits == ("max_training_time",) and predictions.objective == "accuracy"
    assert predictions.serving_overhead_fraction is None and not job.placement.HasField("serving_overhead_fraction")
    assert job.placement.objective == placement_pb2.OBJECTIVE_ACCURACY
    assert job.placement.adapter_bytes.value == 16384 and job.placement.predicted_gain_share == 0.8

    with_steps = asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(steps=30), None))
    assert planner.calls[1][1].steps == 30 and with_steps.total_steps == 30


def test_the_job_trains_at_the_plans_learning_rate_and_keeps_its_curve(parts):
    store, _, service, _ = parts
    job = asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(), None))
    assert job.hyperparameters.learning_rate == 3e-3 and job.placement.learning_rate == 3e-3
    assert [(p.steps, p.gain) for p in job.placement.predicted_curve] == [(60, 0.2), (120, 0.4)]
    kept = store.get(job.name.split("/")[1]).spec
    assert kept.hyperparameters.learning_rate == 3e-3
    assert kept.placement.predictions.predicted_curve[1] == CurvePoint(120, 6.0, 0.4, 0.3, 0.5)
    own = asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(learning_rate=1e-4), None))
    assert own.hyperparameters.learning_rate == 1e-4  # the caller's rate wins


def test_the_plan_is_priced_for_the_jobs_own_run(parts):
    """The frozen-prefix cache's pricing needs the run: its training set, batch, steps and cache option."""
    *_, service, planner = parts
    asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(), None))
    run = planner.calls[0][1]
    assert (run.train_examples, run.batch_size, run.prefix_cache, run.steps) == (2000, 16, True, 200)
    request = _card_budget_request(epochs=0.5, batch_size=8, prefix_cache=False)
    asyncio.run(TuningServicer(service).CreateTuningJob(request, None))
    run = planner.calls[1][1]
    assert (run.batch_size, run.prefix_cache, run.steps) == (8, False, 125)  # ceil(0.5 x 2000 / 8) steps


def test_a_bad_dataset_is_reported_before_planning(parts):
    *_, service, planner = parts
    request = _card_budget_request()
    request.training_data.builtin = "builtin:nope"
    with pytest.raises(NotFound) as err:
        asyncio.run(TuningServicer(service).CreateTuningJob(request, None))
    assert err.value.reason == "TASK_NOT_FOUND" and not planner.calls


def test_planner_errors_reach_the_caller(parts):
    *_, service, planner = parts
    planner.error = FailedPrecondition("infeasible", reason="BUDGET_INFEASIBLE")
    with pytest.raises(FailedPrecondition):
        asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(), None))


def test_without_a_planner_a_card_budget_is_refused(parts):
    store, runner, *_ = parts
    service = TuningService(store, runner, (), (), max_lora_rank=16)
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(TuningServicer(service).CreateTuningJob(_card_budget_request(), None))
    assert err.value.reason == "NO_PLANNER"


class CapturingTuning:
    """The tuning service's seam: what the servicer hands it."""

    def __init__(self) -> None:
        self.created: list[CreateJob] = []

    async def create(self, request: CreateJob):
        self.created.append(request)
        raise FailedPrecondition("captured", reason="CAPTURED")


def test_the_servicer_does_not_plan_it_hands_the_budget_to_the_tuning_service():
    tuning = CapturingTuning()
    with pytest.raises(FailedPrecondition):
        asyncio.run(TuningServicer(tuning).CreateTuningJob(_card_budget_request(steps=30), None))
    placement = tuning.created[0].placement
    assert isinstance(placement, PlannedPlacement) and placement.layer_card == "layerCards/abc"
    assert placement.request.budget.max_step_fraction_of_full == 0.5 and placement.request.objective == "accuracy"


def test_an_old_record_with_protobuf_json_detail_still_shows_its_placement(parts):
    """Records written before predictions were domain data kept the Placement as protobuf JSON (``detail``)."""
    store, *_ = parts
    asyncio.run(TuningServicer(parts[2]).CreateTuningJob(_card_budget_request(), None))
    record = store.list([], 0, 1)[0]
    old = placement_pb2.Placement(
        layer_card="layerCards/abc",
        objective=placement_pb2.OBJECTIVE_FIXED_K,
        layers=[3, 6],
        lora=common_pb2.LoraShape(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),  # as the record has
        predicted_gain=common_pb2.Prediction(value=float("inf"), unit="nats", basis="gain basis"),
        predicted_gain_share=0.75,
        step_seconds=common_pb2.Prediction(value=0.05, unit="s", basis="step basis"),
        peak_memory_bytes=common_pb2.Prediction(value=1.5e6, unit="bytes", basis="memory basis"),
        serving_overhead_fraction=common_pb2.Prediction(),  # set, every field at its default
        steps=120,
        binding_limits=["max_layers", "max_training_time"],
        rationale="because",
        gain_score="resnorm",
    )
    raw = record.spec.to_dict()
    placement = {k: v for k, v in raw["placement"].items() if k != "predictions"}
    raw["placement"] = {**placement, "steps": 120, "layer_card": "layerCards/abc", "detail": MessageToDict(old)}
    shown = job_to_proto(dataclasses.replace(record, spec=JobSpec.from_dict(json.loads(json.dumps(raw)))))
    assert shown.placement == old


def test_job_and_events_to_proto(parts):
    store, *_ = parts
    servicer_job = asyncio.run(
        TuningServicer(parts[2]).CreateTuningJob(_card_budget_request(epochs=0.5, batch_size=8), None)
    )
    assert servicer_job.hyperparameters.epochs == 0.5 and servicer_job.total_steps == 125  # ceil(0.5 * 2000 / 8)
    job_id = servicer_job.name.split("/")[1]
    store.transition(job_id, [JobState.QUEUED], JobState.RUNNING)
    result = JobResult(
        "adapters/planned/versions/1", EvalSummary(125, 1.5, 0.25, 32), None, 0.06, 0.05, 10, 15, 7.5, 2e3
    )
    store.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, "done", result=result)
    message = job_to_proto(store.get(job_id))
    assert message.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED and message.end_time.seconds > 0
    assert message.result.final_eval.exact_match == 0.25 and not message.result.HasField("base_eval")
    assert message.result.training_duration.ToMilliseconds() == 7500

    def event(kind: str, payload: dict) -> tuning_pb2.TuningJobEvent:
        return event_to_proto(JobEvent(job_id, 7, 1.5, kind, payload, "m"))

    assert event("state", {"state": "CANCELLING"}).state_change == tuning_pb2.TUNING_JOB_STATE_CANCELLING
    step = event("step", {"step": 3, "loss": 2.0, "learning_rate": 0.1, "tokens_per_second": 9.0, "eta_seconds": 1.5})
    assert step.step.step == 3 and step.step.eta.ToMilliseconds() == 1500 and step.sequence == 7
    assert event("eval", {"step": 0, "loss": 3.0, "exact_match": 0.0, "examples": 4}).eval.examples == 4
    assert event("checkpoint", {"step": 5, "path": "/x"}).checkpoint.path == "/x"
    note = event("note", {})
    assert note.WhichOneof("event") is None and note.message == "m"


def test_early_stopping_min_deltas_are_the_callers_or_the_defaults(parts):
    store, _, service, _ = parts
    servicer = TuningServicer(service)
    chosen = asyncio.run(
        servicer.CreateTuningJob(
            _card_budget_request(early_stopping_min_delta=0.05, early_stopping_min_delta_relative=0.0), None
        )
    )
    assert chosen.hyperparameters.early_stopping_min_delta == 0.05
    assert chosen.hyperparameters.HasField("early_stopping_min_delta_relative")
    assert chosen.hyperparameters.early_stopping_min_delta_relative == 0.0
    stored = store.get(chosen.name.split("/")[1]).spec.hyperparameters
    assert (stored.early_stopping_min_delta, stored.early_stopping_min_delta_rel) == (0.05, 0.0)
    default = asyncio.run(servicer.CreateTuningJob(_card_budget_request(), None)).hyperparameters
    assert (default.early_stopping_min_delta, default.early_stopping_min_delta_relative) == (1e-4, 1e-3)
