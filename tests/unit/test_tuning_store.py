"""The job store on a real SQLite file: idempotency, ids, paging, transitions with their events, two writers."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import sqlite3
import threading

import pytest

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import (
    EvalSummary,
    Hyperparameters,
    JobResult,
    JobSpec,
    JobState,
    PlacementPredictions,
    PlacementSpec,
    job_id_from_name,
)
from layercard_service.domain.plans import Estimate
from layercard_service.errors import AlreadyExists, InvalidArgument
from layercard_service.persistence.adapter_versions import AdapterVersion, insert_version
from layercard_service.persistence.jobs import JobStore, NewEvent

SHA_A, SHA_B = "a" * 64, "b" * 64
SPEC = JobSpec(
    model="builtin:tiny",
    training_data=DatasetRequest(inline_sha256=SHA_A, inline_size_bytes=36),  # stored as an artifact
    validation_data=DatasetRequest(builtin="builtin:cipher", split="validation"),
    placement=PlacementSpec(
        layers=(2, 5),
        rank=4,
        alpha=8.0,
        target_modules=("q_proj",),
        predictions=PlacementPredictions(step_seconds=Estimate(0.5, "s", "basis"), binding_limits=("max_layers",)),
    ),
    hyperparameters=Hyperparameters(steps=30, batch_size=8),
    adapter_id="bot",
)


@pytest.fixture
def store(tmp_path):
    opened = JobStore(tmp_path / "state.db")
    yield opened
    opened.close()


def _states(store: JobStore, job_id: str) -> list[str]:
    return [e.payload["state"] for e in store.events_after(job_id, 0) if e.kind == "state"]


def test_spec_round_trips_through_the_database(store):
    job, created = store.create("job-a", None, SPEC, 30)
    assert created and job.state == JobState.QUEUED and job.total_steps == 30
    again = store.get("job-a")
    assert again.spec == SPEC  # dataset references, tuples and the placement's predictions survive JSON
    assert again.name == "tuningJobs/job-a"
    assert _states(store, "job-a") == ["QUEUED"]


def test_request_id_returns_the_first_job_and_job_ids_are_unique(store):
    _, created = store.create("job-a", "req-1", SPEC, 30)
    again, created_again = store.create("job-b", "req-1", SPEC, 30)
    assert created and not created_again and again.job_id == "job-a"
    assert store.get("job-b") is None
    with pytest.raises(AlreadyExists):
        store.create("job-a", "req-2", SPEC, 30)
    assert store.find_by_request("req-1").job_id == "job-a"


def test_list_newest_first_with_state_filter_and_paging(store):
    for i in range(5):
        store.create(f"job-{i}", None, SPEC, 30)
    store.transition("job-1", [JobState.QUEUED], JobState.CANCELLED, "x")
    names = [j.job_id for j in store.list([], 0, 10)]
    assert names == ["job-4", "job-3", "job-2", "job-1", "job-0"]
    assert [j.job_id for j in store.list([], 2, 2)] == ["job-2", "job-1"]
    assert [j.job_id for j in store.list([JobState.CANCELLED], 0, 10)] == ["job-1"]
    assert store.ids_in([JobState.QUEUED]) == ["job-0", "job-2", "job-3", "job-4"]  # oldest first


def test_transitions_are_conditional_and_end_states_record_errors(store):
    store.create("job-a", None, SPEC, 30)
    assert not store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING)
    assert store.transition("job-a", [JobState.QUEUED], JobState.RUNNING, "go")
    running = store.get("job-a")
    assert running.start_time is not None and running.end_time is None
    assert store.transition(
        "job-a", [JobState.RUNNING], JobState.FAILED, "bad", error_code="INVALID_DATASET", error_message="bad"
    )
    failed = store.get("job-a")
    assert (failed.state, failed.error_code, failed.error_message) == (JobState.FAILED, "INVALID_DATASET", "bad")
    assert failed.end_time >= failed.start_time
    assert not store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED)  # ended stays ended
    assert _states(store, "job-a") == ["QUEUED", "RUNNING", "FAILED"]


def test_result_is_computed_inside_the_transaction(store):
    store.create("job-a", None, SPEC, 30)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    seen = []

    def result(db):
        seen.append(db.in_transaction)
        return JobResult("adapters/bot/versions/1", EvalSummary(30, 1.0, 0.5, 10), None, 0.1, 0.2, 10, 20, 3.0, 99.0)

    assert store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "done", result=result)
    assert seen == [True]
    assert store.get("job-a").result.final_eval == EvalSummary(30, 1.0, 0.5, 10)


def test_event_sequences_are_gap_free_with_two_writers(store, tmp_path):
    store.create("job-a", None, SPEC, 30)
    other = JobStore(tmp_path / "state.db")  # a worker's own connection to the same WAL database

    def write(target: JobStore, tag: str) -> None:
        for i in range(40):
            target.append_events("job-a", [NewEvent("step", {"step": i, "by": tag})], step=i)

    threads = [threading.Thread(target=write, args=(s, t)) for s, t in ((store, "service"), (other, "worker"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    sequences = [e.sequence for e in store.events_after("job-a", 0)]
    assert sequences == list(range(1, 82))
    assert [e.sequence for e in store.events_after("job-a", 79)] == [80, 81]


@pytest.mark.parametrize("name", ["", "tuningJobs/", "jobs/abc", "tuningJobs/ABC", "tuningJobs/a/b", "tuningJobs/9a"])
def test_malformed_names(name):
    with pytest.raises(InvalidArgument):
        job_id_from_name(name)


def test_a_record_never_holds_inline_bytes(store):
    raw = dataclasses.replace(SPEC, training_data=DatasetRequest(inline_jsonl=b'{"text": "x"}\n'))
    with pytest.raises(ValueError, match="artifacts"):
        store.create("job-a", None, raw, 30)  # the service stores the bytes first (persistence/datasets.py)
    store.create("job-b", None, SPEC, 30)
    row = sqlite3.connect(store.path).execute("SELECT spec FROM tuning_jobs WHERE job_id = 'job-b'").fetchone()
    assert json.loads(row[0])["training_data"] == {
        "builtin": "",
        "path": "",
        "split": "",
        "inline_jsonl_sha256": SHA_A,
        "inline_jsonl_size_bytes": 36,
    }


def test_a_record_from_before_artifacts_still_loads_with_its_bytes(store):
    store.create("job-a", None, SPEC, 30)
    data = b'{"prompt": "a", "completion": "b"}\n'
    legacy = SPEC.to_dict()
    legacy["training_data"] = {
        "builtin": "",
        "path": "",
        "split": "",
        "inline_jsonl_b64": base64.b64encode(data).decode(),
    }
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE tuning_jobs SET spec = ? WHERE job_id = 'job-a'", (json.dumps(legacy),))
    loaded = store.get("job-a").spec.training_data
    assert loaded.inline_jsonl == data  # the worker trains on them as before
    assert (loaded.inline_sha256, loaded.inline_size_bytes) == (hashlib.sha256(data).hexdigest(), len(data))


def _with_datasets(training: str, validation: str | None = None) -> JobSpec:
    ref = lambda sha: DatasetRequest(inline_sha256=sha, inline_size_bytes=10)  # noqa: E731
    return dataclasses.replace(
        SPEC, training_data=ref(training), validation_data=ref(validation) if validation else None
    )


def test_delete_removes_an_ended_job_with_its_events_and_only_unshared_datasets(store):
    store.create("job-a", None, _with_datasets(SHA_A, SHA_B), 30)
    store.create("job-b", None, _with_datasets(SHA_B), 30)  # shares SHA_B as its training data
    removed: list[str] = []
    assert store.delete("job-a", removed.append) == JobState.QUEUED  # not ended: nothing happens
    assert store.get("job-a") is not None and removed == []
    store.transition("job-a", [JobState.QUEUED], JobState.CANCELLED)
    assert store.delete("job-a", removed.append) == JobState.CANCELLED
    assert store.get("job-a") is None and store.events_after("job-a", 0) == []
    assert removed == [SHA_A]  # SHA_B is still job-b's
    assert _states(store, "job-b") == ["QUEUED"]  # other jobs' events stay
    assert store.delete("job-a", removed.append) is None  # gone


def test_delete_keeps_published_adapter_versions(store):
    store.create("job-a", None, SPEC, 30)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)

    def publish(db):
        insert_version(db, AdapterVersion("bot", 1, "/artifacts/adapters/bot/1", "job-a", 1.0, {"model": "m"}))
        return JobResult("adapters/bot/versions/1", None, None, 0.1, 0.2, 10, 20, 3.0, 99.0)

    store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "done", result=publish)
    assert store.delete("job-a", lambda sha: None) == JobState.SUCCEEDED
    assert [(v.adapter_id, v.version, v.job_id) for v in store.versions("bot")] == [("bot", 1, "job-a")]


def test_release_removes_only_datasets_no_job_refers_to(store):
    store.create("job-a", None, _with_datasets(SHA_A), 30)
    removed: list[str] = []
    store.release_datasets([SHA_A, SHA_B], removed.append)
    assert removed == [SHA_B]
