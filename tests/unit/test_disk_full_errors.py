"""A full disk at the persistence layer: SQLite's and the OS's errors become ResourceExhausted(DISK_FULL), and a
failed COMMIT leaves the connection usable. The real full disk (a small tmpfs) is in integration/test_disk_full.py;
here a connection fails its COMMIT on cue, and the worker log excerpt is checked on text."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.errors import ResourceExhausted
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import DISK_FULL, atomic_write, disk_full_error, is_disk_full, storage_errors
from layercard_service.runners.worker_log import error_excerpt
from layercard_service.runners.worker_reports import WorkerReports, issue_worker_token
from layercard_service.trainer import worker
from layercard_service.trainer.reporter import InProcessChannel

SPEC = JobSpec(
    "builtin:tiny",
    DatasetRequest(builtin="builtin:cipher"),
    None,
    PlacementSpec(layers=(1,)),
    Hyperparameters(steps=5),
    "bot",
)


class FailingCommit:
    """Wraps a connection; its next COMMIT fails as SQLite's does when the WAL cannot grow."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.failures = db, 1

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_the_store_works_after_a_failed_commit(tmp_path):
    store = JobStore(tmp_path / "state.db")
    store.create("job-a", None, SPEC, 5)
    store.db._connection = FailingCommit(store.db._connection)
    with pytest.raises(ResourceExhausted) as err:
        store.transition("job-a", [JobState.QUEUED], JobState.RUNNING, "worker starting")
    assert err.value.reason == DISK_FULL and "disk is full" in err.value.message
    assert store.state("job-a") == JobState.QUEUED  # rolled back, not half written
    assert store.transition("job-a", [JobState.QUEUED], JobState.RUNNING, "worker starting")
    assert [e.payload["state"] for e in store.events_after("job-a", 0)] == ["QUEUED", "RUNNING"]
    store.close()


@pytest.mark.parametrize(
    "exc, full",
    [
        (sqlite3.OperationalError("database or disk is full"), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (sqlite3.OperationalError("database is locked"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
    ],
)
def test_storage_errors_map_only_a_full_disk(tmp_path, exc, full):
    with pytest.raises(ResourceExhausted if full else type(exc)) as err, storage_errors(tmp_path):
        raise exc
    assert is_disk_full(err.value) is full
    if full:
        assert err.value.reason == DISK_FULL and err.value.__cause__ is exc


def test_atomic_write_on_a_full_disk_is_resource_exhausted(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(ResourceExhausted) as err:
        atomic_write(tmp_path / "card.json", b"{}")
    assert err.value.reason == DISK_FULL
    assert list(tmp_path.iterdir()) == []  # the temporary file went too


def test_error_excerpt_takes_the_traceback_and_drops_progress_bars():
    bars = "".join(f"\rLoading weights: {i:3d}%|#    | {i}/100 [00:01<00:09, 9.9it/s]" for i in range(100))
    log = (
        "2026-01-01 00:00:00,000 INFO worker: starting\n"
        f"{bars}\n"
        "2026-01-01 00:00:01,000 ERROR worker: job job-a failed\n"
        "Traceback (most recent call last):\n"
        '  File "loop.py", line 3, in run\n'
        "    step()\n"
        "RuntimeError: CUDA error: out of memory\n"
        f"{bars}\n"
    )
    excerpt = error_excerpt(log)
    assert excerpt.startswith("2026-01-01 00:00:01,000 ERROR worker: job job-a failed\nTraceback")
    assert excerpt.endswith("RuntimeError: CUDA error: out of memory")
    assert error_excerpt(f"{bars}\n{bars}") == ""  # killed mid-bar (OOM killer): nothing to show, no noise
    assert error_excerpt("a\n2026 ERROR x: disk gone\nb\n") == "2026 ERROR x: disk gone"


class FullStore(JobStore):
    """A store on a full disk: every write is refused."""

    def _write(self):
        raise disk_full_error(self.path.parent)


def _channel(store: JobStore, tmp_path) -> InProcessChannel:
    """The worker's reports reach the service's side, which writes to its (full) store."""
    return InProcessChannel(WorkerReports(store, tmp_path / "artifacts", 16), "job-a")


def _worker_job(tmp_path, store_class=JobStore):
    store = JobStore(tmp_path / "state.db")
    store.create("job-a", None, SPEC, 5)
    issue_worker_token(store, "job-a")
    store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
    store.close()
    return store_class(tmp_path / "state.db"), worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])


def test_a_worker_that_cannot_write_exits_with_the_disk_full_code(tmp_path):
    store, settings = _worker_job(tmp_path, FullStore)
    assert (
        worker.run_job(_channel(store, tmp_path), settings) == worker.EXIT_DISK_FULL
    )  # the runner then writes FAILED/DISK_FULL
    assert store.state("job-a") == JobState.RUNNING
    store.close()


def test_a_write_failure_that_does_not_say_enospc_on_a_full_disk_fails_the_job_disk_full(tmp_path, monkeypatch):
    store, settings = _worker_job(tmp_path)

    def train(*args):  # torch.save on a full disk says only this
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(worker, "_train", train)
    monkeypatch.setattr(worker.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    assert worker.run_job(_channel(store, tmp_path), settings) == 0
    job = store.get("job-a")
    assert job.state == JobState.FAILED and job.error_code == DISK_FULL and "file write failed" in job.error_message
    store.close()
