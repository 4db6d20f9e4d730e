"""Tuning jobs and their events: the job store the service (and, today, each worker process) writes.

Every state change is one transaction with the event that announces it, so a watcher never sees a state
without its event. Event sequence numbers are assigned inside the writing transaction (max + 1), so they are
gap-free per job even with two writers in two processes (the service cancelling, the worker stepping).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layercard_service.domain.jobs import JobEvent, JobRecord, JobResult, JobSpec, JobState
from layercard_service.errors import AlreadyExists
from layercard_service.persistence import as_database
from layercard_service.persistence.adapter_versions import AdapterVersion, AdapterVersions
from layercard_service.persistence.database import Database, Session

__all__ = ["JobStore", "NewEvent", "state_event"]


@dataclass(frozen=True)
class NewEvent:
    kind: str  # state | step | eval | checkpoint | note (a message alone)
    payload: dict[str, Any]
    message: str = ""
    time: float | None = None  # when it happened; None: when it is written (the worker buffers step events)


def state_event(state: JobState, message: str = "") -> NewEvent:
    return NewEvent("state", {"state": state.value}, message)


class JobStore:
    """Jobs and events over a Database: the service's shared one, or (given a path) one of its own.

    ``JobStore(path)`` opens and closes its own database (a worker process does so); ``JobStore(db)`` uses a
    shared one and leaves closing it to its owner.
    """

    def __init__(self, db: Database | Path) -> None:
        self.db, self._owns_db = as_database(db)
        self.path = self.db.path
        self.adapter_versions = AdapterVersions(self.db)

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """Every write of this repository goes through here (tests stand in a full disk by overriding it)."""
        with self.db.transaction() as tx:
            yield tx

    # --- jobs ---------------------------------------------------------------------------------------------
    def create(self, job_id: str, request_id: str | None, spec: JobSpec, total_steps: int) -> tuple[JobRecord, bool]:
        """Inserts a QUEUED job; (the job, True). A known request_id gives (its first job, False)."""
        now = time.time()
        stored = json.dumps(spec.to_dict())
        with self._write() as tx:
            if request_id:
                row = tx.execute("SELECT * FROM tuning_jobs WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return _job(row), False
            if tx.execute("SELECT 1 FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone():
                raise AlreadyExists(
                    f"tuning job 'tuningJobs/{job_id}' already exists",
                    reason="TUNING_JOB_EXISTS",
                    metadata={"name": f"tuningJobs/{job_id}"},
                )
            tx.execute(
                "INSERT INTO tuning_jobs (job_id, request_id, state, spec, create_time, total_steps) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, request_id or None, JobState.QUEUED.value, stored, now, total_steps),
            )
            _append(tx, job_id, [state_event(JobState.QUEUED, "job accepted")], now)
            row = tx.execute("SELECT * FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row), True

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def find_by_request(self, request_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM tuning_jobs WHERE request_id = ?", (request_id,)).fetchone()
        return _job(row) if row is not None else None

    def state(self, job_id: str) -> JobState | None:
        """The cheap poll a worker runs before every step."""
        row = self.db.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobState(row[0]) if row is not None else None

    def list(self, states: Sequence[JobState], offset: int, limit: int) -> list[JobRecord]:
        query, args = "SELECT * FROM tuning_jobs", []
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args.extend(s.value for s in states)
        query += " ORDER BY create_time DESC, job_id DESC LIMIT ? OFFSET ?"
        return [_job(row) for row in self.db.execute(query, (*args, limit, offset))]

    def ids_in(self, states: Iterable[JobState]) -> list[str]:
        """Job ids in these states, oldest first (the order a queue runs them)."""
        values = [s.value for s in states]
        rows = self.db.execute(
            f"SELECT job_id FROM tuning_jobs WHERE state IN ({','.join('?' * len(values))}) "
            "ORDER BY create_time, job_id",
            values,
        )
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
        result: JobResult | Callable[[Session], JobResult] | None = None,
        extra_events: Sequence[NewEvent] = (),
    ) -> bool:
        """Moves the job to ``to`` if it is in one of ``from_states``; False (nothing written) otherwise.

        ``extra_events`` are written before the state event. A callable ``result`` runs inside the same
        transaction, after the state check, and gets its session (adapter publication, through
        ``adapter_versions.next_version``/``insert_version``: a version row exists exactly when its job
        succeeded, and a job cancelled meanwhile publishes nothing).
        """
        allowed = [s.value for s in from_states]
        now = time.time()
        with self._write() as tx:
            row = tx.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in allowed:
                return False
            if callable(result):
                result = result(tx)
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
            tx.execute(f"UPDATE tuning_jobs SET {', '.join(sets)} WHERE job_id = ?", (*args, job_id))
            _append(tx, job_id, [*extra_events, state_event(to, message)], now)
        return True

    def append_events(self, job_id: str, events: Sequence[NewEvent], step: int | None = None) -> None:
        """Adds events (and the job's progress) in one transaction: a worker flushes its buffered steps here."""
        if not events and step is None:
            return
        with self._write() as tx:
            if step is not None:
                tx.execute("UPDATE tuning_jobs SET step = ? WHERE job_id = ?", (step, job_id))
            _append(tx, job_id, events, time.time())

    def set_progress(self, job_id: str, *, total_steps: int | None = None, worker_pid: int | None = None) -> None:
        with self._write() as tx:
            if total_steps is not None:
                tx.execute("UPDATE tuning_jobs SET total_steps = ? WHERE job_id = ?", (total_steps, job_id))
            if worker_pid is not None:
                tx.execute("UPDATE tuning_jobs SET worker_pid = ? WHERE job_id = ?", (worker_pid, job_id))

    # --- worker credentials and reports (runners/worker_reports.py) ---------------------------------------------------
    def set_worker_credential(self, job_id: str, token_sha256: str) -> None:
        """The credential of the job's next worker attempt; the previous attempt's stops working."""
        with self._write() as tx:
            tx.execute(
                "INSERT OR REPLACE INTO tuning_job_workers (job_id, token_sha256, batch) VALUES (?, ?, 0)",
                (job_id, token_sha256),
            )

    def job_of_credential(self, token_sha256: str) -> str | None:
        """The job whose current worker credential this is; None: no job's."""
        row = self.db.execute("SELECT job_id FROM tuning_job_workers WHERE token_sha256 = ?", (token_sha256,))
        row = row.fetchone()
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
        with self._write() as tx:
            row = tx.execute("SELECT state FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None, False
            state = JobState(row[0])
            if state.value not in allowed:
                return state, False
            if batch > 0:
                seen = tx.execute("SELECT batch FROM tuning_job_workers WHERE job_id = ?", (job_id,)).fetchone()
                if seen is not None and batch <= seen[0]:
                    return state, False
                tx.execute("UPDATE tuning_job_workers SET batch = ? WHERE job_id = ?", (batch, job_id))
            if worker_pid is not None:
                tx.execute("UPDATE tuning_jobs SET worker_pid = ? WHERE job_id = ?", (worker_pid, job_id))
            if step is not None:
                tx.execute("UPDATE tuning_jobs SET step = ? WHERE job_id = ?", (step, job_id))
            _append(tx, job_id, events, time.time())
        return state, True

    def worker_pid(self, job_id: str) -> int | None:
        row = self.db.execute("SELECT worker_pid FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def events_after(self, job_id: str, after: int, limit: int = 1000) -> list[JobEvent]:
        rows = self.db.execute(
            "SELECT * FROM tuning_job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
            (job_id, after, limit),
        )
        return [JobEvent(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows]

    def delete(self, job_id: str, remove_dataset: Callable[[str], None]) -> JobState | None:
        """Deletes an ended job and its events in one transaction; returns the state it had (None: no such job).

        A job not ended is left as it is (its state is returned). Adapter versions it published stay: adapters
        outlive their jobs. ``remove_dataset(sha256)`` runs inside the transaction for each of the job's inline
        datasets that no other job refers to, so a job created meanwhile with the same data keeps its file.
        """
        with self._write() as tx:
            row = tx.execute("SELECT state, spec FROM tuning_jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state = JobState(row[0])
            if not state.ended:
                return state
            tx.execute("DELETE FROM tuning_job_events WHERE job_id = ?", (job_id,))
            tx.execute("DELETE FROM tuning_job_workers WHERE job_id = ?", (job_id,))
            tx.execute("DELETE FROM tuning_jobs WHERE job_id = ?", (job_id,))
            _release(tx, _dataset_hashes(json.loads(row[1])), remove_dataset)
        return state

    def release_datasets(self, hashes: Iterable[str], remove_dataset: Callable[[str], None]) -> None:
        """Removes stored datasets no job refers to (a create that stored one, then wrote no job)."""
        with self._write() as tx:
            _release(tx, hashes, remove_dataset)

    def count_by_state(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM tuning_jobs GROUP BY state")
        return {state.value: 0 for state in JobState} | {r[0]: r[1] for r in rows}

    # --- adapter versions: their own repository now (persistence/adapter_versions.py); kept for callers ---------
    def versions(self, adapter_id: str) -> list[AdapterVersion]:
        return self.adapter_versions.versions(adapter_id)

    def adapter_ids(self, offset: int, limit: int) -> list[str]:
        return self.adapter_versions.adapter_ids(offset, limit)

    def has_adapter(self, adapter_id: str) -> bool:
        return self.adapter_versions.has_adapter(adapter_id)


def _append(tx: Session, job_id: str, events: Sequence[NewEvent], now: float) -> None:
    row = tx.execute("SELECT MAX(sequence) FROM tuning_job_events WHERE job_id = ?", (job_id,)).fetchone()
    sequence = row[0] or 0
    for event in events:
        sequence += 1
        tx.execute(
            "INSERT INTO tuning_job_events VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, sequence, event.time or now, event.kind, json.dumps(event.payload), event.message),
        )


def _dataset_hashes(spec: dict[str, Any]) -> set[str]:
    datasets = (spec.get("training_data"), spec.get("validation_data"))
    return {d["inline_jsonl_sha256"] for d in datasets if d and d.get("inline_jsonl_sha256")}


def _release(tx: Session, hashes: Iterable[str], remove_dataset: Callable[[str], None]) -> None:
    for sha256 in set(hashes):
        used = tx.execute(
            "SELECT 1 FROM tuning_jobs WHERE json_extract(spec, '$.training_data.inline_jsonl_sha256') = ? "
            "OR json_extract(spec, '$.validation_data.inline_jsonl_sha256') = ? LIMIT 1",
            (sha256, sha256),
        ).fetchone()
        if used is None:
            remove_dataset(sha256)


def _job(row: tuple) -> JobRecord:
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
