"""Job runners: where tuning jobs execute. The service talks to the small ``JobRunner`` interface only.

``LocalProcessRunner`` (the default) runs each job in its own worker process
(``python -m layercard_service.trainer.worker``): a crash or OOM kills the worker, not the service, and it is the
shape a Kubernetes runner mirrors (one pod per job). At most ``max_concurrent`` workers run; the rest wait in
a FIFO queue. The runner only dispatches and supervises; workers report their progress through the service's
internal API (runners/worker_reports.py): each gets the server's address (``--service-address``) and a fresh credential
for the attempt in its environment (``LAYERCARD_WORKER_TOKEN``), and never opens the database.

Restart semantics (``start``): QUEUED jobs are queued again; a RUNNING job (its worker gone with the old
service) goes back to QUEUED with an event saying from which checkpoint step it resumes; a CANCELLING one
becomes CANCELLED. On ``close`` workers get SIGTERM, then SIGKILL, and their jobs stay RUNNING, so the next
start resumes them. A worker that exits without ending its job while the service runs fails it: WORKER_DIED
(with the error its log shows), or DISK_FULL when the data dir's disk was full.

No runner thread dies of an error: a store write that fails (a full disk) is retried with backoff until it
succeeds or the runner closes, so a job is never left RUNNING without a worker or a thread to end it.
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
from typing import TYPE_CHECKING

from layercard_service.domain.jobs import JobState
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.store import DISK_FULL, is_disk_full
from layercard_service.runners.worker_log import error_excerpt
from layercard_service.runners.worker_reports import EXIT_DISK_FULL, TOKEN_ENV, ServiceEndpoint, issue_worker_token
from layercard_service.telemetry import JobOutcome, Telemetry
from layercard_service.trainer.checkpoint_dirs import latest_step
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES

if TYPE_CHECKING:
    from layercard_service.config import ServiceConfig

__all__ = ["JobRunner", "LocalProcessRunner", "report_job_end", "service_worker_command", "worker_command"]

log = logging.getLogger(__name__)

LOG_SCAN_BYTES = 64 * 1024  # how much of a dead worker's log is searched for its error
RETRY_MAX_SECONDS = 30.0


class JobRunner(ABC):
    """Executes queued jobs. Jobs' states live in the job store; the runner moves QUEUED to RUNNING."""

    telemetry: Telemetry = Telemetry()  # told once of every job that ends (report_job_end)
    ranks_per_job: int = 1  # processes that train one job together (data-parallel ranks, each its shard of a batch)
    endpoint: ServiceEndpoint | None = None  # where workers reach the service; set once the server has bound

    def set_service_endpoint(self, endpoint: ServiceEndpoint) -> None:
        """Where this server's workers report; runners whose workers run elsewhere keep their own address."""
        self.endpoint = endpoint

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
    prefix_cache_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> Callable[[str], list[str]]:
    """The argv that runs one job's worker with this interpreter."""

    def command(job_id: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "layercard_service.trainer.worker",
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
            "--prefix-cache-memory-bytes",
            str(prefix_cache_memory_bytes),
        ]

    return command


def service_worker_command(config: ServiceConfig, threads: int) -> Callable[[str], list[str]]:
    """The worker's argv from the service's settings (roots, rank limit, the prefix cache's bound)."""
    return worker_command(
        config.data_dir,
        config.model_roots,
        config.dataset_roots,
        config.max_lora_rank,
        threads=threads,
        prefix_cache_memory_bytes=config.prefix_cache_memory_bytes,
    )


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
        retry_seconds: float = 0.5,
    ) -> None:
        self.store = store
        self.telemetry = telemetry or Telemetry()
        self.data_dir = Path(data_dir)
        self.command = command
        self.max_concurrent = max_concurrent
        self.terminate_grace_seconds = terminate_grace_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self.retry_seconds = retry_seconds  # the first wait before a failed store write is tried again
        self.log_dir = self.data_dir / "logs" / "jobs"
        self._queue: deque[str] = deque()
        self._running: dict[str, subprocess.Popen] = {}
        self._settling: set[str] = set()  # worker gone, its supervisor still recording how the job ended
        self._monitors: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._closing = False
        self._closed = threading.Event()  # wakes retry waits at close
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
            settling = job_id in self._settling
        if proc is not None:
            timer = threading.Timer(self.cancel_grace_seconds, self._force_stop, args=(job_id, proc))
            timer.daemon = True
            timer.start()
        elif not settling and self.store.transition(
            # No worker, and no supervisor to see the CANCELLING: nothing else would ever end the job.
            job_id,
            [JobState.CANCELLING],
            JobState.CANCELLED,
            "cancelled: no worker was running",
        ):
            report_job_end(self.store, self.telemetry, job_id)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._closed.set()
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
        delay = self.retry_seconds
        while True:
            with self._cond:
                while not self._closing and (not self._queue or len(self._running) >= self.max_concurrent):
                    self._cond.wait()
                if self._closing:
                    return
                job_id = self._queue.popleft()
                try:
                    self._start(job_id)
                    delay, failed = self.retry_seconds, False
                except Exception:  # the store refused the write (a full disk): the job stays QUEUED
                    log.exception("cannot start job %s; trying again in %.1f s", job_id, delay)
                    self._queue.appendleft(job_id)
                    failed = True
            if failed:
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _start(self, job_id: str) -> None:
        """Under the lock: QUEUED -> RUNNING, then the worker and its supervisor."""
        # The attempt's credential first: a refused write leaves the job QUEUED. Then QUEUED -> RUNNING before
        # the worker starts: a cancel from now on is CANCELLING, which the worker honours at its first poll.
        token = issue_worker_token(self.store, job_id)
        if not self.store.transition(job_id, [JobState.QUEUED], JobState.RUNNING, "worker starting"):
            return
        try:
            proc = self._spawn(job_id, token)
        except OSError as exc:
            # RUNNING with no worker: recorded as FAILED by a thread of its own, retried until the store takes it.
            self._settling.add(job_id)
            thread = threading.Thread(target=self._record_start_failure, args=(job_id, exc), daemon=True)
            self._monitors.append(thread)
            thread.start()
            return
        self._running[job_id] = proc
        monitor = threading.Thread(target=self._supervise, args=(job_id, proc), daemon=True)
        self._monitors.append(monitor)
        monitor.start()
        try:  # for recovery after a crash of this service; the worker reports its pid itself too
            self.store.set_progress(job_id, worker_pid=proc.pid)
        except Exception:
            log.warning("cannot record the worker pid of %s", job_id, exc_info=True)

    def forget(self, job_id: str) -> None:
        (self.log_dir / f"{job_id}.log").unlink(missing_ok=True)

    def _spawn(self, job_id: str, token: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = list(self.command(job_id)) + (self.endpoint.worker_args() if self.endpoint else [])
        with open(self.log_dir / f"{job_id}.log", "ab") as log_file:
            # A session of its own: a Ctrl-C at the service's terminal reaches the service, which ends workers.
            return subprocess.Popen(
                argv,
                env={**os.environ, TOKEN_ENV: token},  # not in argv: anyone on the machine can read /proc/*/cmdline
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _supervise(self, job_id: str, proc: subprocess.Popen) -> None:
        try:
            code = proc.wait()
            with self._cond:
                self._running.pop(job_id, None)
                self._settling.add(job_id)
                closing = self._closing
                self._cond.notify_all()
            if closing:
                return  # the job stays RUNNING (or whatever the worker wrote) and is recovered at the next start
            disk_full = code == EXIT_DISK_FULL

            def settle() -> None:
                nonlocal disk_full
                try:
                    self._settle(job_id, code, disk_full)
                except Exception as exc:
                    disk_full = disk_full or is_disk_full(exc)  # the service cannot write either: say so
                    raise

            if self._retry(f"record the end of {job_id}", settle):
                report_job_end(self.store, self.telemetry, job_id)
        except Exception:  # a bug: logged, and the thread ends without taking the service down
            log.exception("the supervisor of %s failed", job_id)
        finally:
            with self._cond:
                self._settling.discard(job_id)

    def _settle(self, job_id: str, code: int, disk_full: bool) -> None:
        """Ends a job whose worker exited without ending it; a job the worker ended is left as it is."""
        state = self.store.state(job_id)
        if state == JobState.CANCELLING:
            self.store.transition(
                job_id, [JobState.CANCELLING], JobState.CANCELLED, f"the worker exited (code {code}) while cancelling"
            )
        elif state == JobState.RUNNING:
            if disk_full:
                error_code = DISK_FULL
                message = (
                    f"the data dir's disk is full: the worker could not write the job's progress (exit code {code}); "
                    "free space and create the job again"
                )
            else:
                error_code = "WORKER_DIED"
                message = f"the worker exited with code {code} without finishing the job{self._log_tail(job_id)}"
            self.store.transition(
                job_id, [JobState.RUNNING], JobState.FAILED, message, error_code=error_code, error_message=message
            )

    def _record_start_failure(self, job_id: str, exc: OSError) -> None:
        error_code = DISK_FULL if is_disk_full(exc) else "WORKER_START_FAILED"
        message = f"cannot start the worker: {exc}"
        active = [JobState.RUNNING, JobState.CANCELLING]

        def fail() -> None:
            self.store.transition(
                job_id, active, JobState.FAILED, message, error_code=error_code, error_message=message
            )

        try:
            if self._retry(f"record the failed start of {job_id}", fail):
                report_job_end(self.store, self.telemetry, job_id)
        except Exception:
            log.exception("cannot record the failed start of %s", job_id)
        finally:
            with self._cond:
                self._settling.discard(job_id)

    def _retry(self, what: str, write: Callable[[], object]) -> bool:
        """Runs ``write`` until it succeeds (True) or the runner closes (False), waiting longer each time."""
        delay = self.retry_seconds
        while True:
            try:
                write()
                return True
            except Exception as exc:
                if is_disk_full(exc):  # expected until space is freed: one line each time, no traceback
                    log.warning("cannot %s: %s; trying again in %.1f s", what, exc, delay)
                else:
                    log.exception("cannot %s; trying again in %.1f s", what, delay)
            if self._closed.wait(delay):
                return False  # the job stays as it is: the next start recovers it
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _force_stop(self, job_id: str, proc: subprocess.Popen) -> None:
        try:
            stuck = proc.poll() is None and not self._closing and self.store.state(job_id) == JobState.CANCELLING
        except Exception:
            log.exception("cannot read the state of %s", job_id)
            return
        if stuck:
            log.warning("the worker of %s ignored the cancel for %.0f s: killing it", job_id, self.cancel_grace_seconds)
            _signal(proc, signal.SIGKILL)  # _supervise then records CANCELLED

    def _log_tail(self, job_id: str) -> str:
        path = self.log_dir / f"{job_id}.log"
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - LOG_SCAN_BYTES))
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        excerpt = error_excerpt(text)
        return f"; the worker's log says: {excerpt}" if excerpt else ""


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
    if b"layercard_service.trainer.worker" not in cmdline or job_id.encode() not in cmdline:
        return  # the pid was reused by another process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
