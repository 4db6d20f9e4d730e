"""The job store on a real SQLite file: idempotency, ids, paging, transitions with their events, two writers."""

from __future__ import annotations

import threading

import pytest

from layercard_service.errors import AlreadyExists, InvalidArgument
from layercard_service.sources import DatasetRequest
from layercard_service.tune.job_store import JobStore, NewEvent
from layercard_service.tune.jobs import (
    EvalSummary,
    Hyperparameters,
    JobResult,
    JobSpec,
    JobState,
    PlacementSpec,
    job_id_from_name,
)

SPEC = JobSpec(
    model="builtin:tiny",
    training_data=DatasetRequest(inline_jsonl=b'{"prompt": "a", "completion": "b"}\n'),
    validation_data=DatasetRequest(builtin="builtin:cipher", split="validation"),
    placement=PlacementSpec(layers=(2, 5), rank=4, alpha=8.0, target_modules=("q_proj",), detail={"rationale": "x"}),
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
    assert again.spec == SPEC  # inline bytes, tuples and the opaque placement detail survive JSON
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
