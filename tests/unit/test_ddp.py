"""Data parallel on CPU (gloo, 2 spawned processes, support/ddp.py): the same global batch on 2 processes trains the
adapter 1 process trains; a checkpoint written by rank 0 resumes both ranks identically; a rank's failure is
reported with its rank; the collective decisions (stop, evaluation) are the same on every rank."""

from __future__ import annotations

import pytest
import torch
from support.ddp import TinyRun, max_abs_diff, run_ranks

from layercard_service.errors import InvalidArgument
from layercard_service.trainer.checkpoint import load_latest
from layercard_service.trainer.distributed import SINGLE, DataParallel

# float32 sums in another order: ~1e-7 here. Averaging the shards' own means instead of the global token mean
# (what plain DDP does) moves the weights by ~1e-2 on these shards of unequal completion lengths.
TOLERANCE = 1e-5


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
