"""Data parallel on CPU (gloo, 2 spawned processes, support/ddp.py): the same global batch on 2 processes trains the
adapter 1 process trains; a checkpoint written by rank 0 resumes both ranks identically; a rank's failure is
reported with its rank; the collective decisions (stop, evaluation) are the same on every rank."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.ddp import TinyRun, max_abs_diff, run_ranks, run_worker_ranks

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.errors import InvalidArgument
from layercard_service.persistence.datasets import DatasetArtifacts
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.worker_reports import WorkerReports, issue_worker_token
from layercard_service.trainer import worker
from layercard_service.trainer.checkpoint import load_latest, restore_rng, rng_state
from layercard_service.trainer.distributed import SINGLE, DataParallel
from layercard_service.trainer.reporter import InProcessChannel

# float32 sums in another order: ~1e-7 here. Averaging the shards' own means instead of the global token mean
# (what plain DDP does) moves the weights by ~1e-2 on these shards of unequal completion lengths.
TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    run = TinyRun(steps=4, batch_size=8, eval_interval=2, validation=5)  # 5: the ranks score 3 and 2 examples
    one = run_ranks("train", 1, tmp_path / "one", run)[0]
    two = run_ranks("train", 2, tmp_path / "two", run)
    for rank in two:
        assert max_abs_diff(one["adapter"], rank["adapter"]) < TOLERANCE
        assert rank["losses"] == pytest.approx(one["losses"], abs=1e-5)  # the global batch's loss on every rank
        assert [e["step"] for e in rank["evals"]] == [2]
        assert rank["evals"][0]["examples"] == 5  # sharded, then summed: the whole validation set
        assert rank["evals"][0]["loss"] == pytest.approx(one["evals"][0]["loss"], abs=1e-5)
    assert max(float(t.abs().max()) for t in one["adapter"].values()) > 100 * TOLERANCE  # it did train


def test_a_checkpoint_resumes_both_ranks_as_if_never_stopped(tmp_path):
    # Dropout on: each rank's own RNG state must come back from the checkpoint rank 0 wrote.
    run = TinyRun(steps=6, checkpoint_interval=3, stop_after=4, dropout=0.1)
    ranks = run_ranks("resume", 2, tmp_path, run)
    for rank in ranks:
        assert rank["stopped"] == ("stopped", 4)  # rank 0 alone asked; both stopped at the same step
        assert rank["resumed_from"] == 3
        assert max_abs_diff(rank["straight"], rank["resumed"]) < 1e-6
        assert rank["resumed_losses"] == pytest.approx(rank["straight_losses"][3:], abs=1e-6)
    assert [r["checkpoints"] for r in ranks] == [[3], [3]]  # rank 0 wrote it; the worker reports it on rank 0 only
    saved = load_latest(tmp_path / "checkpoints")
    assert saved is not None and saved.step == 3
    states = saved.rng["ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # masks differ by rank


def test_a_global_batch_smaller_than_the_world_is_refused():
    with pytest.raises(InvalidArgument) as caught:
        DataParallel(rank=0, world_size=4).check_batch(2)
    assert caught.value.violations[0].field == "hyperparameters.batch_size"


def test_shards_cover_the_global_batch_in_order():
    batch = list(range(7))
    shards = [DataParallel(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert SINGLE.shard(batch) == batch


def test_torchrun_environment_is_read_and_checked():
    assert DataParallel.from_env({}) == SINGLE
    assert DataParallel.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DataParallel(1, 2, 1)
    with pytest.raises(InvalidArgument):
        DataParallel.from_env({"RANK": "2", "WORLD_SIZE": "2"})


# --- the worker: rank 0 reads the job and reports, the others follow --------------------------------------------
TRAIN = "".join(json.dumps({"prompt": f"say {i}", "completion": f" {i * 7919}"}) + "\n" for i in range(24)).encode()


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "state.db")
    DatasetArtifacts(tmp_path / "artifacts").put(TRAIN)  # as CreateTuningJob stores inline data
    yield store
    store.close()


def _job(store: JobStore, job_id: str, adapter_id: str) -> None:
    data = DatasetRequest(inline_sha256=hashlib.sha256(TRAIN).hexdigest(), inline_size_bytes=len(TRAIN))
    spec = JobSpec(
        model="builtin:tiny",
        training_data=data,
        validation_data=data,  # base and final evaluation, sharded over the ranks
        placement=PlacementSpec(layers=(6, 7), rank=4, alpha=8.0, dropout=0.0),
        hyperparameters=Hyperparameters(steps=3, batch_size=8, max_seq_len=32, checkpoint_interval=2),
        adapter_id=adapter_id,
    )
    store.create(job_id, None, spec, spec.hyperparameters.steps)
    store.transition(job_id, [JobState.QUEUED], JobState.RUNNING)
    issue_worker_token(store, job_id)


def _published(tmp_path, adapter_id: str) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / "artifacts" / "adapters" / adapter_id / "1" / "adapter_model.safetensors")


def test_the_worker_on_two_ranks_publishes_the_adapter_one_process_publishes(store, tmp_path):
    _job(store, "job-one", "one")
    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-one"])
    with torch.random.fork_rng():
        channel = InProcessChannel(WorkerReports(store, tmp_path / "artifacts", 16), "job-one")
        assert worker.run_job(channel, settings) == 0
    _job(store, "job-two", "two")
    assert run_worker_ranks(tmp_path, "job-two") == [0, 0]
    one, two = store.get("job-one"), store.get("job-two")
    assert two.state == JobState.SUCCEEDED, two.error_message
    assert max_abs_diff(_published(tmp_path, "one"), _published(tmp_path, "two")) < TOLERANCE
    assert two.result.final_eval.examples == one.result.final_eval.examples == 24
    assert two.result.final_eval.loss == pytest.approx(one.result.final_eval.loss, abs=1e-4)
    kinds = [e.kind for e in store.events_after("job-two", 0)]
    assert kinds.count("step") == 3 and kinds.count("checkpoint") == 1  # reported once: by rank 0 alone


def test_when_rank_0_has_nothing_to_train_the_others_leave_too(store, tmp_path):
    _job(store, "job-two", "two")
    store.transition("job-two", [JobState.RUNNING], JobState.CANCELLING)  # cancelled before its worker started
    assert run_worker_ranks(tmp_path, "job-two") == [0, 0]  # rank 1 was told there is no job, and did not wait
    assert store.get("job-two").state == JobState.CANCELLED


@pytest.mark.parametrize(("failing", "prefix"), [(1, "rank 1 of 2: "), (0, "")])
def test_a_failure_on_any_rank_fails_the_job_naming_that_rank(store, tmp_path, failing, prefix):
    _job(store, "job-two", "two")
    codes = run_worker_ranks(tmp_path, "job-two", fail_rank=failing)
    job = store.get("job-two")
    assert job.state == JobState.FAILED and job.error_code == "INTERNAL"
    assert job.error_message.startswith(f"{prefix}RuntimeError: this rank's device broke")
    # The failing rank reported and left (nonzero, so torchrun stops the rest); the other, waiting in the step's
    # collective, saw its peer go and reported nothing.
    expected = [worker.EXIT_PEER_LOST, worker.EXIT_PEER_LOST]
    expected[failing] = worker.EXIT_RANK_FAILED
    assert codes == expected
    assert not (tmp_path / "artifacts" / "adapters" / "two").exists()


def test_a_single_process_worker_imports_no_torch_before_it_has_a_job():
    # The worker checks its job before the heavy imports (a worker with nothing to do exits fast); the
    # data-parallel layer it now starts through must keep that true for the plain, single-process start.
    code = (
        "import sys\n"
        "from layercard_service.trainer import worker\n"
        "from layercard_service.trainer.distributed import DataParallel\n"
        "dp = DataParallel.from_env({})\n"
        "dp.start(); dp.device(); dp.stop()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_resuming_with_another_world_size_gives_each_rank_its_own_masks():
    torch.manual_seed(7)
    saved = rng_state()  # a one-process checkpoint's
    expected = torch.rand(4)
    draws = []
    for rank in range(2):
        restore_rng(saved, rank, world_size=2)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], expected)  # rank 0 continues the saved generator
    assert not torch.equal(draws[1], draws[0])  # rank 1 does not repeat rank 0's dropout masks
    restore_rng({**saved, "ranks": [saved, rng_state()]}, 0, world_size=1)  # and back to one process
    assert torch.equal(torch.rand(4), expected)
