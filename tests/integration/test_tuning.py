"""Tuning jobs end to end: the real server on a socket, real SQLite, real worker processes on builtin:tiny.

Jobs are kept short (tens of steps, batch 8, 64 tokens, 32 validation examples) but real: the adapter must
load in peft and beat the base model on the task's validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.tasks import get_task
from layercard_service.domain.jobs import JobState
from layercard_service.persistence.jobs import JobStore

pytestmark = pytest.mark.slow

S = tuning_pb2
VALIDATION = get_task("builtin:cipher").validation[:32]
VALIDATION_JSONL = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in VALIDATION)


def _hp(**overrides) -> tuning_pb2.Hyperparameters:
    values = dict(steps=40, batch_size=8, max_seq_len=64, learning_rate=3e-3, checkpoint_interval=10)
    values.update(overrides)
    return tuning_pb2.Hyperparameters(**values)


def _request(adapter_id: str = "cipher-bot", **overrides) -> tuning_pb2.CreateTuningJobRequest:
    values = dict(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        validation_data=common_pb2.DatasetSource(inline_jsonl=VALIDATION_JSONL.encode()),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[4, 5, 6, 7], lora=common_pb2.LoraShape(rank=8)),
        hyperparameters=_hp(),
        adapter_id=adapter_id,
    )
    values.update(overrides)
    return tuning_pb2.CreateTuningJobRequest(**values)


def _config(data_dir: Path, **overrides) -> ServiceConfig:
    # One torch thread per worker: the test machine may be busy, and oversubscribed threads stall every step.
    return ServiceConfig(port=0, log_format="text", data_dir=data_dir, job_threads=1, **overrides)


def _watch(stub, name: str, after: int = 0, timeout: float = 300) -> list[tuning_pb2.TuningJobEvent]:
    return list(stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=name, after_sequence=after), timeout=timeout))


def _wait_for_event(stub, name: str, predicate, timeout: float = 300) -> list[tuning_pb2.TuningJobEvent]:
    """Watches until an event satisfies ``predicate``; returns the events so far (the stream is cancelled)."""
    seen = []
    call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=name), timeout=timeout)
    for event in call:
        seen.append(event)
        if predicate(event):
            call.cancel()
            return seen
    raise AssertionError(f"the job ended before the awaited event; events: {seen}")


def _states(events) -> list[int]:
    return [e.state_change for e in events if e.WhichOneof("event") == "state_change"]


def _steps(events) -> list[int]:
    return [e.step.step for e in events if e.WhichOneof("event") == "step"]


def _details(err: grpc.RpcError) -> dict[str, object]:
    found: dict[str, object] = {}
    for detail in rpc_status.from_call(err).details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


@pytest.fixture(scope="module")
def tuning_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("datasets")
    config = _config(tmp_path_factory.mktemp("state"), dataset_roots=(data,), max_concurrent_jobs=1)
    with ServerThread(config) as running:
        running.datasets = data
        with grpc.insecure_channel(running.address) as channel:
            running.stub = tuning_pb2_grpc.TuningServiceStub(channel)
            yield running


def test_job_runs_to_success_with_streamed_events_and_an_adapter_that_beats_the_base(tuning_server):
    stub = tuning_server.stub
    job = stub.CreateTuningJob(_request(hyperparameters=_hp(steps=30, eval_interval=15)), timeout=60)
    assert job.state == S.TUNING_JOB_STATE_QUEUED and job.total_steps == 30
    assert job.hyperparameters.warmup_steps == 2 and job.hyperparameters.schedule == S.LEARNING_RATE_SCHEDULE_COSINE

    events = _watch(stub, job.name)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert _states(events) == [S.TUNING_JOB_STATE_QUEUED, S.TUNING_JOB_STATE_RUNNING, S.TUNING_JOB_STATE_SUCCEEDED]
    assert _steps(events) == list(range(1, 31))
    step = next(e.step for e in events if e.WhichOneof("event") == "step" and e.step.step == 10)
    assert step.loss > 0 and step.learning_rate > 0 and step.tokens_per_second > 0 and step.eta.seconds >= 0
    evals = [e.eval for e in events if e.WhichOneof("event") == "eval"]
    assert [e.step for e in evals] == [0, 15, 30] and all(e.examples == 32 for e in evals)
    assert [e.checkpoint.step for e in events if e.WhichOneof("event") == "checkpoint"] == [10, 20]

    done = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name), timeout=10)
    result = done.result
    assert done.state == S.TUNING_JOB_STATE_SUCCEEDED and done.step == 30 and done.error_code == ""
    assert result.adapter_version == "adapters/cipher-bot/versions/1"
    assert result.base_eval.loss - result.final_eval.loss > 1.0  # nats: a real improvement, not noise
    assert result.measured_step_seconds > 0 and result.measured_peak_memory_bytes > 0
    assert result.predicted_step_seconds == 0 and result.predicted_peak_memory_bytes == 0  # explicit layers
    assert result.training_duration.ToNanoseconds() > 0 and result.tokens_per_second > 0

    # A late watcher gets the whole history, and a resumed watch only what follows.
    assert [e.sequence for e in _watch(stub, job.name)] == [e.sequence for e in events]
    assert [e.sequence for e in _watch(stub, job.name, after=len(events) - 2)] == [len(events) - 1, len(events)]

    # The artifact: peft format, loads on the base model and beats it on the validation loss.
    from peft import PeftModel

    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model
    from layercard_service.trainer.evaluate import mean_completion_loss

    path = tuning_server.config.data_dir / "artifacts" / "adapters" / "cipher-bot" / "1"
    card = json.loads((path / "layercard.json").read_text())
    assert card["job_id"] == done.name.split("/")[1] and card["final_eval"]["loss"] == pytest.approx(
        result.final_eval.loss
    )
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [4, 5, 6, 7] and config["r"] == 8
    base, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    base_loss, _ = mean_completion_loss(base, tokenizer, VALIDATION)
    adapted = PeftModel.from_pretrained(base, str(path))
    adapted_loss, _ = mean_completion_loss(adapted, tokenizer, VALIDATION)
    assert base_loss - adapted_loss > 1.0

    listed = stub.ListTuningJobs(tuning_pb2.ListTuningJobsRequest(states=[S.TUNING_JOB_STATE_SUCCEEDED]), timeout=10)
    assert job.name in [j.name for j in listed.tuning_jobs]
    again = stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=job.name), timeout=10)
    assert again.state == S.TUNING_JOB_STATE_SUCCEEDED  # cancelling an ended job changes nothing


def test_cancel_running_and_queued_jobs_and_a_dataset_that_breaks_while_queued(tuning_server):
    stub, datasets = tuning_server.stub, tuning_server.datasets
    good = datasets / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}"}) + "\n" for i in range(16)))
    running = stub.CreateTuningJob(_request("long", hyperparameters=_hp(steps=2000)), timeout=60)
    queued = stub.CreateTuningJob(_request("never"), timeout=60)
    breaks = stub.CreateTuningJob(
        _request("breaks", training_data=common_pb2.DatasetSource(path=str(good)), hyperparameters=_hp(steps=5)),
        timeout=60,
    )
    good.write_text('{"prompt": "only a prompt"}\n')  # bad from now on: the worker finds out when its turn comes

    seen = _wait_for_event(stub, running.name, lambda e: e.WhichOneof("event") == "step" and e.step.step >= 3)
    cancelled = stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=queued.name), timeout=10)
    assert cancelled.state == S.TUNING_JOB_STATE_CANCELLED  # at once: it never started

    reply = stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=running.name), timeout=10)
    assert reply.state in (S.TUNING_JOB_STATE_CANCELLING, S.TUNING_JOB_STATE_CANCELLED)
    events = _watch(stub, running.name)  # its deadline bounds the wait; the bound that matters is below
    assert _states(events)[-2:] == [S.TUNING_JOB_STATE_CANCELLING, S.TUNING_JOB_STATE_CANCELLED]
    assert max(_steps(events)) > max(_steps(seen)) >= 3
    # Stopped within a step: the worker polls the state before every step, so at most the step in flight
    # when CANCELLING was written completes after it (event times are stamped when the step ends).
    asked_at = next(
        e.time.ToNanoseconds()
        for e in events
        if e.WhichOneof("event") == "state_change" and e.state_change == S.TUNING_JOB_STATE_CANCELLING
    )
    assert sum(1 for e in events if e.WhichOneof("event") == "step" and e.time.ToNanoseconds() > asked_at) <= 1
    ended = stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=running.name), timeout=10)
    assert ended.state == S.TUNING_JOB_STATE_CANCELLED and ended.end_time.seconds > 0

    assert _states(_watch(stub, queued.name)) == [S.TUNING_JOB_STATE_QUEUED, S.TUNING_JOB_STATE_CANCELLED]
    failed_events = _watch(stub, breaks.name)
    failed = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=breaks.name), timeout=10)
    assert failed.state == S.TUNING_JOB_STATE_FAILED
    assert failed.error_code == "INVALID_DATASET"
    assert "line 1" in failed.error_message and "completion" in failed.error_message
    assert failed_events[-1].message == failed.error_message


def test_bad_requests_are_refused_and_the_server_keeps_serving(tmp_path):
    with ServerThread(_config(tmp_path, max_concurrent_jobs=1, job_queue_size=1, max_lora_rank=16)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            _check_bad_requests(stub)


def _expect(call, request, code: grpc.StatusCode, field: str | None = None, reason: str | None = None):
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, timeout=30)
        if hasattr(result, "__iter__"):
            list(result)
    err = caught.value
    assert err.code() == code, (request, err.details())
    details = _details(err)
    if field is not None:
        assert field in [v.field for v in details["BadRequest"].field_violations], err.details()
    if reason is not None:
        assert details["ErrorInfo"].reason == reason
    return details


def _check_bad_requests(stub) -> None:
    bad_rank = common_pb2.LoraShape(rank=32)
    no_validation = common_pb2.DatasetSource(inline_jsonl=b'{"text": "x"}\n' * 8)  # and no built-in split either
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (_request(model=""), invalid, "model"),
        (_request(adapter_id=""), invalid, "adapter_id"),
        (_request(adapter_id="Not_Valid"), invalid, "adapter_id"),
        (_request(tuning_job_id="9starts-with-digit"), invalid, "tuning_job_id"),
        (_request(training_data=common_pb2.DatasetSource()), invalid, "training_data"),
        (_request(training_data=common_pb2.DatasetSource(inline_jsonl=b"not json\n")), invalid, "line 1"),
        (_request(validation_data=common_pb2.DatasetSource(inline_jsonl=b'{"text": 3}\n')), invalid, None),
        (_request(hyperparameters=_hp(learning_rate=-1.0)), invalid, "hyperparameters.learning_rate"),
        (_request(hyperparameters=_hp(batch_size=-8)), invalid, "hyperparameters.batch_size"),
        (_request(hyperparameters=_hp(batch_size=5000)), invalid, "training_data"),
        (_request(hyperparameters=_hp(steps=0)), invalid, "hyperparameters.steps"),
        (_request(hyperparameters=_hp(epochs=-1.0)), invalid, "hyperparameters.epochs"),
        (_request(hyperparameters=_hp(warmup_steps=-1)), invalid, "hyperparameters.warmup_steps"),
        (_request(hyperparameters=_hp(lora=bad_rank)), invalid, "hyperparameters.lora.rank"),
        (_request(explicit_layers=S.ExplicitLayers(layers=[8])), invalid, "placement.layers"),
        (_request(explicit_layers=S.ExplicitLayers(layers=[-1])), invalid, "placement.layers"),
        (_request(explicit_layers=S.ExplicitLayers(layers=[1, 1])), invalid, "placement.layers"),
        (_request(explicit_layers=S.ExplicitLayers(layers=[1], lora=bad_rank)), invalid, "placement.lora.rank"),
        (_request(explicit_layers=S.ExplicitLayers()), invalid, "placement.layers"),
        (tuning_pb2.CreateTuningJobRequest(model="builtin:tiny", adapter_id="a"), invalid, "placement_source"),
        (_request(validation_data=None, training_data=no_validation, hyperparameters=_hp(eval_interval=5)), invalid,
         "hyperparameters.eval_interval"),
    ]  # fmt: skip
    for request, code, field in cases:
        _expect(stub.CreateTuningJob, request, code, field)
    _expect(stub.CreateTuningJob, _request(model="builtin:huge"), grpc.StatusCode.NOT_FOUND)
    _expect(stub.CreateTuningJob, _request(model="/models/x"), grpc.StatusCode.PERMISSION_DENIED)
    no_roots = _request(training_data=common_pb2.DatasetSource(path="/data/x.jsonl"))
    _expect(stub.CreateTuningJob, no_roots, grpc.StatusCode.PERMISSION_DENIED)

    for name in ("", "abc", "tuningJobs/", "tuningJobs/UPPER", "layerCards/abc"):
        _expect(stub.GetTuningJob, S.GetTuningJobRequest(name=name), invalid, "name")
        _expect(stub.CancelTuningJob, S.CancelTuningJobRequest(name=name), invalid, "name")
        _expect(stub.WatchTuningJob, S.WatchTuningJobRequest(name=name), invalid, "name")
    missing = "tuningJobs/no-such-job"
    not_found = grpc.StatusCode.NOT_FOUND
    _expect(stub.GetTuningJob, S.GetTuningJobRequest(name=missing), not_found, reason="TUNING_JOB_NOT_FOUND")
    _expect(stub.CancelTuningJob, S.CancelTuningJobRequest(name=missing), grpc.StatusCode.NOT_FOUND)
    _expect(stub.WatchTuningJob, S.WatchTuningJobRequest(name=missing), grpc.StatusCode.NOT_FOUND)
    _expect(stub.ListTuningJobs, S.ListTuningJobsRequest(page_size=-1), invalid, "page_size")
    _expect(stub.ListTuningJobs, S.ListTuningJobsRequest(page_token="x"), invalid, "page_token")
    _expect(stub.ListTuningJobs, S.ListTuningJobsRequest(states=[0]), invalid, "states")

    # Ids and idempotency: a repeated request_id returns the first job; a taken id is ALREADY_EXISTS.
    first = stub.CreateTuningJob(_request(tuning_job_id="my-job", request_id="req-1"), timeout=30)
    assert first.name == "tuningJobs/my-job"
    assert stub.CreateTuningJob(_request(tuning_job_id="other", request_id="req-1"), timeout=30).name == first.name
    _expect(stub.CreateTuningJob, _request(tuning_job_id="my-job"), grpc.StatusCode.ALREADY_EXISTS)
    second = stub.CreateTuningJob(_request(adapter_id="b"), timeout=30)
    details = _expect(stub.CreateTuningJob, _request(adapter_id="c"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert details["ErrorInfo"].reason == "TUNING_QUEUE_FULL" and details["RetryInfo"].retry_delay.seconds > 0

    # State is intact: both jobs are listed newest first, paged, and cancel cleanly.
    page = stub.ListTuningJobs(S.ListTuningJobsRequest(page_size=1), timeout=10)
    assert [j.name for j in page.tuning_jobs] == [second.name] and page.next_page_token
    rest = stub.ListTuningJobs(S.ListTuningJobsRequest(page_size=1, page_token=page.next_page_token), timeout=10)
    assert [j.name for j in rest.tuning_jobs] == [first.name] and not rest.next_page_token
    for job in (second, first):
        stub.CancelTuningJob(S.CancelTuningJobRequest(name=job.name), timeout=10)
    for job in (second, first):
        assert _states(_watch(stub, job.name, timeout=120))[-1] == S.TUNING_JOB_STATE_CANCELLED


def test_restart_resumes_the_running_job_from_its_checkpoint_and_runs_the_queued_one(tmp_path):
    config = _config(tmp_path, max_concurrent_jobs=1)
    with ServerThread(config) as first_server:
        with grpc.insecure_channel(first_server.address) as channel:
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            running = stub.CreateTuningJob(
                _request("resumed", hyperparameters=_hp(steps=60, checkpoint_interval=5)), timeout=60
            )
            queued = stub.CreateTuningJob(_request("waited", hyperparameters=_hp(steps=5)), timeout=60)
            _wait_for_event(stub, running.name, lambda e: e.WhichOneof("event") == "checkpoint")
    # The first server has stopped: its worker was terminated mid-training and the job stays RUNNING.
    store = JobStore(tmp_path / "state.db")
    try:
        left = store.get(running.name.split("/")[1])
        assert left.state == JobState.RUNNING and 5 <= left.step < 60, (left.state, left.step)
        assert store.state(queued.name.split("/")[1]) == JobState.QUEUED
    finally:
        store.close()
    with ServerThread(config) as second_server:
        with grpc.insecure_channel(second_server.address) as channel:
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            events = _watch(stub, running.name)
            done = stub.GetTuningJob(S.GetTuningJobRequest(name=running.name), timeout=10)
            assert done.state == S.TUNING_JOB_STATE_SUCCEEDED, done.error_message
            resumed = [e for e in events if "after a service restart" in e.message]
            assert len(resumed) == 1
            checkpoint_step = int(resumed[0].message.split("resuming from step ")[1].split()[0])
            assert checkpoint_step >= 5 and checkpoint_step % 5 == 0
            # Training continues from the checkpoint; the steps the first worker ran past it are reported once.
            assert _steps(events) == list(range(1, 61))
            assert _states(events) == [
                S.TUNING_JOB_STATE_QUEUED,
                S.TUNING_JOB_STATE_RUNNING,
                S.TUNING_JOB_STATE_QUEUED,
                S.TUNING_JOB_STATE_RUNNING,
                S.TUNING_JOB_STATE_SUCCEEDED,
            ]
            _watch(stub, queued.name)
            waited = stub.GetTuningJob(S.GetTuningJobRequest(name=queued.name), timeout=10)
            assert waited.state == S.TUNING_JOB_STATE_SUCCEEDED and waited.result.adapter_version.endswith("/1")


def test_watchers_that_go_away_leave_the_server_serving(tuning_server):
    """Clients that drop a watch mid-stream stop its poller; the job and the server carry on."""
    stub = tuning_server.stub
    job = stub.CreateTuningJob(_request("watched", hyperparameters=_hp(steps=2000)), timeout=60)
    calls = [stub.WatchTuningJob(S.WatchTuningJobRequest(name=job.name), timeout=120) for _ in range(5)]
    for call in calls:
        assert next(call).state_change == S.TUNING_JOB_STATE_QUEUED
        call.cancel()
    _wait_for_event(stub, job.name, lambda e: e.WhichOneof("event") == "step")
    stub.CancelTuningJob(S.CancelTuningJobRequest(name=job.name), timeout=10)
    assert _states(_watch(stub, job.name))[-1] == S.TUNING_JOB_STATE_CANCELLED


@pytest.fixture
def one_thread():
    """The card is computed inside this test process (the server runs in a thread): one torch thread, as the
    workers, so that a busy machine does not stall every step on descheduled threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_card_budget_job_trains_the_planned_layers_and_reports_measured_beside_predicted(tmp_path, one_thread):
    from layercard.v1 import layer_card_pb2, layer_card_pb2_grpc, placement_pb2, placement_pb2_grpc

    with ServerThread(_config(tmp_path)) as server, grpc.insecure_channel(server.address) as channel:
        compute = layer_card_pb2.ComputeLayerCardRequest(
            model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), probe_size=32
        )
        card = list(layer_card_pb2_grpc.LayerCardServiceStub(channel).ComputeLayerCard(compute, timeout=600))[-1].card
        stub = tuning_pb2_grpc.TuningServiceStub(channel)
        budget = S.CardBudget(layer_card=card.name, objective=placement_pb2.OBJECTIVE_FIXED_K, k=2)
        # No learning rate set: the job takes the plan's, or the default where the plan has none.
        hp = _hp(steps=8, learning_rate=0)
        job = stub.CreateTuningJob(_request("planned", card_budget=budget, hyperparameters=hp), timeout=120)
        placement = job.placement
        assert len(placement.layers) == 2 and placement.layer_card == card.name
        assert placement.step_seconds.value > 0 and placement.step_seconds.basis
        # The tuning service planned it as PlanPlacement does: every prediction and its basis, kept.
        planned = placement_pb2_grpc.PlacementServiceStub(channel).PlanPlacement(
            placement_pb2.PlanPlacementRequest(
                layer_card=card.name, objective=placement_pb2.OBJECTIVE_FIXED_K, k=2, steps=8
            ),
            timeout=30,
        )
        # A job records the plan's predictions, its predicted learning curve included.
        assert placement == planned and placement.rationale and placement.predicted_gain.basis
        assert len(placement.predicted_curve) == len(planned.predicted_curve) > 0
        # A prior plan chooses no learning rate: the job trains at the default.
        assert planned.learning_rate == 0 and job.hyperparameters.learning_rate == pytest.approx(1e-3)
        _watch(stub, job.name)
        done = stub.GetTuningJob(S.GetTuningJobRequest(name=job.name), timeout=10)
        assert done.state == S.TUNING_JOB_STATE_SUCCEEDED, done.error_message
        assert done.placement == planned
        result = done.result
        assert result.predicted_step_seconds == pytest.approx(placement.step_seconds.value)
        assert result.predicted_peak_memory_bytes == int(placement.peak_memory_bytes.value)
        assert result.measured_step_seconds > 0 and result.measured_peak_memory_bytes > 0
        # Same basis (weights + saved activations + 4x adapter), different batch shapes: same order of magnitude.
        assert 0.25 < result.measured_peak_memory_bytes / result.predicted_peak_memory_bytes < 4
        path = server.config.data_dir / "artifacts" / "adapters" / "planned" / "1" / "adapter_config.json"
        assert json.loads(path.read_text())["layers_to_transform"] == sorted(placement.layers)
