"""One learning curve: LoRA on given blocks, trained by the service's own training loop, evaluated along the way.

The run uses the tuning jobs' loop (trainer/loop.py) with a constant learning rate after warmup, so a point of the
curve is what a shorter run would have reached (a decaying schedule would tie every point to the run's length),
and with the frozen-prefix cache wherever the trainer would use it, for every placement alike.

Time has two bases. *Predicted*: the cache's building pass plus steps x the step the card's cost model prices for
the placement (one basis for every run, so machine noise and neighbouring processes cannot reorder strategies).
*Measured*: the loop's own training seconds (building pass included), reported beside.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from layercard_service.domain.jobs import Hyperparameters
from layercard_service.models.loading import load_model
from layercard_service.trainer.evaluate import evaluate
from layercard_service.trainer.loop import LoopHooks, StepReport, TrainingLoop
from layercard_service.trainer.lora import LoraSettings, attach_lora
from layercard_service.trainer.prefix_cache import PrefixCacheSettings

__all__ = ["CurveSpec", "train_curve"]

WARMUP_STEPS = 10


@dataclass(frozen=True)
class CurveSpec:
    layers: tuple[int, ...] | None  # None: every block
    learning_rate: float
    rank: int
    modules: tuple[str, ...]
    step_seconds: float  # predicted, with the cache where the trainer caches
    build_seconds: float  # predicted building pass of the cache (0: uncached)
    max_seconds: float  # predicted time the run may take
    points: int  # evaluations along the run
    batch_size: int
    seed: int

    @property
    def steps(self) -> int:
        return max(1, int((self.max_seconds - self.build_seconds) // self.step_seconds))


def train_curve(model_path, task, spec: CurveSpec, floor: float, exact_match: bool = True) -> dict:
    """Trains ``spec`` from a fresh base model; returns the curve: (step, predicted s, measured s, loss, EM)."""
    model, tokenizer = load_model(model_path)
    lora = LoraSettings(rank=spec.rank, alpha=2.0 * spec.rank, target_modules=spec.modules, layers=spec.layers)
    peft_model = attach_lora(model, lora)
    steps = spec.steps
    interval = max(1, math.ceil(steps / spec.points))
    hp = Hyperparameters(
        steps=steps,
        learning_rate=spec.learning_rate,
        schedule="constant",
        warmup_steps=min(WARMUP_STEPS, steps),
        batch_size=spec.batch_size,
        seed=spec.seed,
        checkpoint_interval=0,
    )
    loop = TrainingLoop(peft_model, tokenizer, task.train, (), hp, prefix_cache=PrefixCacheSettings())
    points: list[dict] = []

    def score(step: int) -> None:
        result = evaluate(peft_model, tokenizer, task.validation, with_exact_match=exact_match)
        peft_model.train()
        points.append(
            {
                "step": step,
                "predicted_seconds": spec.build_seconds * (step > 0) + step * spec.step_seconds,
                "measured_seconds": loop.state.train_seconds,
                "loss": result.loss,
                "content_gain_nats": floor - result.loss,
                "exact_match": result.exact_match,
            }
        )

    def on_step(report: StepReport) -> None:
        if report.step % interval == 0 or report.step == steps:
            score(report.step)

    with torch.no_grad():
        base = evaluate(peft_model, tokenizer, task.validation, with_exact_match=False)  # B = 0: the base model
    loop.run(steps, LoopHooks(on_step=on_step))
    cache = loop.prefix_report
    return {
        "layers": list(spec.layers) if spec.layers is not None else "all",
        "learning_rate": spec.learning_rate,
        "steps": steps,
        "step_seconds_predicted": spec.step_seconds,
        "step_seconds_measured": statistics.median(loop.state.step_seconds[2:] or loop.state.step_seconds),
        "cache": cache.message() if cache is not None else "",
        "base_loss": base.loss,
        "points": points,
    }
