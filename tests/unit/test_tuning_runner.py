"""The local process runner with a fake worker command: FIFO, concurrency limit, dead workers, restart recovery."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pytest

from layercard_service.sources import DatasetRequest
from layercard_service.tune.job_store import JobStore
from layercard_service.tune.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.tune.runner import LocalProcessRunner

SPEC = JobSpec(
    "builtin:tiny",
    DatasetRequest(builtin="builtin:cipher"),
    None,
    PlacementSpec(layers=(1,)),
    Hyperparameters(steps=5),
    "bot",
)

# A stand-in for the real worker: records when it ran, then behaves as its job id says.
FAKE_WORKER = """
import json, sys, time
from pathlib import Path
from layercard_service.tune.job_store import JobStore
from layercard_service.tune.jobs import JobState
db, job_id, log = sys.argv[1], sys.argv[2], Path(sys.argv[3])
start = time.time()
if job_id.startswith("die"):
    print("something went badly wrong", flush=True)
    sys.exit(3)
if job_id.startswith("pair"):  # runs only when both of a pair run at once: proof of concurrency, not of timing
    (log.parent / f"started-{job_id}").touch()
    deadline = time.time() + 60
    while len(list(log.parent.glob("started-pair*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
time.sleep(0.6 if not job_id.startswith("long") else 60)
with log.open("a") as f:
    f.write(json.dumps({"job": job_id, "start": start, "end": time.time()}) + "\\n")
store = JobStore(Path(db))
store.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, "fake done")
"""


def _command(data_dir: Path):
    def command(job_id: str) -> list[str]:
        return [sys.executable, "-c", FAKE_WORKER, str(data_dir / "state.db"), job_id, str(data_dir / "runs.log")]

    return command


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path):
    store = JobStore(tmp_path / "state.db")
    runners: list[LocalProcessRunner] = []

    def runner(max_concurrent: int = 1) -> LocalProcessRunner:
        made = LocalProcessRunner(
            store,
            tmp_path,
            _command(tmp_path),
            max_concurrent=max_concurrent,
            terminate_grace_seconds=2,
            cancel_grace_seconds=0.5,
        )
        runners.append(made)
        return made

    yield store, runner, tmp_path
    for made in runners:
        made.close()
    store.close()


def _runs(tmp_path: Path) -> list[dict]:
    path = tmp_path / "runs.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_fifo_with_a_concurrency_limit_of_one(setup):
    store, make, tmp_path = setup
    runner = make(max_concurrent=1)
    runner.start()
    for i in range(3):
        store.create(f"job-{i}", None, SPEC, 5)
        runner.submit(f"job-{i}")
    _wait(lambda: all(store.state(f"job-{i}") == JobState.SUCCEEDED for i in range(3)))
    runs = _runs(tmp_path)
    assert [r["job"] for r in runs] == ["job-0", "job-1", "job-2"]
    for before, after in itertools.pairwise(runs):
        assert after["start"] >= before["end"] - 0.05  # never two at once
    states = [e.payload["state"] for e in store.events_after("job-0", 0) if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_two_at_once_when_allowed(setup):
    store, make, tmp_path = setup
    runner = make(max_concurrent=2)
    runner.start()
    for i in range(2):
        store.create(f"pair-{i}", None, SPEC, 5)
        runner.submit(f"pair-{i}")
    _wait(lambda: all(store.state(f"pair-{i}") == JobState.SUCCEEDED for i in range(2)), timeout=90)
    a, b = _runs(tmp_path)
    assert b["start"] < a["end"] and a["start"] < b["end"]  # overlapped: each waited for the other to start


def test_a_worker_that_dies_fails_its_job_with_worker_died(setup):
    store, make, _ = setup
    runner = make()
    runner.start()
    store.create("die-now", None, SPEC, 5)
    runner.submit("die-now")
    _wait(lambda: store.state("die-now") == JobState.FAILED)
    job = store.get("die-now")
    assert job.error_code == "WORKER_DIED"
    assert "code 3" in job.error_message and "something went badly wrong" in job.error_message


def test_cancelled_queued_job_never_runs(setup):
    store, make, tmp_path = setup
    runner = make()
    store.create("job-a", None, SPEC, 5)
    store.create("job-b", None, SPEC, 5)
    runner.start()  # picks both up from the store
    store.transition("job-b", [JobState.QUEUED], JobState.CANCELLED, "x")
    runner.cancel("job-b")
    _wait(lambda: store.state("job-a") == JobState.SUCCEEDED)
    time.sleep(0.3)
    assert [r["job"] for r in _runs(tmp_path)] == ["job-a"]
    assert store.state("job-b") == JobState.CANCELLED


def test_close_leaves_the_job_running_and_the_next_start_requeues_it(setup):
    store, make, tmp_path = setup
    first = make()
    first.start()
    store.create("long-a", None, SPEC, 5)
    store.create("long-b", None, SPEC, 5)
    first.submit("long-a")
    first.submit("long-b")
    _wait(lambda: first.running == ["long-a"])
    first.close()  # SIGTERM: the fake worker dies without writing a state
    assert store.state("long-a") == JobState.RUNNING
    assert store.state("long-b") == JobState.QUEUED
    checkpoint = tmp_path / "artifacts" / "checkpoints" / "long-a" / "step-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")

    second = make()
    second.start()
    messages = [e.message for e in store.events_after("long-a", 0)]
    assert "resuming from step 3 after a service restart" in messages
    assert store.get("long-a").step == 3
    _wait(lambda: second.running == ["long-a"])  # resumed first: it is the oldest
    assert second.queued == ["long-b"]


def test_recovery_cancels_a_job_that_was_cancelling(setup):
    store, make, _ = setup
    store.create("job-a", None, SPEC, 5)
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING)
    make().start()
    assert store.state("job-a") == JobState.CANCELLED


def test_a_worker_that_ignores_a_cancel_is_stopped_after_the_grace_period(setup):
    store, make, _ = setup
    runner = make()
    runner.start()
    store.create("long-a", None, SPEC, 5)
    runner.submit("long-a")
    _wait(lambda: runner.running == ["long-a"])
    store.transition("long-a", [JobState.RUNNING], JobState.CANCELLING)
    runner.cancel("long-a")  # the fake worker never polls: only the grace period ends it
    _wait(lambda: store.state("long-a") == JobState.CANCELLED, timeout=15)
    assert "while cancelling" in store.events_after("long-a", 0)[-1].message
