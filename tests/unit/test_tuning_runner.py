"""The local process runner with a fake worker command: FIFO, concurrency limit, dead workers, restart recovery,
and a store that refuses writes (a full disk): no runner thread dies, no job is left RUNNING without a worker."""

from __future__ import annotations

import itertools
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.errors import ResourceExhausted
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import DISK_FULL
from layercard_service.runners.local import LocalProcessRunner

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
from layercard_service.persistence.jobs import JobStore
from layercard_service.domain.jobs import JobState
db, job_id, log = sys.argv[1], sys.argv[2], Path(sys.argv[3])
start = time.time()
if job_id.startswith("full"):
    sys.exit(28)  # the real worker's EXIT_DISK_FULL
if job_id.startswith("crash"):
    print("2026-01-01 00:00:00,000 ERROR layercard_service.trainer.worker: job failed", flush=True)
    print('Traceback (most recent call last):\\n  File "x.py", line 1, in <module>\\nValueError: the real problem')
    for i in range(100):  # a progress bar that goes on after the error (another thread's tqdm)
        print(f"\\r{i:3d}%|#         | {i}/100 [00:01<00:09, 10.00it/s]", end="", flush=True)
    sys.exit(3)
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


class RefusingStore(JobStore):
    """A real store whose transitions into chosen states fail a number of times first, as on a full disk."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.refuse: dict[JobState, int] = {}
        self.error: Exception = ResourceExhausted("the data dir's disk is full", reason=DISK_FULL)

    def transition(self, job_id, from_states, to, *args, **kwargs) -> bool:
        if self.refuse.get(to, 0) > 0:
            self.refuse[to] -= 1
            raise self.error
        return super().transition(job_id, from_states, to, *args, **kwargs)


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
    store = RefusingStore(tmp_path / "state.db")
    runners: list[LocalProcessRunner] = []

    def runner(max_concurrent: int = 1) -> LocalProcessRunner:
        made = LocalProcessRunner(
            store,
            tmp_path,
            _command(tmp_path),
            max_concurrent=max_concurrent,
            terminate_grace_seconds=2,
            cancel_grace_seconds=0.5,
            retry_seconds=0.05,
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


def test_the_worker_died_message_shows_the_error_not_progress_bars(setup):
    store, make, _ = setup
    make().start()
    store.create("crash-a", None, SPEC, 5)
    runner = make()
    runner.start()  # picks the job up from the store
    _wait(lambda: store.state("crash-a") == JobState.FAILED)
    job = store.get("crash-a")
    assert job.error_code == "WORKER_DIED"
    assert "job failed" in job.error_message and "ValueError: the real problem" in job.error_message
    assert "it/s" not in job.error_message and "\r" not in job.error_message


def test_a_refused_write_of_the_end_is_retried_and_the_supervisor_survives(setup):
    store, make, _ = setup
    store.error = sqlite3.OperationalError("database is locked")
    store.refuse[JobState.FAILED] = 3
    runner = make()
    runner.start()
    store.create("die-a", None, SPEC, 5)
    runner.submit("die-a")
    _wait(lambda: store.state("die-a") == JobState.FAILED)
    assert store.refuse[JobState.FAILED] == 0 and store.get("die-a").error_code == "WORKER_DIED"
    store.create("job-b", None, SPEC, 5)  # the runner still runs jobs
    runner.submit("job-b")
    _wait(lambda: store.state("job-b") == JobState.SUCCEEDED)


def test_a_worker_that_exits_on_a_full_disk_fails_its_job_with_disk_full_once_the_store_takes_it(setup):
    store, make, _ = setup
    store.refuse[JobState.FAILED] = 2  # the service's own write finds the disk full too, at first
    runner = make()
    runner.start()
    store.create("full-a", None, SPEC, 5)
    runner.submit("full-a")
    _wait(lambda: store.state("full-a") == JobState.FAILED)
    job = store.get("full-a")
    assert job.error_code == DISK_FULL and "disk is full" in job.error_message
    assert runner.running == []


def test_a_dead_worker_whose_end_is_refused_still_ends_disk_full(setup):
    store, make, _ = setup
    store.refuse[JobState.FAILED] = 1  # a full disk: WORKER_DIED cannot be written, and that is the reason
    runner = make()
    runner.start()
    store.create("die-a", None, SPEC, 5)
    runner.submit("die-a")
    _wait(lambda: store.state("die-a") == JobState.FAILED)
    assert store.get("die-a").error_code == DISK_FULL


def test_the_dispatcher_survives_a_refused_start_and_runs_the_job_later(setup):
    store, make, _ = setup
    store.refuse[JobState.RUNNING] = 2
    runner = make()
    runner.start()
    store.create("job-a", None, SPEC, 5)
    runner.submit("job-a")
    _wait(lambda: store.state("job-a") == JobState.SUCCEEDED)
    states = [e.payload["state"] for e in store.events_after("job-a", 0) if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_cancel_of_a_running_job_without_a_worker_ends_cancelled(setup):
    store, make, _ = setup
    runner = make()
    runner.start()
    store.create("job-a", None, SPEC, 5)  # RUNNING in the store, but this runner has no worker for it
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING)
    runner.cancel("job-a")
    assert store.state("job-a") == JobState.CANCELLED
