"""The Kubernetes job runner: each tuning job is a ``batch/v1`` Job running the trainer image.

It keeps the local runner's contract (runner.py): at most ``max_concurrent`` Jobs exist at once and the rest
wait in a FIFO queue; the runner moves a job QUEUED -> RUNNING, puts the attempt's worker credential in a
Secret of its own and creates its Job, and the worker in the pod reports its progress, events and final state
(SUCCEEDED, FAILED, CANCELLED) through the service's internal API at ``service_address`` (runners/worker_reports.py);
it never opens ``state.db``, so trainer pods run on any node. The credential's digest is in the job store, so
a worker keeps reporting across a service restart (the runner re-attaches to its Job).

One background thread lists the Jobs with the runner's label selector every ``poll_seconds`` (or at once after
a submit or cancel) and acts on what changed: a Job that ended, or vanished, while its job is still RUNNING
fails the job with WORKER_DIED (with the Job's reason and the pod's termination message: the tail of its log);
one that ended while CANCELLING makes it CANCELLED. A poll, not a watch: one LIST per interval is cheap for
jobs that run for minutes, and it needs no resourceVersion bookkeeping across API server restarts.

A pod that cannot start (its image cannot be pulled, its config is broken) leaves a Job active forever: when
the worker has not reported in (its pid in the store) ``start_timeout_seconds`` after the Job was created and
the pod waits for such a reason, the job fails with WORKER_START_FAILED and its Job is deleted. A pod that
waits for a node (unschedulable) is left waiting: the cluster may scale up; ``activeDeadlineSeconds`` bounds it.

Cancel: a queued job is dropped; a running one's Job is deleted (propagation Background) once the worker has
stopped by itself (it polls for CANCELLING before every step) or after ``cancel_grace_seconds`` at the latest.

Restart semantics (``start``): Jobs outlive the service. RUNNING and CANCELLING jobs whose Job exists are
watched again (re-attached, not re-created); a RUNNING job whose Job is gone goes back to QUEUED and resumes
from its last checkpoint, a CANCELLING one becomes CANCELLED, as with the local runner. ``close`` stops the
thread and leaves the Jobs running: the next start re-attaches to them. Kubernetes API errors never reach the
service's callers: the thread logs them and tries again at the next poll.

The service's ServiceAccount needs, in the runner's namespace: ``jobs`` (group ``batch``) create, get, list,
delete; ``pods`` list (for the reason a pod ended or cannot start); ``secrets`` create, update, delete (the
workers' credentials). One service per namespace: Jobs are named
after job ids, which callers may choose.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercard_service.domain.jobs import JobState
from layercard_service.errors import AlreadyExists, FailedPrecondition, Unavailable
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.kubernetes.api import DETAIL_CHARS, BatchApi, KubernetesBatchApi
from layercard_service.runners.kubernetes.manifest import (
    JOB_ID_KEY,
    SELECTOR,
    KubernetesSettings,
    job_manifest,
    job_name,
    worker_secret,
)
from layercard_service.runners.local import JobRunner, report_job_end, service_worker_command
from layercard_service.runners.worker_reports import issue_worker_token
from layercard_service.telemetry import Telemetry
from layercard_service.trainer.checkpoint_dirs import latest_step

if TYPE_CHECKING:
    from layercard_service.config import ServiceConfig

__all__ = ["KubernetesJobRunner", "job_finished", "kubernetes_runner", "trainer_threads"]

log = logging.getLogger(__name__)


def job_finished(job: dict[str, Any]) -> tuple[str, str] | None:
    """("Complete" or "Failed", the condition's reason and message) once the Job has ended; None while it runs."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            text = ": ".join(p for p in (condition.get("reason", ""), condition.get("message", "")) if p)
            return condition["type"], text
    return None


class KubernetesJobRunner(JobRunner):
    def __init__(
        self,
        store: JobStore,
        api: BatchApi,
        settings: KubernetesSettings,
        command: Callable[[str], Sequence[str]],
        *,
        data_dir: Path,
        max_concurrent: int = 1,
        poll_seconds: float = 5.0,
        cancel_grace_seconds: float = 60.0,
        start_timeout_seconds: float = 600.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store, self.api, self.settings, self.command = store, api, settings, command
        self.data_dir = data_dir  # the service's, absolute: the data volume's mount path in the trainer pods
        self.max_concurrent, self.poll_seconds = max_concurrent, poll_seconds
        self.cancel_grace_seconds, self.start_timeout_seconds = cancel_grace_seconds, start_timeout_seconds
        self.telemetry = telemetry or Telemetry()
        self.namespace = settings.namespace
        self.ranks_per_job = max(1, settings.gpus)  # torchrun's ranks, one per GPU (trainer/distributed.py)
        self._queue: deque[str] = deque()
        self._running: dict[str, str] = {}  # job id -> its Job's name: created or re-attached, not yet ended
        self._cancel_at: dict[str, float] = {}  # job id -> when its Job is deleted if it still runs
        self._since: dict[str, float] = {}  # job id -> when its Job was created or re-attached (monotonic)
        self._wake = False  # a submit or cancel came: the next round starts without waiting
        self._cond = threading.Condition()
        self._closing = False
        self._recovered = False
        self._thread: threading.Thread | None = None

    # --- interface ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._round()  # recovers at once when the API answers; the thread tries again when it does not
        self._thread = threading.Thread(target=self._loop, name="tuning-k8s-runner", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        with self._cond:
            if job_id not in self._queue and job_id not in self._running:
                self._queue.append(job_id)
                self._wake = True
                self._cond.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
                return
            self._cancel_at.setdefault(job_id, time.monotonic() + self.cancel_grace_seconds)
            self._wake = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- introspection (tests, metrics) -------------------------------------------------------------------
    @property
    def queued(self) -> list[str]:
        with self._cond:
            return list(self._queue)

    @property
    def running(self) -> list[str]:
        with self._cond:
            return list(self._running)

    # --- the loop -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._wake and not self._closing:
                    self._cond.wait(self.poll_seconds)
                if self._closing:
                    return
                self._wake = False
            self._round()

    def _round(self) -> None:
        """One pass: list the Jobs, recover (first time), settle ended Jobs and due cancels, create new Jobs."""
        try:
            listed = self._list()
            if not self._recovered:
                self._recover(listed)
                self._recovered = True
            self._settle(listed)
            self._dispatch()
        except Unavailable as exc:
            log.warning("Kubernetes API: %s; trying again in %.0f s", exc.message, self.poll_seconds)
        except Exception:  # a bug must not end the thread that every tuning job depends on
            log.exception("the Kubernetes runner's round failed; trying again in %.0f s", self.poll_seconds)

    def _list(self) -> dict[str, dict[str, Any]]:
        """This runner's Jobs by tuning job id (the annotation holds the exact id)."""
        jobs = self.api.list_jobs(self.namespace, SELECTOR)
        by_id = {}
        for job in jobs:
            job_id = ((job.get("metadata") or {}).get("annotations") or {}).get(JOB_ID_KEY)
            if job_id:
                by_id[job_id] = job
        return by_id

    def _recover(self, listed: dict[str, dict[str, Any]]) -> None:
        for job_id in self.store.ids_in([JobState.RUNNING, JobState.CANCELLING]):
            state = self.store.state(job_id)
            job = listed.get(job_id)
            if job is not None:
                with self._cond:
                    self._running[job_id] = job["metadata"]["name"]
                    self._since[job_id] = time.monotonic()
                    if state == JobState.CANCELLING:
                        self._cancel_at.setdefault(job_id, time.monotonic() + self.cancel_grace_seconds)
                log.info("re-attached to the Kubernetes Job %s", job["metadata"]["name"], extra={"job_id": job_id})
                continue
            if state == JobState.CANCELLING:
                self.store.transition(
                    job_id, [JobState.CANCELLING], JobState.CANCELLED, "cancelled while the service was stopped"
                )
                report_job_end(self.store, self.telemetry, job_id)
                continue
            step = latest_step(self.data_dir / "artifacts" / "checkpoints" / job_id)
            self.store.append_events(job_id, [], step=step)
            message = (
                f"resuming from step {step}: its Kubernetes Job was gone after a service restart"
                if step
                else "restarting from step 0 after a service restart: its Kubernetes Job was gone, no checkpoint"
            )
            self.store.transition(job_id, [JobState.RUNNING], JobState.QUEUED, message)
            log.info(message, extra={"job_id": job_id})
        with self._cond:  # every QUEUED job, oldest first: those resumed just now and those submitted meanwhile
            self._queue = deque(self.store.ids_in([JobState.QUEUED]))

    def _settle(self, listed: dict[str, dict[str, Any]]) -> None:
        with self._cond:
            running = dict(self._running)
            due = {j for j, at in self._cancel_at.items() if at <= time.monotonic()}
        for job_id, name in running.items():
            try:
                self._settle_one(job_id, name, listed.get(job_id), due)
            except Exception:  # one job's trouble (RBAC, a locked database) must not starve the others
                log.exception("settling the Kubernetes Job of %s failed; retrying next round", job_id)

    def _settle_one(self, job_id: str, name: str, job: dict[str, Any] | None, due: set[str]) -> None:
        finished = job_finished(job) if job is not None else None
        if job is None:
            self._ended(job_id, name, f"its Kubernetes Job {name} is gone")
        elif finished is not None:
            kind, why = finished
            self._ended(job_id, name, f"its Kubernetes Job {name} ended ({kind}{': ' + why if why else ''})")
        elif (job.get("metadata") or {}).get("deletionTimestamp"):
            return  # being deleted: the next rounds see it gone
        elif job_id in due:
            log.warning("the worker of %s did not stop after the cancel: deleting its Job %s", job_id, name)
            self.api.delete_job(self.namespace, name)  # the next round sees it gone: CANCELLED
        elif self._silent(job_id):
            self._check_start(job_id, name)

    def _silent(self, job_id: str) -> bool:
        """The worker has not reported in (no pid in the store) long after its Job was created."""
        with self._cond:
            since = self._since.get(job_id, time.monotonic())
        return time.monotonic() - since >= self.start_timeout_seconds and self.store.worker_pid(job_id) is None

    def _check_start(self, job_id: str, name: str) -> None:
        problem = self.api.pod_stuck(self.namespace, name)
        if not problem:
            return
        message = f"the worker cannot start: {problem}"[: DETAIL_CHARS + 200]
        active = [JobState.RUNNING, JobState.CANCELLING]
        failed = self.store.transition(
            job_id, active, JobState.FAILED, message, error_code="WORKER_START_FAILED", error_message=message
        )
        self.api.delete_job(self.namespace, name)
        self._delete_secret(name)
        with self._cond:
            self._running.pop(job_id, None)
            self._since.pop(job_id, None)
            self._cancel_at.pop(job_id, None)
        if failed:
            report_job_end(self.store, self.telemetry, job_id)

    def _ended(self, job_id: str, name: str, what: str) -> None:
        """The Job ended or vanished: settle a job the worker left RUNNING or CANCELLING, then free the slot."""
        state = self.store.state(job_id)
        if state == JobState.CANCELLING:
            self.store.transition(job_id, [JobState.CANCELLING], JobState.CANCELLED, f"cancelled: {what}")
        elif state == JobState.RUNNING:
            detail = self.api.pod_failure(self.namespace, name)
            message = f"the worker exited without finishing the job: {what}{'; ' + detail if detail else ''}"
            message = message[: DETAIL_CHARS + 200]
            self.store.transition(
                job_id, [JobState.RUNNING], JobState.FAILED, message, error_code="WORKER_DIED", error_message=message
            )
        with self._cond:
            cancelled = self._cancel_at.pop(job_id, None) is not None
            self._running.pop(job_id, None)
            self._since.pop(job_id, None)
        if cancelled:
            try:
                self.api.delete_job(self.namespace, name)  # a cancelled job leaves no Job behind
            except (Unavailable, FailedPrecondition) as exc:
                log.warning("cannot delete the Job %s of a cancelled job (its TTL will): %s", name, exc.message)
        self._delete_secret(name)
        report_job_end(self.store, self.telemetry, job_id)

    def _delete_secret(self, name: str) -> None:
        """The ended attempt's credential: useless now (the store no longer accepts it for writes), so removed."""
        try:
            self.api.delete_secret(self.namespace, name)
        except (Unavailable, FailedPrecondition) as exc:
            log.warning("cannot delete the worker credential Secret %s: %s", name, exc.message)

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                if self._closing or not self._queue or len(self._running) >= self.max_concurrent:
                    return
                job_id = self._queue.popleft()
            # QUEUED -> RUNNING before the Job exists: a cancel from now on is CANCELLING, which the worker
            # honours at its first poll.
            if not self.store.transition(job_id, [JobState.QUEUED], JobState.RUNNING, "creating its Kubernetes Job"):
                continue
            if not self._create(job_id):
                return  # the API is unavailable: the job waits at the head of the queue for the next round

    def _create(self, job_id: str) -> bool:
        """Creates the job's Job; False when it could not be and the job went back to the head of the queue."""
        name = job_name(job_id)
        try:
            if not self._create_or_attach(job_id, name):
                return self._requeue(job_id, f"a finished Kubernetes Job {name} of an earlier run was in the way")
        except Unavailable as exc:
            return self._requeue(job_id, f"Kubernetes API unavailable: {exc.message}")
        except (FailedPrecondition, Exception) as exc:  # anything else would strand the job RUNNING with no Job
            log.exception("cannot create the Kubernetes Job of %s", job_id)
            message = f"cannot create the Kubernetes Job: {getattr(exc, 'message', None) or exc!r}"
            self.store.transition(
                job_id,
                [JobState.RUNNING, JobState.CANCELLING],
                JobState.FAILED,
                message,
                error_code="WORKER_START_FAILED",
                error_message=message,
            )
            with self._cond:
                self._cancel_at.pop(job_id, None)
            report_job_end(self.store, self.telemetry, job_id)
            return True
        with self._cond:
            self._running[job_id] = name
            self._since[job_id] = time.monotonic()
        return True

    def _create_or_attach(self, job_id: str, name: str) -> bool:
        """True once the job has a running Job; False after deleting a finished one that held its name."""
        token = issue_worker_token(self.store, job_id)  # this attempt's; a worker of an earlier one is refused
        self.api.put_secret(self.namespace, worker_secret(job_id, token, self.settings))
        try:
            self.api.create_job(
                self.namespace, job_manifest(job_id, self.settings, self.command, data_dir=self.data_dir)
            )
            log.info("created the Kubernetes Job %s", name, extra={"job_id": job_id})
            return True
        except AlreadyExists:  # created by an attempt whose answer was lost, or left over from an earlier run
            # (a pod of it that started before the Secret was replaced holds the old token: refused, it exits)
            existing = self.api.read_job(self.namespace, name)
        if existing is not None and job_finished(existing) is None:
            log.info("the Kubernetes Job %s already runs: attached", name, extra={"job_id": job_id})
            return True
        self.api.delete_job(self.namespace, name)
        return False

    def _requeue(self, job_id: str, why: str) -> bool:
        if self.store.transition(job_id, [JobState.RUNNING], JobState.QUEUED, f"{why}; trying again"):
            with self._cond:
                self._queue.appendleft(job_id)
        else:  # cancelled meanwhile: no Job was made, so the cancel is complete
            self.store.transition(job_id, [JobState.CANCELLING], JobState.CANCELLED, "cancelled before its Job ran")
            self._cancel_at.pop(job_id, None)
            report_job_end(self.store, self.telemetry, job_id)
        return False


def kubernetes_runner(config: ServiceConfig, store: JobStore, telemetry: Telemetry) -> KubernetesJobRunner:
    """The runner ``job_runner = "kubernetes"`` selects, on the official client (in-cluster config or kubeconfig)."""
    settings = config.kubernetes.resolved()  # checked by ServiceConfig; the namespace: this pod's own if unset
    # The trainer pod's own CPU, not job_threads: that one sizes local workers to the service pod's cores.
    threads = trainer_threads(settings)
    command = service_worker_command(config, threads)
    return KubernetesJobRunner(
        store,
        KubernetesBatchApi(),
        settings,
        command,
        data_dir=config.data_dir,
        max_concurrent=config.max_concurrent_jobs,
        poll_seconds=settings.poll_seconds,
        telemetry=telemetry,
    )


def trainer_threads(settings: KubernetesSettings) -> int:
    """Each rank's torch threads: the pod's whole cores, shared by its ranks (one per GPU under torchrun)."""
    cores = _cores(settings.cpu_limit or settings.cpu_request)
    return max(1, cores // settings.gpus) if cores and settings.gpus > 1 else cores


def _cores(quantity: str) -> int:
    """Whole cores in a CPU quantity ("2", "1.5", "500m"), at least 1: the worker's torch threads (0: torch's)."""
    try:
        value = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    except ValueError:  # "2k" cores: valid, improbable; torch's own default is then as good a guess
        return 0
    return max(1, int(value))
