"""The training loop on builtin:tiny in 1 process or N (spawned, gloo on 127.0.0.1): the data-parallel tests' runs,
and ``ddp_max_param_diff`` for the benchmark (``bench/`` imports tests/support as ``support``).

Each rank writes what it saw (its adapter, the losses it reported, checkpoints) to ``<workdir>/<scenario>-rank<r>.pt``;
``run_ranks`` returns those, in rank order. One process runs in the caller's process, N in fresh ones (spawn), one
torch thread each. Scenarios:
- ``train``: ``steps`` steps from scratch;
- ``worker``: the tuning worker itself (``run_job`` on rank 0, ``follow_job`` on the others) on a job of a real job
  store in ``workdir`` (``run_worker_ranks``), each rank reaching the store in-process; a rank may be made to fail;
- ``resume``: the run straight through, then the same run stopped after ``stop_after`` (by rank 0 alone, as the
  cancel poll would), then a fresh loop that resumes from its checkpoint and finishes (all on the same ranks).
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TinyRun", "ddp_max_param_diff", "max_abs_diff", "run_ranks", "run_worker_ranks"]


@dataclass(frozen=True)
class TinyRun:
    steps: int = 4
    batch_size: int = 8  # the global batch: each of N ranks trains on batch_size / N of it
    layers: tuple[int, ...] = (5, 6, 7)
    dropout: float = 0.0  # 0: N processes match one bit for bit up to float order; else per-rank masks
    learning_rate: float = 3e-3
    checkpoint_interval: int = 0
    eval_interval: int = 0
    stop_after: int = 0  # resume scenario: rank 0 asks to stop once this step is done
    examples: int = 64
    task: str = "builtin:lexicon"  # completions of several lengths: the shards' label tokens differ
    validation: int = 6


def _loop(run: TinyRun, dp: Any, checkpoint_root: Path | None):
    import torch

    from layercard_service.data.tasks import get_task
    from layercard_service.domain.jobs import Hyperparameters
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model
    from layercard_service.trainer.loop import TrainingLoop
    from layercard_service.trainer.lora import LoraSettings, attach_lora

    task = get_task(run.task)
    hp = Hyperparameters(
        steps=run.steps,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        warmup_steps=1,
        max_seq_len=64,
        checkpoint_interval=run.checkpoint_interval,
        eval_interval=run.eval_interval,
    )
    model, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    torch.manual_seed(hp.seed)  # the adapter's initialisation, as the worker does
    peft_model = attach_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=run.dropout, layers=run.layers))
    validation = task.validation[: run.validation]
    return TrainingLoop(peft_model, tokenizer, task.train[: run.examples], validation, hp, checkpoint_root, dp)


def _adapter(loop: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in loop.named.items()}


def _train(run: TinyRun, dp: Any, workdir: Path) -> dict[str, Any]:
    from layercard_service.trainer.loop import LoopHooks

    loop = _loop(run, dp, None)
    losses, evals = [], []
    loop.run(run.steps, LoopHooks(on_step=lambda r: losses.append(r.loss), on_eval=lambda e: evals.append(asdict(e))))
    return {"adapter": _adapter(loop), "losses": losses, "evals": evals, "step": loop.state.step}


def _resume(run: TinyRun, dp: Any, workdir: Path) -> dict[str, Any]:
    from layercard_service.trainer.loop import LoopHooks

    straight = _loop(run, dp, None)
    straight_losses: list[float] = []
    straight.run(run.steps, LoopHooks(on_step=lambda r: straight_losses.append(r.loss)))

    root = workdir / "checkpoints"
    first = _loop(run, dp, root)
    checkpoints: list[int] = []
    stop = (lambda: first.state.step >= run.stop_after) if dp.is_main else (lambda: False)
    stopped = first.run(run.steps, LoopHooks(should_stop=stop, on_checkpoint=lambda s, p: checkpoints.append(s)))

    resumed = _loop(run, dp, root)  # a fresh process would build exactly this
    resumed_from = resumed.resume()
    resumed_losses: list[float] = []
    resumed.run(run.steps, LoopHooks(on_step=lambda r: resumed_losses.append(r.loss)))
    return {
        "straight": _adapter(straight),
        "straight_losses": straight_losses,
        "stopped": (stopped.reason, stopped.state.step),
        "checkpoints": checkpoints,
        "resumed_from": resumed_from,
        "resumed": _adapter(resumed),
        "resumed_losses": resumed_losses,
    }


@dataclass(frozen=True)
class WorkerRun:
    job_id: str
    fail_rank: int = -1  # this rank's training step raises at step 2
    max_lora_rank: int = 16


def _worker(run: WorkerRun, dp: Any, workdir: Path) -> dict[str, Any]:
    from layercard_service.persistence.jobs import JobStore
    from layercard_service.runners.worker_reports import WorkerReports
    from layercard_service.trainer import worker
    from layercard_service.trainer.loop import TrainingLoop
    from layercard_service.trainer.reporter import InProcessChannel

    if dp.rank == run.fail_rank:
        step = TrainingLoop._step

        def failing(self: Any, *args: Any) -> Any:
            if self.state.step == 1:
                raise RuntimeError("this rank's device broke")
            return step(self, *args)

        TrainingLoop._step = failing  # type: ignore[method-assign]
    store = JobStore(workdir / "state.db")
    try:
        channel = InProcessChannel(WorkerReports(store, workdir / "artifacts", run.max_lora_rank), run.job_id)
        settings = worker.parse_args(
            ["--data-dir", str(workdir), "--job-id", run.job_id, "--service-lost-seconds", "5"]
        )
        code = worker.run_job(channel, settings, dp) if dp.is_main else worker.follow_job(channel, settings, dp)
    finally:
        store.close()
    return {"exit_code": code}


SCENARIOS = {"train": _train, "resume": _resume, "worker": _worker}


def _rank(rank: int, world_size: int, port: int, scenario: str, run: Any, workdir: str) -> None:
    """One spawned rank: torchrun's environment, then the scenario."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from layercard_service.trainer.distributed import DataParallel

    dp = DataParallel.from_env()
    dp.start()
    clean = False
    try:
        result = SCENARIOS[scenario](run, dp, Path(workdir))
        clean = result.get("exit_code", 0) == 0
    finally:
        dp.stop(clean=clean)
    torch.save(result, Path(workdir) / f"{scenario}-rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenario: str, world_size: int, workdir: Path, run: Any = None) -> list[dict[str, Any]]:
    """Runs ``scenario`` on ``world_size`` ranks; each rank's result, in rank order."""
    import torch

    run = run or TinyRun()
    workdir.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        from layercard_service.trainer.distributed import SINGLE

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [SCENARIOS[scenario](run, SINGLE, workdir)]
        finally:
            torch.set_num_threads(threads)
    from torch import multiprocessing

    args = (world_size, _free_port(), scenario, run, str(workdir))
    multiprocessing.start_processes(_rank, args=args, nprocs=world_size, join=True, start_method="spawn")
    return [torch.load(workdir / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_worker_ranks(workdir: Path, job_id: str, world_size: int = 2, fail_rank: int = -1) -> list[int]:
    """The worker on ``world_size`` ranks for a RUNNING job of ``<workdir>/state.db``; each rank's exit code."""
    run = WorkerRun(job_id, fail_rank)
    return [r["exit_code"] for r in run_ranks("worker", world_size, workdir, run)]  # type: ignore[arg-type]


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference between two adapters' tensors (same names)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def ddp_max_param_diff(workdir: Path, world_size: int = 2, run: TinyRun | None = None) -> float:
    """Max |LoRA parameter difference| after the same training on ``world_size`` processes and on one."""
    one = run_ranks("train", 1, workdir / "one", run)[0]
    many = run_ranks("train", world_size, workdir / f"ranks-{world_size}", run)
    return max(max_abs_diff(one["adapter"], rank["adapter"]) for rank in many)
