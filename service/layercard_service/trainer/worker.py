"""The tuning worker: one process per job, ``python -m layercard_service.trainer.worker --data-dir D --job-id J
--service-address HOST:PORT`` with the attempt's credential in ``LAYERCARD_WORKER_TOKEN``.

It never opens the service's database: it reads its job's spec through the service's internal API, trains, and
reports progress, events and its end back the same way (trainer/reporter.py: buffered, retried with backoff while
the service is away). It reads and writes only files under the data dir's ``artifacts/`` (datasets,
checkpoints, the staged adapter). The runner marks the job RUNNING before starting it.
Under ``torchrun`` (the Kubernetes runner's multi-GPU launch) the ranks train the job data-parallel
(trainer/distributed.py): rank 0 reads the job and hands it to the others, and only rank 0 reports (events,
checkpoints, the adapter). A rank that fails reports its own error, prefixed with its rank, and exits
EXIT_RANK_FAILED so that torchrun stops the others; a rank whose peer vanished exits EXIT_PEER_LOST without a
report, and the runner settles the job (WORKER_DIED, or a resume after an eviction).

Exit paths, and what the job's state becomes:
- finished: the adapter is staged, and the service publishes it as a new version and marks the job SUCCEEDED
  (one transaction, on the service's side);
- the service asked to cancel (state CANCELLING, polled before every step): CANCELLED;
- a known problem (bad dataset, bad layers, unloadable model or checkpoint): FAILED with the error's reason;
- anything else: FAILED with INTERNAL, the exception's type and message;
- SIGTERM (the service is shutting down): buffered events are flushed (for a few seconds at most), the state
  stays RUNNING, and the next service start resumes the job from its last checkpoint;
- the service stays unreachable past ``--service-lost-seconds``: exit EXIT_SERVICE_LOST, the state stays RUNNING
  and the service's restart recovery resumes the job; a refused credential (a newer attempt holds the job):
  exit EXIT_CREDENTIAL_REFUSED;
- the data dir's disk is full: FAILED with DISK_FULL if that write still goes through, else the worker exits
  with EXIT_DISK_FULL and the runner records FAILED with DISK_FULL once the disk takes it (the service answers
  a write it cannot make with RESOURCE_EXHAUSTED, reason DISK_FULL, which the worker treats as its own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from layercard_service.domain.jobs import EvalSummary, JobState
from layercard_service.errors import InvalidArgument, LayercardError, NotFound
from layercard_service.persistence.jobs import NewEvent
from layercard_service.persistence.store import DISK_FULL, is_disk_full
from layercard_service.runners.worker_reports import (
    EXIT_CREDENTIAL_REFUSED,
    EXIT_DISK_FULL,
    EXIT_SERVICE_LOST,
    TOKEN_ENV,
    Finish,
    WorkerJob,
)
from layercard_service.trainer.checkpoint_dirs import latest_step
from layercard_service.trainer.distributed import SINGLE, DataParallel, PeerLost
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES
from layercard_service.trainer.reporter import CredentialRefused, GrpcChannel, JobChannel, Reporter, ServiceLost

__all__ = [
    "EXIT_CREDENTIAL_REFUSED",
    "EXIT_DISK_FULL",
    "EXIT_PEER_LOST",
    "EXIT_RANK_FAILED",
    "EXIT_SERVICE_LOST",
    "EXIT_TERMINATED",
    "WorkerSettings",
    "follow_job",
    "main",
    "run_job",
]

log = logging.getLogger("layercard_service.trainer.worker")

FLUSH_INTERVAL_SECONDS = 0.2  # step events are buffered: at most ~5 reports a second
TERMINATE_FLUSH_SECONDS = 5.0  # on SIGTERM, how long buffered events may wait for the service
EXIT_TERMINATED = 143
EXIT_RANK_FAILED = 1  # data-parallel: this rank reported the job FAILED; torchrun then stops the other ranks
EXIT_PEER_LOST = 70  # data-parallel: another rank vanished mid-collective; nothing reported, the runner settles it
LOW_SPACE_BYTES = 1 << 20  # an unexpected error with less free than this on the data dir's disk is a full disk


class Terminated(BaseException):
    """SIGTERM from the runner; a BaseException so that no ``except Exception`` turns it into a failure."""


class WorkerSettings(argparse.Namespace):
    data_dir: Path
    job_id: str
    model_roots: tuple[Path, ...]
    dataset_roots: tuple[Path, ...]
    max_lora_rank: int
    threads: int
    service_address: str
    service_ca_file: Path | None
    service_server_name: str
    service_lost_seconds: float
    prefix_cache_memory_bytes: int


UNREPORTED_FILE = "unreported_events.json"  # beside a checkpoint: its run's events the service had not recorded


def _unreported_json(events: list[NewEvent]) -> str:
    """A worker that loses the service and is then killed would lose its buffered events: they are kept with the
    checkpoint, and the run that resumes from it reports those the service still lacks."""
    return json.dumps([{"kind": e.kind, "payload": e.payload, "message": e.message, "time": e.time} for e in events])


def _keep_unreported(checkpoint: Path, events: list[NewEvent]) -> None:
    tmp = checkpoint / f".{UNREPORTED_FILE}.tmp"
    tmp.write_text(_unreported_json(events))
    os.replace(tmp, checkpoint / UNREPORTED_FILE)


def _keep_unreported_at_latest(root: Path, events: list[NewEvent]) -> None:
    """On a termination the service did not hear of: the undelivered events join the newest checkpoint's (those
    after it are dropped on resume: that run repeats their steps and reports them)."""
    step = latest_step(root)
    if not step or not events:
        return
    checkpoint = root / f"step-{step}"
    kept, seen = [], set()
    for event in [*_unreported_at(checkpoint), *events]:
        key = (event.kind, event.payload.get("step"), event.message)
        if key not in seen:
            seen.add(key)
            kept.append(event)
    _keep_unreported(checkpoint, kept)


def _unreported_at(checkpoint: Path) -> list[NewEvent]:
    try:
        rows = json.loads((checkpoint / UNREPORTED_FILE).read_text())
    except (OSError, ValueError):
        return []  # none kept (every event was recorded), or unreadable: nothing to add
    return [NewEvent(r["kind"], r["payload"], r.get("message", ""), r.get("time")) for r in rows]


def _eval_event(summary: EvalSummary, message: str) -> NewEvent:
    payload = {"step": summary.step, "loss": summary.loss, "exact_match": summary.exact_match}
    return NewEvent("eval", {**payload, "examples": summary.examples}, message)


class _Handoff:
    """Rank 0 hands the job to the other ranks exactly once: the job to train, or None (nothing to train)."""

    def __init__(self, dp: DataParallel) -> None:
        self.dp, self.done = dp, not dp.enabled

    def give(self, job: WorkerJob | None) -> None:
        if not self.done:
            self.done = True
            self.dp.broadcast(job)


def run_job(channel: JobChannel, settings: WorkerSettings, dp: DataParallel = SINGLE) -> int:
    """Rank 0's (or the only process's) run of the job: it reads the job, trains, reports and ends it."""
    reporter = Reporter(channel, interval=FLUSH_INTERVAL_SECONDS, lost_after=settings.service_lost_seconds)
    handoff = _Handoff(dp)
    try:
        try:
            return _run_job(reporter, settings, handoff)
        finally:
            handoff.give(None)  # followers still waiting learn there is nothing to train (no-op once handed)
    except PeerLost as exc:
        log.error("job %s: %s", settings.job_id, exc)
        return EXIT_PEER_LOST
    except ServiceLost as exc:
        log.error("job %s: %s; it stays RUNNING and resumes when the service recovers it", settings.job_id, exc)
        return EXIT_SERVICE_LOST
    except CredentialRefused as exc:
        log.error(
            "job %s: the service refused this worker's credential (%s): another attempt runs it", settings.job_id, exc
        )
        return EXIT_CREDENTIAL_REFUSED
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        log.error("job %s: the data dir's disk is full and the job's end cannot be written: %s", settings.job_id, exc)
        return EXIT_DISK_FULL


def _run_job(reporter: Reporter, settings: WorkerSettings, handoff: _Handoff) -> int:
    job_id = settings.job_id
    try:
        job = reporter.get_job()
    except NotFound:
        log.error("no such job %s", job_id)
        return 2
    if job.state == JobState.CANCELLING:
        reporter.finish(Finish(JobState.CANCELLED, "cancelled before training started"))
        return 0
    if job.state != JobState.RUNNING:
        log.warning("job %s is %s, not RUNNING: nothing to do", job_id, job.state.value)
        return 0
    reporter.report_pid(os.getpid())
    failed = EXIT_RANK_FAILED if handoff.dp.enabled else 0  # the other ranks must not wait on this one
    try:
        handoff.give(job)
        _train(reporter, job_id, job, settings, handoff.dp)
    except Terminated:
        if not reporter.flush(within=TERMINATE_FLUSH_SECONDS):
            log.warning("terminated with %d events the service did not take", reporter.pending)
            _keep_unreported_at_latest(settings.data_dir / "artifacts" / "checkpoints" / job_id, reporter.unreported())
        log.info("terminated; job %s stays RUNNING and resumes from its last checkpoint", job_id)
        return EXIT_TERMINATED
    except LayercardError as exc:
        log.error("job %s failed: %s", job_id, exc.message)
        _fail(reporter, exc.reason, exc.message)
        return failed
    except Exception as exc:  # a bug or an environment problem: reported, never silent
        log.exception("job %s failed", job_id)
        if _disk_full(exc, settings.data_dir):  # torch and safetensors say "write failed", not ENOSPC
            message = f"the data dir's disk is full: {type(exc).__name__}: {exc}"[:2000]
            _fail(reporter, DISK_FULL, message)
            return failed
        _fail(reporter, "INTERNAL", f"{type(exc).__name__}: {exc}"[:2000])
        return failed
    return 0


def follow_job(channel: JobChannel, settings: WorkerSettings, dp: DataParallel) -> int:
    """A rank other than 0: trains its shard of the job rank 0 hands it and reports nothing but its own failure."""
    try:
        job = dp.broadcast(None)
        if job is None:
            return 0
        _train(None, settings.job_id, job, settings, dp)
        return 0
    except PeerLost as exc:
        log.error("job %s: %s", settings.job_id, exc)
        return EXIT_PEER_LOST
    except LayercardError as exc:
        code, message = exc.reason, exc.message
    except Exception as exc:  # a bug or an environment problem (this rank's GPU out of memory): reported, named
        log.exception("job %s failed on rank %d", settings.job_id, dp.rank)
        code, message = "INTERNAL", f"{type(exc).__name__}: {exc}"
    message = f"rank {dp.rank} of {dp.world_size}: {message}"[:2000]
    log.error("job %s failed: %s", settings.job_id, message)
    reporter = Reporter(channel, interval=FLUSH_INTERVAL_SECONDS, lost_after=settings.service_lost_seconds)
    try:
        _fail(reporter, code, message)
    except (ServiceLost, CredentialRefused) as exc:  # the service or rank 0 settles the job instead
        log.error("job %s: the failure could not be reported: %s", settings.job_id, exc)
    return EXIT_RANK_FAILED


def _disk_full(exc: BaseException, data_dir: Path) -> bool:
    if is_disk_full(exc):
        return True
    try:
        return shutil.disk_usage(data_dir).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _fail(reporter: Reporter, code: str, message: str) -> None:
    reporter.finish(Finish(JobState.FAILED, message, error_code=code, error_message=message))


def _cancelled(reporter: Reporter, step: int) -> None:
    reporter.finish(Finish(JobState.CANCELLED, f"cancelled at step {step}"))


def _train(events: Reporter | None, job_id: str, job: WorkerJob, settings: WorkerSettings, dp: DataParallel) -> None:
    """Trains the job on this rank; ``events`` is rank 0's reporter (None on the ranks that follow it)."""
    # Heavy imports here, after the cheap checks: a worker that has nothing to do exits fast.
    import torch

    from layercard_service.card_engine.arch import detect_layout
    from layercard_service.data.sources import resolve_dataset, resolve_model_path
    from layercard_service.models.loading import load_model
    from layercard_service.persistence.datasets import DatasetArtifacts
    from layercard_service.trainer.artifact import stage_adapter
    from layercard_service.trainer.loop import LoopHooks, StepReport, TrainingLoop
    from layercard_service.trainer.lora import LoraSettings, attach_lora
    from layercard_service.trainer.prefix_cache import PrefixCacheReport, PrefixCacheSettings

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    spec, placement = job.spec, job.spec.placement
    artifacts = settings.data_dir / "artifacts"
    datasets = DatasetArtifacts(artifacts)  # inline data is read back from its artifact, its hash checked
    data = resolve_dataset(datasets.load(spec.training_data, "training_data"), settings.dataset_roots, "training_data")
    validation = data.validation
    if spec.validation_data is not None:
        stored = datasets.load(spec.validation_data, "validation_data")
        validation = resolve_dataset(stored, settings.dataset_roots, "validation_data").examples
    model, tokenizer = load_model(resolve_model_path(spec.model, settings.model_roots), dp.device())
    modules = placement.target_modules or detect_layout(model).module_types
    lora = LoraSettings(placement.rank, placement.alpha, placement.dropout, tuple(modules), placement.layers)
    torch.manual_seed(spec.hyperparameters.seed)  # the adapter's initialisation is part of what the seed fixes
    peft_model = attach_lora(model, lora)
    checkpoints = artifacts / "checkpoints" / job_id
    cache = PrefixCacheSettings(max_memory_bytes=settings.prefix_cache_memory_bytes)
    loop = TrainingLoop(
        peft_model, tokenizer, data.examples, validation, spec.hyperparameters, checkpoints, dp, prefix_cache=cache
    )
    resumed = loop.resume()
    if events is None:  # a follower: the same training, collectives and all, with nothing reported
        loop.base_eval()
        if loop.run(job.total_steps).reason != "stopped":
            loop.final_eval()
        step = loop.state.step
        log.info("job %s: rank %d of %d trained its shards up to step %d", job_id, dp.rank, dp.world_size, step)
        return
    recorded = job.recorded_steps

    def fresh(kind: str, step: int) -> bool:
        # Steps between the checkpoint and a crash were reported by the run that crashed; resuming repeats
        # them (identically), so the history keeps the first report of each step and a watcher sees it once.
        return step > recorded.get(kind, -1)

    if resumed:
        assert loop.checkpoint_root is not None
        for kept in _unreported_at(loop.checkpoint_root / f"step-{resumed}"):
            step = kept.payload.get("step")
            # Only up to the checkpoint: the steps after it run again now and are reported as they run.
            usable = isinstance(step, int) and step <= resumed and kept.kind in ("step", "eval", "checkpoint")
            if usable and fresh(kept.kind, step):
                events.add(kept, step=step if kept.kind == "step" else None)
        events.add(NewEvent("note", {}, f"resumed from the checkpoint at step {resumed}"), step=resumed, urgent=True)
    if dp.enabled:
        batch = spec.hyperparameters.batch_size
        note = f"data-parallel on {dp.world_size} ranks: each trains its shard of every global batch of {batch}"
        events.add(NewEvent("note", {"ranks": dp.world_size}, note + "; evaluation is sharded"), urgent=True)
    base = loop.base_eval()
    if base is not None and not resumed and fresh("eval", base.step):
        events.add(_eval_event(base, "base model, adapter off"), urgent=True)

    def on_step(report: StepReport) -> None:
        if not fresh("step", report.step):
            return
        payload = {
            "step": report.step,
            "loss": report.loss,
            "learning_rate": report.learning_rate,
            "tokens_per_second": report.tokens_per_second,
            "eta_seconds": report.eta_seconds,
        }
        step_event = NewEvent("step", payload, time=time.time())  # stamped now: the writer buffers it
        events.add(step_event, step=report.step, urgent=report.step == job.total_steps)

    def on_eval(summary: EvalSummary) -> None:
        if fresh("eval", summary.step):
            events.add(_eval_event(summary, "validation"), urgent=True)

    def checkpoint_event(step: int, path: Path) -> list[NewEvent]:
        return [NewEvent("checkpoint", {"step": step, "path": str(path)})] if fresh("checkpoint", step) else []

    def checkpoint_files(step: int, path: Path) -> dict[str, str]:
        # Written inside the checkpoint before it is complete, where a kill cannot come between the two: the run
        # that resumes from it reports what this one had not delivered, the checkpoint's own event included.
        return {UNREPORTED_FILE: _unreported_json([*events.unreported(), *checkpoint_event(step, path)])}

    def on_checkpoint(step: int, path: Path) -> None:  # only once it is complete: the event says it is there
        for event in checkpoint_event(step, path):
            events.add(event, urgent=True)

    def on_prefix_cache(report: PrefixCacheReport) -> None:  # once per run: a resumed run builds it again
        events.add(NewEvent("note", {"prefix_cache": report.to_payload()}, report.message()), urgent=True)

    hooks = LoopHooks(
        should_stop=lambda: events.state() != JobState.RUNNING,
        on_step=on_step,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
        checkpoint_files=checkpoint_files,
        on_prefix_cache=on_prefix_cache,
    )
    outcome = loop.run(job.total_steps, hooks)
    if outcome.reason == "stopped":
        _cancelled(events, loop.state.step)
        return
    final = loop.final_eval(hooks)
    seconds = loop.state.train_seconds
    result_base = {
        "final_eval": final,
        "base_eval": base,
        "measured_step_seconds": outcome.measured_step_seconds,
        "predicted_step_seconds": placement.predicted_step_seconds,
        "measured_peak_memory_bytes": loop.measured_peak_memory_bytes,
        "predicted_peak_memory_bytes": placement.predicted_peak_memory_bytes,
        "training_seconds": seconds,
        "tokens_per_second": loop.state.tokens / seconds if seconds > 0 else 0.0,
    }
    staged = stage_adapter(peft_model, artifacts, spec.adapter_id, job_id, settings.max_lora_rank)

    metadata = {
        "model": spec.model,
        "placement": {**spec.to_dict()["placement"], "target_modules": list(modules)},
        "hyperparameters": spec.to_dict()["hyperparameters"],
        "steps": loop.state.step,
        "data_parallel_ranks": dp.world_size,  # measured cost is one rank's: its shard of every batch
        "stopped_early": outcome.reason == "early_stopped",
        "cost": {k: v for k, v in result_base.items() if not k.endswith("_eval")},
        "final_eval": final.__dict__ if final else None,
        "base_eval": base.__dict__ if base else None,
    }
    result = {k: (v.__dict__ if isinstance(v, EvalSummary) else v) for k, v in result_base.items()}
    message = "early stopping: no improvement" if outcome.reason == "early_stopped" else "training finished"
    finish = Finish(
        JobState.SUCCEEDED,
        message,
        staged_adapter_path=str(staged.tmp.resolve()),
        adapter_metadata=metadata,
        result=result,
    )
    applied, state, _ = events.finish(finish)  # the service publishes the version and ends the job at once
    if not applied and state != JobState.SUCCEEDED:
        staged.discard()  # cancelled during the final evaluation: honour the cancel, publish nothing
        _cancelled(events, loop.state.step)
        return
    shutil.rmtree(loop.checkpoint_root, ignore_errors=True)  # the published adapter supersedes them


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in raw.split(",") if p)


def parse_args(argv: list[str] | None = None) -> WorkerSettings:
    parser = argparse.ArgumentParser(prog="layercard-tune-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--model-roots", type=_paths, default=())
    parser.add_argument("--dataset-roots", type=_paths, default=())
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--service-address", default="", help="the service's gRPC host:port (its internal API)")
    parser.add_argument("--service-ca-file", type=Path, default=None, help="the CA that signs the service's TLS")
    parser.add_argument("--service-server-name", default="", help="the name the service's certificate holds")
    parser.add_argument(
        "--service-lost-seconds", type=float, default=300.0, help="unreachable this long: exit, the job resumes"
    )
    parser.add_argument(
        "--prefix-cache-memory-bytes",
        type=int,
        default=DEFAULT_MAX_MEMORY_BYTES,
        help="the frozen-prefix cache's bound in memory; a larger cache goes to a temporary file",
    )
    return parser.parse_args(argv, namespace=WorkerSettings())


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dp = DataParallel.from_env()  # torchrun's ranks (the Kubernetes runner's multi-GPU launch); else alone
    except InvalidArgument as exc:
        log.error("%s", exc.message)
        return 2

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    token = os.environ.get(TOKEN_ENV, "")
    if not settings.service_address or not token:
        log.error("the worker needs --service-address and its credential in %s", TOKEN_ENV)
        return 2
    if dp.is_main:  # a follower that torchrun terminates just dies: it reports nothing and writes no checkpoint
        signal.signal(signal.SIGTERM, terminate)
    channel = GrpcChannel(
        settings.service_address, token, settings.job_id, settings.service_ca_file, settings.service_server_name
    )
    code = 1
    try:
        dp.start()
        code = run_job(channel, settings, dp) if dp.is_main else follow_job(channel, settings, dp)
        return code
    finally:
        channel.close()
        try:
            dp.stop(clean=code == 0)
        except Exception as exc:  # peers gone: nothing left to tear down cleanly, and the exit code stands
            log.warning("leaving the process group: %s", exc)


if __name__ == "__main__":
    code = main()
    if code == EXIT_DISK_FULL:
        os._exit(code)  # flushing stdio into a log on the full disk at exit would turn the code into 120
    sys.exit(code)
