"""The training core: LoRA on chosen layers of a frozen causal LM, a fixed number of AdamW steps.

Kept deliberately small and synchronous: the tuning-job runner wraps it (cancellation through
``should_stop``, progress through ``on_step``), and the benchmarks call it directly.

Placement matters for cost (METHOD.md): the base model is frozen and the embedding output does not
require grad, so autograd only builds the backward graph from the *lowest adapted block* upwards. Nothing
here calls ``enable_input_require_grads`` (peft and transformers use it for gradient checkpointing): it
would force backward through every block and erase the saving of an upper-layer placement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from layercard_service.data.encode import EncodeConfig, EncodedExample, collate, encode_examples
from layercard_service.data.jsonl import Example
from layercard_service.errors import InvalidArgument
from layercard_service.models.head import training_loss

__all__ = [
    "ALL_LINEAR_MODULES",
    "LoraSettings",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "attach_lora",
    "num_layers",
    "train_lora",
]

# The linear modules of a Llama/Qwen/Mistral block; "all linear modules" in the task's sense.
ALL_LINEAR_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument.field(name, f"must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LoraSettings:
    """What adapter to attach: rank, scaling, module types and which blocks (None = every block)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR_MODULES
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive_int("lora.rank", self.rank)
        if not self.alpha > 0:
            raise InvalidArgument.field("lora.alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument.field("lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise InvalidArgument.field("lora.target_modules", "must be a non-empty list of module names")
        if self.layers is not None:
            if not self.layers:
                raise InvalidArgument.field("lora.layers", "must not be empty (omit it for every layer)")
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise InvalidArgument.field("lora.layers", f"must be non-negative integers, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise InvalidArgument.field("lora.layers", f"must not repeat a layer, got {self.layers!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: a fixed number of steps of AdamW with linear warmup then cosine decay to zero."""

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    encode: EncodeConfig = field(default_factory=EncodeConfig)

    def __post_init__(self) -> None:
        _positive_int("train.steps", self.steps)
        _positive_int("train.batch_size", self.batch_size)
        if not self.learning_rate > 0:
            raise InvalidArgument.field("train.learning_rate", f"must be > 0, got {self.learning_rate!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise InvalidArgument.field("train.warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise InvalidArgument.field("train", "weight_decay and max_grad_norm must be >= 0")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at 0-based ``step``: linear warmup, then cosine to zero."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class StepMetrics:
    step: int  # 1-based
    loss: float  # mean completion-token loss of the batch
    learning_rate: float
    seconds: float  # wall time of this step (forward, backward, optimizer)
    tokens: int  # completion tokens in the batch


@dataclass
class TrainResult:
    steps: list[StepMetrics]
    total_seconds: float
    trainable_parameters: int
    stopped_early: bool = False

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks of a transformers causal LM (Llama-style ``config``)."""
    return int(model.config.num_hidden_layers)


def attach_lora(model: torch.nn.Module, lora: LoraSettings) -> PeftModel:
    """Freeze ``model`` and wrap it with a fresh LoRA adapter on ``lora.layers`` (every layer when None).

    peft's ``layers_to_transform`` writes the placement into the adapter config, so the saved adapter
    loads unchanged in peft and in vLLM.
    """
    n = num_layers(model)
    if lora.layers is not None and max(lora.layers) >= n:
        raise InvalidArgument.field("lora.layers", f"the model has {n} layers (0..{n - 1}), got {list(lora.layers)}")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=sorted(lora.layers) if lora.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module name the model does not have
        raise InvalidArgument.field("lora.target_modules", str(exc)) from exc


def _batches(encoded: Sequence[EncodedExample], batch_size: int, seed: int) -> Iterator[list[EncodedExample]]:
    """Endless shuffled batches: a fresh seeded permutation per epoch, so runs are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged tail
            yield [encoded[i] for i in order[start : start + batch_size]]


def train_lora(
    model: PeftModel,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the adapter of ``model`` (from :func:`attach_lora`) for ``config.steps`` steps.

    ``on_step`` is called after every step; ``should_stop`` is polled before every step and ends the
    run early (the result says so). Returns per-step loss and timing.
    """
    if len(examples) < config.batch_size:
        raise InvalidArgument.field(
            "dataset.train", f"has {len(examples)} examples, fewer than the batch size {config.batch_size}"
        )
    torch.manual_seed(config.seed)  # LoRA dropout masks
    encoded = encode_examples(tokenizer, examples, config.encode)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgument.field("lora", "the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)

    model.train()
    batches = _batches(encoded, config.batch_size, config.seed)
    steps: list[StepMetrics] = []
    stopped = False
    started = time.perf_counter()
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        t0 = time.perf_counter()
        batch = collate(next(batches), pad_id)  # input_ids, attention_mask, labels: [B, T]
        # Mean over the batch's completion tokens (labels != -100), the head computed at those positions only.
        loss = training_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        metrics = StepMetrics(
            step + 1,
            float(loss.detach()),
            lr,
            time.perf_counter() - t0,
            int((batch["labels"][:, 1:] != -100).sum()),
        )
        steps.append(metrics)
        if on_step is not None:
            on_step(metrics)
    model.eval()
    return TrainResult(
        steps=steps,
        total_seconds=time.perf_counter() - started,
        trainable_parameters=sum(p.numel() for p in params),
        stopped_early=stopped,
    )
