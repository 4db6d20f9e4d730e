"""Tuning jobs, their events, adapter versions and worker credentials in SQLite: the service's ``state.db``.

Only the service opens it: workers report through the service's internal API (tune/reports.py). WAL lets
readers run beside one writer and ``busy_timeout`` makes a second writer wait instead of failing. Every state
change is one transaction with the event that announces it, so a watcher never sees a state without its event.
Event sequence numbers are assigned inside the writing transaction (max + 1), so they are gap-free per job.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layercard_service.errors import AlreadyExists
from layercard_service.store import storage_errors
from layercard_service.tune.jobs import JobEvent, JobRecord, JobResult, JobSpec, JobState

__all__ = ["AdapterVersion", "JobStore", "NewEvent"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tuning_jobs (
    job_id        TEXT PRIMARY KEY,
    request_id    TEXT UNIQUE,
    state         TEXT NOT NULL,
    spec          TEXT NOT NULL,
    create_time   REAL NOT NULL,
    start_time    REAL,
    end_time      REAL,
    step          INTEGER NOT NULL DEFAULT 0,
    total_steps   INTEGER NOT NULL,
    error_code    TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    result        TEXT,
    worker_pid    INTEGER
);
CREATE INDEX IF NOT EXISTS tuning_jobs_by_time ON tuning_jobs (create_time DESC, job_id);
CREATE TABLE IF NOT EXISTS tuning_job_events (
    job_id   TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time     REAL NOT NULL,
    kind     TEXT NOT NULL,
    payload  TEXT NOT NULL,
    message  TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, sequence)
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    adapter_id  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    path        TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    create_time REAL NOT NULL,
    metadata    TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version)
);
CREATE TABLE IF NOT EXISTS tuning_job_workers (
    job_id       TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    batch        INTEGER NOT NULL DEFAULT 0
);
"""

BUSY_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class NewEvent:
    kind: str  # state | step | eval | checkpoint | note (a message alone)
    payload: dict[str, Any]
    message: str = ""
    time: float | None = None  # when it happened; None: when it is written (the worker buffers step events)


@dataclass(frozen=True)
class AdapterVersion:
    adapter_id: str
    version: int
    path: str
    job_id: str
    create_time: float
    metadata: dict[str, Any]


def state_event(state: JobState, message: str = "") -> NewEvent:
    return NewEvent("state", {"state": state.value}, message)


class JobStore:
    """One connection; calls are serialised by a lock so that threads of one process can share it."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._lock, storage_errors(self.path.parent):
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock up front, so read-then-write cannot race.

        A failed COMMIT (a full disk fails there, when WAL frames are written) is rolled back too: SQLite may
        leave the transaction open, and the connection would refuse every later BEGIN.
        """
        with self._lock, storage_errors(self.path.parent):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself after some errors (SQLITE_FULL)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    # --- jobs ---------------------------------------------------------------------------------------------
    def create(self, job_id: str, request_id: str | None, spec: JobSpec, total_steps: int) -> tuple[JobRecord, bool]:
        """Inserts a QUEUED job; (the job, True). A known request_id gives (its first job, False)."""
        now = time.time()
        with self._write() as db:
            if request_id:
                row = db.execute("SELECT * FROM tuning_jobs WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _job(row), False
            if db.execute("SELECT 1 FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone():
                raise AlreadyExists(
                    f"tuning job 'tuningJobs/{job_id}' already exists",
                    reason="TUNING_JOB_EXISTS",
                    metadata={"name": f"tuningJobs/{job_id}"},
                )
            db.execute(
                "INSERT INTO tuning_jobs (job_id, request_id, state, spec, create_time, total_steps) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, request_id or None, JobState.QUEUED.value, json.dumps(spec.to_dict()), now, total_steps),
            )
            _append(db, job_id, [state_event(JobState.QUEUED, "job accepted")], now)
            row = db.execute("SELECT * FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row), True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def find_by_request(self, request_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tuning_jobs WHERE request_id = ?", (request_id,)).fetchone()
        return _job(row) if row is not None else None

    def state(self, job_id: str) -> JobState | None:
        """The cheap poll a worker runs before every step."""
        with self._lock:
            row = self._db.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobState(row[0]) if row is not None else None

    def list(self, states: Sequence[JobState], offset: int, limit: int) -> list[JobRecord]:
        query, args = "SELECT * FROM tuning_jobs", []
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args.extend(s.value for s in states)
        query += " ORDER BY create_time DESC, job_id DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit, offset)).fetchall()
        return [_job(row) for row in rows]

    def ids_in(self, states: Iterable[JobState]) -> list[str]:
        """Job ids in these states, oldest first (the order a queue runs them)."""
        values = [s.value for s in states]
        with self._lock:
            rows = self._db.execute(
                f"SELECT job_id FROM tuning_jobs WHERE state IN ({','.join('?' * len(values))}) "
                "ORDER BY create_time, job_id",
                values,
            ).fetchall()
        return [r[0] for r in rows]

    def transition(
        self,
        job_id: str,
        from_states: Iterable[JobState],
        to: JobState,
        message: str = "",
        *,
        error_code: str = "",
        error_message: str = "",
        result: JobResult | Callable[[sqlite3.Connection], JobResult] | None = None,
        extra_events: Sequence[NewEvent] = (),
    ) -> bool:
        """Moves the job to ``to`` if it is in one of ``from_states``; False (nothing written) otherwise.

        ``extra_events`` are written before the state event. A callable ``result`` runs inside the same
        transaction, after the state check (adapter publication: a version row exists exactly when its job
        succeeded, and a job cancelled meanwhile publishes nothing).
        """
        allowed = [s.value for s in from_states]
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in allowed:
                return False
            if callable(result):
                result = result(db)
            sets = ["state = ?"]
            args: list[object] = [to.value]
            if to == JobState.RUNNING:
                sets.append("start_time = COALESCE(start_time, ?)")
                args.append(now)
            if to == JobState.QUEUED:
                sets.append("worker_pid = NULL")  # waiting again: the next attempt's worker reports its own pid
            if to.ended:
                sets += ["end_time = ?", "error_code = ?", "error_message = ?", "result = ?", "worker_pid = NULL"]
                args += [now, error_code, error_message, json.dumps(result.to_dict()) if result else None]
            db.execute(f"UPDATE tuning_jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))
            _append(db, job_id, [*extra_events, state_event(to, message)], now)
        return True

    def append_events(self, job_id: str, events: Sequence[NewEvent], step: int | None = None) -> None:
        """Adds events (and the job's progress) in one transaction: a worker flushes its buffered steps here."""
        if not events and step is None:
            return
        with self._write() as db:
            if step is not None:
                db.execute("UPDATE tuning_jobs SET step = ? WHERE job_id = ?", (step, job_id))
            _append(db, job_id, events, time.time())

    def set_progress(self, job_id: str, *, total_steps: int | None = None, worker_pid: int | None = None) -> None:
        with self._write() as db:
            if total_steps is not None:
                db.execute("UPDATE tuning_jobs SET total_steps = ? WHERE job_id = ?", (total_steps, job_id))
            if worker_pid is not None:
                db.execute("UPDATE tuning_jobs SET worker_pid = ? WHERE job_id = ?", (worker_pid, job_id))

    # --- worker credentials and reports (tune/reports.py) ---------------------------------------------------
    def set_worker_credential(self, job_id: str, token_sha256: str) -> None:
        """The credential of the job's next worker attempt; the previous attempt's stops working."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO tuning_job_workers (job_id, token_sha256, batch) VALUES (?, ?, 0)",
                (job_id, token_sha256),
            )

    def job_of_credential(self, token_sha256: str) -> str | None:
        """The job whose current worker credential this is; None: no job's."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id FROM tuning_job_workers WHERE token_sha256 = ?", (token_sha256,)
            ).fetchone()
        return row[0] if row else None

    def record_report(
        self,
        job_id: str,
        batch: int,
        events: Sequence[NewEvent],
        step: int | None,
        worker_pid: int | None,
        writable: Iterable[JobState],
    ) -> tuple[JobState | None, bool]:
        """A worker's report in one transaction: (the job's state, whether anything was written).

        Nothing is written when the job is not in a ``writable`` state, or when ``batch`` (> 0) is not above
        the highest batch recorded for the current credential: a retry of a batch already recorded.
        """
        allowed = {s.value for s in writable}
        with self._write() as db:
            row = db.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None, False
            state = JobState(row[0])
            if state.value not in allowed:
                return state, False
            if batch > 0:
                seen = db.execute("SELECT batch FROM tuning_job_workers WHERE job_id = ?", (job_id,)).fetchone()
                if seen is not None and batch <= seen[0]:
                    return state, False
                db.execute("UPDATE tuning_job_workers SET batch = ? WHERE job_id = ?", (batch, job_id))
            if worker_pid is not None:
                db.execute("UPDATE tuning_jobs SET worker_pid = ? WHERE job_id = ?", (worker_pid, job_id))
            if step is not None:
                db.execute("UPDATE tuning_jobs SET step = ? WHERE job_id = ?", (step, job_id))
            _append(db, job_id, events, time.time())
        return state, True

    def worker_pid(self, job_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT worker_pid FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def events_after(self, job_id: str, after: int, limit: int = 1000) -> list[JobEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM tuning_job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [JobEvent(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]

    def delete(self, job_id: str, remove_dataset: Callable[[str], None]) -> JobState | None:
        """Deletes an ended job and its events in one transaction; returns the state it had (None: no such job).

        A job not ended is left as it is (its state is returned). Adapter versions it published stay: adapters
        outlive their jobs. ``remove_dataset(sha256)`` runs inside the transaction for each of the job's inline
        datasets that no other job refers to, so a job created meanwhile with the same data keeps its file.
        """
        with self._write() as db:
            row = db.execute("SELECT state, spec FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row[0])
            if not state.ended:
                return state
            db.execute("DELETE FROM tuning_job_events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM tuning_job_workers WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM tuning_jobs WHERE job_id = ?", (job_id,))
            _release(db, _dataset_hashes(json.loads(row[1])), remove_dataset)
        return state

    def release_datasets(self, hashes: Iterable[str], remove_dataset: Callable[[str], None]) -> None:
        """Removes stored datasets no job refers to (a create that stored one, then wrote no job)."""
        with self._write() as db:
            _release(db, hashes, remove_dataset)

    # --- adapter versions ---------------------------------------------------------------------------------
    def versions(self, adapter_id: str) -> list[AdapterVersion]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM adapter_versions WHERE adapter_id = ? ORDER BY version", (adapter_id,)
            ).fetchall()
        return [AdapterVersion(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def adapter_ids(self, offset: int, limit: int) -> list[str]:
        """Adapters with at least one version, by id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT adapter_id FROM adapter_versions ORDER BY adapter_id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [r[0] for r in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM tuning_jobs GROUP BY state").fetchall()
        return {state.value: 0 for state in JobState} | {r[0]: r[1] for r in rows}

    def has_adapter(self, adapter_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM adapter_versions WHERE adapter_id = ? LIMIT 1", (adapter_id,))
            return row.fetchone() is not None


def next_version(db: sqlite3.Connection, adapter_id: str) -> int:
    """Inside a write transaction: the version number the next publication of ``adapter_id`` gets."""
    row = db.execute("SELECT MAX(version) FROM adapter_versions WHERE adapter_id = ?", (adapter_id,)).fetchone()
    return (row[0] or 0) + 1


def insert_version(db: sqlite3.Connection, version: AdapterVersion) -> None:
    db.execute(
        "INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?)",
        (
            version.adapter_id,
            version.version,
            version.path,
            version.job_id,
            version.create_time,
            json.dumps(version.metadata),
        ),
    )


def _append(db: sqlite3.Connection, job_id: str, events: Sequence[NewEvent], now: float) -> None:
    row = db.execute("SELECT MAX(sequence) FROM tuning_job_events WHERE job_id = ?", (job_id,)).fetchone()
    sequence = row[0] or 0
    for event in events:
        sequence += 1
        db.execute(
            "INSERT INTO tuning_job_events VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, sequence, event.time or now, event.kind, json.dumps(event.payload), event.message),
        )


def _dataset_hashes(spec: dict[str, Any]) -> set[str]:
    datasets = (spec.get("training_data"), spec.get("validation_data"))
    return {d["inline_jsonl_sha256"] for d in datasets if d and d.get("inline_jsonl_sha256")}


def _release(db: sqlite3.Connection, hashes: Iterable[str], remove_dataset: Callable[[str], None]) -> None:
    for sha256 in set(hashes):
        used = db.execute(
            "SELECT 1 FROM tuning_jobs WHERE json_extract(spec, '$.training_data.inline_jsonl_sha256') = ?1 "
            "OR json_extract(spec, '$.validation_data.inline_jsonl_sha256') = ?1 LIMIT 1",
            (sha256,),
        ).fetchone()
        if used is None:
            remove_dataset(sha256)


def _job(row: sqlite3.Row | tuple) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        request_id=row[1],
        state=JobState(row[2]),
        spec=JobSpec.from_dict(json.loads(row[3])),
        create_time=row[4],
        start_time=row[5],
        end_time=row[6],
        step=row[7],
        total_steps=row[8],
        error_code=row[9],
        error_message=row[10],
        result=JobResult.from_dict(json.loads(row[11])) if row[11] else None,
    )
