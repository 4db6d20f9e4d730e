"""The worker's exit paths, run in-process on a real job store (through the service's domain side of the workers'
API, without the network): each ends the job with a stable code."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import sqlite3

import pytest

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.persistence.datasets import DatasetArtifacts
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.worker_reports import WorkerReports, issue_worker_token
from layercard_service.trainer import loop as loop_module
from layercard_service.trainer import worker
from layercard_service.trainer.loop import TrainingLoop
from layercard_service.trainer.reporter import InProcessChannel, Reporter, Unreachable

TRAIN = "".join(json.dumps({"prompt": f"say {i}", "completion": f" {i}"}) + "\n" for i in range(16)).encode()
TRAIN_SHA256 = hashlib.sha256(TRAIN).hexdigest()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(**placement) -> JobSpec:
    return JobSpec(
        model="builtin:tiny",
        training_data=DatasetRequest(inline_sha256=TRAIN_SHA256, inline_size_bytes=len(TRAIN)),  # see `run`
        validation_data=None,
        placement=PlacementSpec(**{"layers": (7,), "rank": 4, "alpha": 8.0, **placement}),
        hyperparameters=Hyperparameters(steps=2, batch_size=8, max_seq_len=32, checkpoint_interval=1),
        adapter_id="bot",
    )


def _channel(store: JobStore, tmp_path, max_lora_rank: int = 16, job_id: str = "job-a") -> InProcessChannel:
    """What a runner gives one attempt: a fresh credential, and the service on the other end."""
    issue_worker_token(store, job_id)
    return InProcessChannel(WorkerReports(store, tmp_path / "artifacts", max_lora_rank), job_id)


@pytest.fixture
def run(tmp_path):
    store = JobStore(tmp_path / "state.db")
    DatasetArtifacts(tmp_path / "artifacts").put(TRAIN)  # as CreateTuningJob stores inline data

    def run_job(spec: JobSpec, state: JobState = JobState.RUNNING, max_lora_rank: int = 16):
        store.create("job-a", None, spec, spec.hyperparameters.steps)
        store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
        if state == JobState.CANCELLING:
            store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING)
        settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
        settings.max_lora_rank = max_lora_rank
        assert worker.run_job(_channel(store, tmp_path, max_lora_rank), settings) == 0
        return store.get("job-a")

    yield run_job
    store.close()


def test_success_publishes_a_version_and_drops_the_checkpoints(run, tmp_path):
    job = run(_spec())
    assert job.state == JobState.SUCCEEDED and job.result.adapter_version == "adapters/bot/versions/1"
    assert job.result.final_eval is None  # no validation data: no evaluation, and no error either
    assert (tmp_path / "artifacts" / "adapters" / "bot" / "1" / "adapter_config.json").is_file()
    assert not (tmp_path / "artifacts" / "checkpoints" / "job-a").exists()


def test_cancel_before_training_started(run):
    job = run(_spec(), state=JobState.CANCELLING)
    assert job.state == JobState.CANCELLED


def test_a_known_problem_fails_with_its_reason(run):
    job = run(_spec(layers=(20,)))  # e.g. the model directory changed after the job was accepted
    assert job.state == JobState.FAILED and job.error_code == "INVALID_ARGUMENT"
    assert "the model has 8 layers" in job.error_message


def test_an_adapter_vllm_cannot_load_is_not_published(run, tmp_path):
    job = run(_spec(rank=32), max_lora_rank=16)
    assert job.state == JobState.FAILED and job.error_code == "ADAPTER_INCOMPATIBLE"
    assert "rank 32" in job.error_message
    assert list((tmp_path / "artifacts" / "adapters" / "bot").iterdir()) == []


def test_an_unexpected_error_fails_with_internal(run, monkeypatch):
    def boom(self, total_steps, hooks=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(TrainingLoop, "run", boom)
    job = run(_spec())
    assert job.state == JobState.FAILED and job.error_code == "INTERNAL"
    assert job.error_message == "RuntimeError: boom"


def test_inline_data_is_read_back_from_its_artifact_and_checked(run, tmp_path):
    path = DatasetArtifacts(tmp_path / "artifacts").path(TRAIN_SHA256)
    path.write_bytes(TRAIN.replace(b"say 1", b"say 9"))  # same size, other bytes
    job = run(_spec())
    assert job.state == JobState.FAILED and job.error_code == "DATASET_ARTIFACT_CORRUPT"
    assert TRAIN_SHA256 in job.error_message and "training_data" in job.error_message


def test_a_missing_dataset_artifact_fails_the_job_with_its_reason(run, tmp_path):
    DatasetArtifacts(tmp_path / "artifacts").remove(TRAIN_SHA256)
    job = run(_spec())
    assert job.state == JobState.FAILED and job.error_code == "DATASET_ARTIFACT_MISSING"


def test_a_record_from_before_artifacts_trains_on_the_bytes_it_holds(tmp_path):
    store = JobStore(tmp_path / "state.db")  # no artifact at all: the old record carries the data
    spec = _spec()
    store.create("job-a", None, spec, spec.hyperparameters.steps)
    legacy = spec.to_dict()
    legacy["training_data"] = {
        "builtin": "",
        "path": "",
        "split": "",
        "inline_jsonl_b64": base64.b64encode(TRAIN).decode(),
    }
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE tuning_jobs SET spec = ? WHERE job_id = 'job-a'", (json.dumps(legacy),))
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
    assert worker.run_job(_channel(store, tmp_path), settings) == 0
    assert store.get("job-a").state == JobState.SUCCEEDED
    store.close()


def test_a_resumed_job_reports_each_step_once(tmp_path, monkeypatch):
    """Killed after step 3 with its checkpoint at step 2: the resumed run repeats step 3, the history does not."""
    store = JobStore(tmp_path / "state.db")
    spec = _spec()
    spec = dataclasses.replace(
        spec,
        training_data=DatasetRequest(builtin="builtin:cipher"),  # needs nothing stored beside the job
        hyperparameters=dataclasses.replace(spec.hyperparameters, steps=4, checkpoint_interval=2),
    )
    store.create("job-a", None, spec, 4)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
    add = Reporter.add

    def add_then_die_after_step_3(self, event, step=None, urgent=False):
        add(self, event, step, urgent)
        if event.kind == "step" and event.payload["step"] == 3:
            raise worker.Terminated  # as SIGTERM (or a crash) between checkpoints

    with monkeypatch.context() as patched:
        patched.setattr(Reporter, "add", add_then_die_after_step_3)
        assert worker.run_job(_channel(store, tmp_path), settings) == worker.EXIT_TERMINATED
    assert worker.run_job(_channel(store, tmp_path), settings) == 0
    history = store.events_after("job-a", 0)
    store.close()
    assert [e.payload["step"] for e in history if e.kind == "step"] == [1, 2, 3, 4]
    assert [e.payload["step"] for e in history if e.kind == "checkpoint"] == [2]
    assert any(e.kind == "note" and "resumed from the checkpoint at step 2" in e.message for e in history)
    assert history[-1].kind == "state" and history[-1].payload["state"] == "SUCCEEDED"


class _LosesTheServiceAfterStep2(InProcessChannel):
    """The service stops answering reports once step 2 is recorded (the cancel poll still gets an answer)."""

    def report(self, batch, events, step, worker_pid):
        if events and any(e.kind == "step" and e.payload["step"] > 2 for e in events):
            raise Unreachable("the service is gone")
        return super().report(batch, events, step, worker_pid)


def test_events_a_killed_worker_never_delivered_are_reported_by_the_run_that_resumes(tmp_path, monkeypatch):
    """Its service gone after step 2, a worker trains on to step 5 (checkpoint at 4) and is killed: steps 3-4 were
    only in its buffer. The run resuming from step 4 reports them from the checkpoint: no gap in the history."""
    store = JobStore(tmp_path / "state.db")
    spec = _spec()
    spec = dataclasses.replace(
        spec,
        training_data=DatasetRequest(builtin="builtin:cipher"),
        hyperparameters=dataclasses.replace(spec.hyperparameters, steps=6, checkpoint_interval=4),
    )
    store.create("job-a", None, spec, 6)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
    add = Reporter.add

    def add_then_die_after_step_5(self, event, step=None, urgent=False):
        add(self, event, step, urgent)
        if event.kind == "step" and event.payload["step"] == 5:
            raise worker.Terminated  # killed, its buffer with it (Terminated skips nothing: the flush fails too)

    issue_worker_token(store, "job-a")
    lossy = _LosesTheServiceAfterStep2(WorkerReports(store, tmp_path / "artifacts", 16), "job-a")
    with monkeypatch.context() as patched:
        patched.setattr(Reporter, "add", add_then_die_after_step_5)
        patched.setattr(worker, "TERMINATE_FLUSH_SECONDS", 0.0)
        worker.run_job(lossy, settings)
    before = [e.payload["step"] for e in store.events_after("job-a", 0) if e.kind == "step"]
    assert before == list(range(1, len(before) + 1)) and len(before) <= 2  # 3 and later never reached it
    assert worker.run_job(_channel(store, tmp_path), settings) == 0
    history = store.events_after("job-a", 0)
    store.close()
    assert [e.payload["step"] for e in history if e.kind == "step"] == [1, 2, 3, 4, 5, 6]
    assert [e.payload["step"] for e in history if e.kind == "checkpoint"] == [4]


class _Killed(BaseException):
    """kill -9: no handler of the worker's runs."""


def test_a_kill_right_after_a_checkpoint_loses_no_step(tmp_path, monkeypatch):
    """kill -9 lands the moment the checkpoint at step 4 is complete, while the service is unreachable (steps 3
    and 4 only in the worker's buffer): those events are inside the checkpoint, so the resumed run reports them.
    The service's restart recovery resumes from the newest checkpoint, so a gap here is a gap in the history."""
    store = JobStore(tmp_path / "state.db")
    spec = _spec()
    spec = dataclasses.replace(
        spec,
        training_data=DatasetRequest(builtin="builtin:cipher"),
        hyperparameters=dataclasses.replace(spec.hyperparameters, steps=6, checkpoint_interval=4),
    )
    store.create("job-a", None, spec, 6)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
    save = loop_module.save_checkpoint

    def saved_then_killed(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    issue_worker_token(store, "job-a")
    lossy = _LosesTheServiceAfterStep2(WorkerReports(store, tmp_path / "artifacts", 16), "job-a")
    with monkeypatch.context() as patched, pytest.raises(_Killed):
        patched.setattr(loop_module, "save_checkpoint", saved_then_killed)
        worker.run_job(lossy, settings)
    before = [e.payload["step"] for e in store.events_after("job-a", 0) if e.kind == "step"]
    assert before == list(range(1, len(before) + 1)) and len(before) <= 2  # 3 and later never reached it
    assert worker.run_job(_channel(store, tmp_path), settings) == 0
    history = store.events_after("job-a", 0)
    store.close()
    assert [e.payload["step"] for e in history if e.kind == "step"] == [1, 2, 3, 4, 5, 6]
    assert [e.payload["step"] for e in history if e.kind == "checkpoint"] == [4]
