"""Job runners: where tuning jobs execute. The service talks to the small ``JobRunner`` interface only.

``LocalProcessRunner`` (the default) runs each job in its own worker process
(``python -m layercard_service.tune.worker``): a crash or OOM kills the worker, not the service, and it is the
shape a Kubernetes runner mirrors (one pod per job). At most ``max_concurrent`` workers run; the rest wait in
a FIFO queue. The runner only dispatches and supervises; workers write their own progress to the database.

Restart semantics (``start``): QUEUED jobs are queued again; a RUNNING job (its worker gone with the old
service) goes back to QUEUED with an event saying from which checkpoint step it resumes; a CANCELLING one
becomes CANCELLED. On ``close`` workers get SIGTERM, then SIGKILL, and their jobs stay RUNNING, so the next
start resumes them. A worker that exits without ending its job while the service runs fails it: WORKER_DIED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from layercard_service.telemetry import JobOutcome, Telemetry
from layercard_service.tune.checkpoint import latest_step
from layercard_service.tune.job_store import JobStore
from layercard_service.tune.jobs import JobState

__all__ = ["JobRunner", "LocalProcessRunner", "report_job_end", "worker_command"]

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 1500


class JobRunner(ABC):
    """Executes queued jobs. Jobs' states live in the job store; the runner moves QUEUED to RUNNING."""

    telemetry: Telemetry = Telemetry()  # told once of every job that ends (report_job_end)

    @abstractmethod
    def start(self) -> None:
        """Recovers jobs left by a previous service process and starts dispatching."""

    @abstractmethod
    def submit(self, job_id: str) -> None:
        """Queues a job that is QUEUED in the store."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Drops a queued job; a running one's worker is ended if it has not stopped within a grace period.

        The store already says CANCELLED (queued) or CANCELLING (running): the worker normally honours that
        itself before its next step, and the grace period only covers a worker stuck between steps.
        """

    @abstractmethod
    def close(self) -> None:
        """Stops dispatching and ends running workers, leaving their jobs resumable."""

    def forget(self, job_id: str) -> None:
        """Removes what the runner keeps of a deleted (ended) job, such as its log; nothing by default."""


def worker_command(
    data_dir: Path,
    model_roots: Sequence[Path],
    dataset_roots: Sequence[Path],
    max_lora_rank: int,
    threads: int = 0,
) -> Callable[[str], list[str]]:
    """The argv that runs one job's worker with this interpreter."""

    def command(job_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layercard_service.tune.worker",
            "--data-dir",
            str(data_dir),
            "--job-id",
            job_id,
            "--model-roots",
            ",".join(str(p) for p in model_roots),
            "--dataset-roots",
            ",".join(str(p) for p in dataset_roots),
            "--max-lora-rank",
            str(max_lora_rank),
            "--threads",
            str(threads),
        ]

    return command


class LocalProcessRunner(JobRunner):
    def __init__(
        self,
        store: JobStore,
        data_dir: Path,
        command: Callable[[str], list[str]],
        *,
        max_concurrent: int = 1,
        terminate_grace_seconds: float = 10.0,
        cancel_grace_seconds: float = 120.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry or Telemetry()
        self.data_dir = Path(data_dir)
        self.command = command
        self.max_concurrent = max_concurrent
        self.terminate_grace_seconds = terminate_grace_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.log_dir = self.data_dir / "logs" / "jobs"
        self._queue: deque[str] = deque()
        self._running: dict[str, subprocess.Popen] = {}
        self._monitors: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._closing = False
        self._dispatcher: threading.Thread | None = None

    # --- interface ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        for job_id in self.store.ids_in([JobState.QUEUED]):
            self.submit(job_id)
        self._dispatcher = threading.Thread(target=self._dispatch, name="tuning-dispatcher", daemon=True)
        self._dispatcher.start()

    def submit(self, job_id: str) -> None:
        with self._cond:
            if job_id not in self._queue and job_id not in self._running:
                self._queue.append(job_id)
                self._cond.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
                return
            proc = self._running.get(job_id)
        if proc is not None:
            timer = threading.Timer(self.cancel_grace_seconds, self._force_stop, args=(job_id, proc))
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            running = list(self._running.items())
        for job_id, proc in running:
            log.info("stopping the worker of %s; the job resumes at the next start", job_id)
            _signal(proc, signal.SIGTERM)
        for _, proc in running:
            try:
                proc.wait(self.terminate_grace_seconds)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        for monitor in self._monitors:
            monitor.join(timeout=5)

    # --- introspection (tests, metrics) -------------------------------------------------------------------
    @property
    def queued(self) -> list[str]:
        with self._cond:
            return list(self._queue)

    @property
    def running(self) -> list[str]:
        with self._cond:
            return list(self._running)

    # --- internals ----------------------------------------------------------------------------------------
    def _recover(self) -> None:
        for job_id in self.store.ids_in([JobState.RUNNING, JobState.CANCELLING]):
            _kill_stale_worker(self.store.worker_pid(job_id), job_id)
            if self.store.state(job_id) == JobState.CANCELLING:
                self.store.transition(
                    job_id, [JobState.CANCELLING], JobState.CANCELLED, "cancelled while the service was stopped"
                )
                continue
            step = latest_step(self.data_dir / "artifacts" / "checkpoints" / job_id)
            self.store.append_events(job_id, [], step=step)
            message = (
                f"resuming from step {step} after a service restart"
                if step
                else "restarting from step 0 after a service restart: no checkpoint had been written"
            )
            self.store.transition(job_id, [JobState.RUNNING], JobState.QUEUED, message)
            log.info(message, extra={"job_id": job_id})

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._closing and (not self._queue or len(self._running) >= self.max_concurrent):
                    self._cond.wait()
                if self._closing:
                    return
                job_id = self._queue.popleft()
                # QUEUED -> RUNNING before the worker starts: a cancel from now on is CANCELLING, which the
                # worker honours at its first poll.
                if not self.store.transition(job_id, [JobState.QUEUED], JobState.RUNNING, "worker starting"):
                    continue
                try:
                    proc = self._spawn(job_id)
                except OSError as exc:
                    self.store.transition(
                        job_id,
                        [JobState.RUNNING, JobState.CANCELLING],
                        JobState.FAILED,
                        f"cannot start the worker: {exc}",
                        error_code="WORKER_START_FAILED",
                        error_message=f"cannot start the worker: {exc}",
                    )
                    report_job_end(self.store, self.telemetry, job_id)
                    continue
                self._running[job_id] = proc
                monitor = threading.Thread(target=self._supervise, args=(job_id, proc), daemon=True)
                self._monitors.append(monitor)
                monitor.start()

    def forget(self, job_id: str) -> None:
        (self.log_dir / f"{job_id}.log").unlink(missing_ok=True)

    def _spawn(self, job_id: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{job_id}.log", "ab") as log_file:
            # A session of its own: a Ctrl-C at the service's terminal reaches the service, which ends workers.
            proc = subprocess.Popen(
                self.command(job_id),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.store.set_progress(job_id, worker_pid=proc.pid)
        return proc

    def _supervise(self, job_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._cond:
            self._running.pop(job_id, None)
            closing = self._closing
            self._cond.notify_all()
        if closing:
            return  # the job stays RUNNING (or whatever the worker wrote) and is recovered at the next start
        state = self.store.state(job_id)
        if state == JobState.CANCELLING:
            self.store.transition(
                job_id, [JobState.CANCELLING], JobState.CANCELLED, f"the worker exited (code {code}) while cancelling"
            )
        elif state == JobState.RUNNING:
            message = f"the worker process exited with code {code} without finishing the job{self._log_tail(job_id)}"
            self.store.transition(
                job_id,
                [JobState.RUNNING],
                JobState.FAILED,
                message,
                error_code="WORKER_DIED",
                error_message=message,
            )
        report_job_end(self.store, self.telemetry, job_id)

    def _force_stop(self, job_id: str, proc: subprocess.Popen) -> None:
        if proc.poll() is None and not self._closing and self.store.state(job_id) == JobState.CANCELLING:
            log.warning("the worker of %s ignored the cancel for %.0f s: killing it", job_id, self.cancel_grace_seconds)
            _signal(proc, signal.SIGKILL)  # _supervise then records CANCELLED

    def _log_tail(self, job_id: str) -> str:
        path = self.log_dir / f"{job_id}.log"
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                tail = handle.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; last output: {tail}" if tail else ""


def report_job_end(store: JobStore, telemetry: Telemetry, job_id: str) -> None:
    """Tells telemetry how a job whose worker finished ended (every runner calls it once per job)."""
    job = store.get(job_id)
    if job is None or not job.state.ended:
        return
    r = job.result
    telemetry.job_ended(
        JobOutcome(
            state=job.state.value,
            seconds=(job.end_time or 0.0) - (job.start_time or job.end_time or 0.0),
            tokens_per_second=r.tokens_per_second if r else 0.0,
            predicted_step_seconds=r.predicted_step_seconds if r else 0.0,
            measured_step_seconds=r.measured_step_seconds if r else 0.0,
            predicted_peak_memory_bytes=r.predicted_peak_memory_bytes if r else 0,
            measured_peak_memory_bytes=r.measured_peak_memory_bytes if r else 0,
        )
    )


def _signal(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _kill_stale_worker(pid: int | None, job_id: str) -> None:
    """A worker left running by a service that died without stopping it: end it before the job is requeued."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # gone (or no /proc): nothing to stop
    if b"layercard_service.tune.worker" not in cmdline or job_id.encode() not in cmdline:
        return  # the pid was reused by another process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
