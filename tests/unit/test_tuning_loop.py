"""The training loop of tuning jobs on the built-in model: schedules, resume-identical checkpoints, cancel,
early stopping, the measured cost basis, and the vLLM compatibility check of published adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

from layercard_service.data.tasks import get_task
from layercard_service.domain.jobs import EvalSummary, Hyperparameters
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.trainer.artifact import stage_adapter, vllm_problems
from layercard_service.trainer.checkpoint import latest_step, load_latest
from layercard_service.trainer.loop import LoopHooks, TrainingLoop
from layercard_service.trainer.lora import LoraSettings, attach_lora
from layercard_service.trainer.schedule import lr_factor

TASK = get_task("builtin:cipher")
TRAIN, VALIDATION = TASK.train[:256], TASK.validation[:16]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loop(hp: Hyperparameters, checkpoint_root=None, layers=(5, 6, 7), dropout=0.1) -> TrainingLoop:
    model, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    torch.manual_seed(hp.seed)  # the adapter's initialisation, as the worker does
    peft_model = attach_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=dropout, layers=layers))
    return TrainingLoop(peft_model, tokenizer, TRAIN, VALIDATION, hp, checkpoint_root)


def _adapter(loop: TrainingLoop) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in loop.named.items()}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ],
)
def test_schedules_warm_up_then_decay(schedule, expected):
    # 2 warmup steps, then decay over the remaining 4; the last step still learns (zero is reached after it).
    factors = [lr_factor(schedule, step, 6, 2) for step in range(6)]
    assert factors == pytest.approx(expected)


def test_unknown_schedule_is_refused():
    with pytest.raises(InvalidArgument):
        lr_factor("exponential", 0, 10, 0)


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    hp = Hyperparameters(
        steps=6, batch_size=8, learning_rate=3e-3, warmup_steps=1, checkpoint_interval=3, max_seq_len=64
    )
    straight = _loop(hp)
    losses = []
    straight.run(6, LoopHooks(on_step=lambda r: losses.append(r.loss)))

    first = _loop(hp, tmp_path / "ckpt")
    checkpoints = []
    first.run(6, LoopHooks(should_stop=lambda: first.state.step >= 4, on_checkpoint=lambda s, p: checkpoints.append(s)))
    assert checkpoints == [3] and latest_step(tmp_path / "ckpt") == 3

    resumed = _loop(hp, tmp_path / "ckpt")  # a fresh process would build exactly this
    assert resumed.resume() == 3
    after = []
    resumed.run(6, LoopHooks(on_step=lambda r: after.append((r.step, r.loss))))
    assert [s for s, _ in after] == [4, 5, 6]
    assert [loss for _, loss in after] == losses[3:]  # same batches, dropout masks and optimizer moments
    for name, weight in _adapter(straight).items():
        torch.testing.assert_close(_adapter(resumed)[name], weight, rtol=0, atol=0)


def test_an_unfinished_checkpoint_is_ignored_and_a_broken_one_falls_back(tmp_path):
    hp = Hyperparameters(steps=4, batch_size=8, checkpoint_interval=2, max_seq_len=64)
    loop = _loop(hp, tmp_path / "ckpt")
    loop.run(4)
    (tmp_path / "ckpt" / ".tmp-crashed").mkdir()  # what a crash mid-write leaves
    (tmp_path / "ckpt" / "step-9").mkdir()  # no state.json: never completed
    assert latest_step(tmp_path / "ckpt") == 2
    (tmp_path / "ckpt" / "step-2" / "adapter.pt").write_bytes(b"garbage")
    with pytest.raises(FailedPrecondition) as caught:
        load_latest(tmp_path / "ckpt")
    assert caught.value.reason == "RESUME_FAILED"


def test_should_stop_ends_before_the_next_step():
    loop = _loop(Hyperparameters(steps=50, batch_size=8, max_seq_len=64), dropout=0.0)
    outcome = loop.run(50, LoopHooks(should_stop=lambda: loop.state.step >= 2))
    assert outcome.reason == "stopped" and loop.state.step == 2


def _scripted_evals(loop: TrainingLoop, losses: list[float]) -> list[EvalSummary]:
    """Replaces the loop's evaluation with a fixed loss sequence: early stopping is then independent of how
    a CPU rounds the training math."""
    seen: list[EvalSummary] = []

    def evaluate() -> EvalSummary:
        seen.append(EvalSummary(loop.state.step, losses[len(seen)], 0.0, len(VALIDATION)))
        return seen[-1]

    loop.evaluate = evaluate
    return seen


def test_early_stopping_after_patience_evaluations_without_improvement():
    hp = Hyperparameters(steps=40, batch_size=8, eval_interval=1, early_stopping_patience=2, max_seq_len=64)
    loop = _loop(hp, dropout=0.0)
    # Moves far below the minimum delta (1e-4; 1e-3 relative) are noise, not improvement.
    evals = _scripted_evals(loop, [2.0, 2.0 - 1e-6, 2.0 - 1e-5, 1.0])
    outcome = loop.run(40)
    assert outcome.reason == "early_stopped" and len(evals) == 3 and loop.state.step == 3
    assert loop.state.best_loss == 2.0


def test_an_improvement_beyond_the_minimum_delta_resets_patience():
    hp = Hyperparameters(
        steps=40,
        batch_size=8,
        eval_interval=1,
        early_stopping_patience=2,
        max_seq_len=64,
        early_stopping_min_delta=0.0,
        early_stopping_min_delta_rel=0.01,
    )
    loop = _loop(hp, dropout=0.0)
    # 100 -> 99.5 is within 1% of the best; 98.5 is beyond it and restarts the count; then two stalls.
    evals = _scripted_evals(loop, [100.0, 99.5, 98.5, 98.0, 98.4, 50.0])
    outcome = loop.run(40)
    assert outcome.reason == "early_stopped" and len(evals) == 5 and loop.state.best_loss == 98.5


@pytest.mark.parametrize("name", ["early_stopping_min_delta", "early_stopping_min_delta_rel"])
@pytest.mark.parametrize("value", [-1e-3, math.nan, math.inf])
def test_a_bad_minimum_delta_is_refused(name, value):
    with pytest.raises(InvalidArgument) as caught:
        Hyperparameters(**{name: value})
    assert name in str(caught.value)


def test_too_few_examples_for_the_batch_is_a_dataset_error():
    model, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    peft_model = attach_lora(model, LoraSettings(rank=4, layers=(7,)))
    with pytest.raises(InvalidArgument) as caught:
        TrainingLoop(peft_model, tokenizer, TRAIN[:4], (), Hyperparameters(batch_size=8))
    assert caught.value.reason == "INVALID_DATASET"


def test_cost_basis_counts_only_activations_from_the_lowest_adapted_layer():
    hp = Hyperparameters(steps=3, batch_size=8, max_seq_len=64)
    high, low = _loop(hp, layers=(7,), dropout=0.0), _loop(hp, layers=(0,), dropout=0.0)
    high.run(3)
    low.run(3)
    assert 0 < high.state.peak_saved_bytes < low.state.peak_saved_bytes  # backward stops at the lowest layer
    assert high.measured_peak_memory_bytes > high.state.peak_saved_bytes + 4 * high.adapter_bytes
    outcome_seconds = sorted(high.state.step_seconds[2:])
    assert outcome_seconds and all(s > 0 for s in outcome_seconds)


def test_vllm_compatibility_rules():
    ok = {"r": 8, "bias": "none", "use_dora": False, "modules_to_save": None, "peft_type": "LORA"}
    assert vllm_problems(ok, 16) == []
    assert "rank 32" in vllm_problems({**ok, "r": 32}, 16)[0]
    assert "modules_to_save" in vllm_problems({**ok, "modules_to_save": ["lm_head"]}, 16)[0]
    assert "DoRA" in vllm_problems({**ok, "use_dora": True}, 16)[0]
    assert "bias" in vllm_problems({**ok, "bias": "all"}, 16)[0]


def test_an_incompatible_adapter_is_refused_and_leaves_nothing(tmp_path):
    model, _ = load_model(builtin_model_path("tiny"), "cpu")
    peft_model = attach_lora(model, LoraSettings(rank=8, layers=(7,)))
    with pytest.raises(FailedPrecondition) as caught:
        stage_adapter(peft_model, tmp_path, "bot", "job-a", max_rank=4)
    assert caught.value.reason == "ADAPTER_INCOMPATIBLE"
    assert list((tmp_path / "adapters" / "bot").iterdir()) == []
    staged = stage_adapter(peft_model, tmp_path, "bot", "job-a", max_rank=8)
    config = json.loads((staged.tmp / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [7] and config["r"] == 8
    staged.discard()
