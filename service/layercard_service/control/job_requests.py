"""A tuning job's requested hyperparameters and adapter shape, and their checks at creation (no torch).

Unset fields are None or 0 and take the documented defaults; a bad value is INVALID_ARGUMENT with the field's
path, so a client learns of it before any worker starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layercard_service.domain.jobs import SCHEDULES, Hyperparameters
from layercard_service.errors import InvalidArgument

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_STEPS",
    "MAX_SEQ_LEN",
    "MAX_STEPS",
    "HyperparameterRequest",
    "LoraRequest",
    "hyperparameters",
]

DEFAULT_STEPS = 200
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_BATCH_SIZE = 16
MAX_STEPS = 1_000_000
MAX_SEQ_LEN = 32_768


@dataclass(frozen=True)
class LoraRequest:
    """An adapter shape as requested; None and 0 mean "not set"."""

    rank: int | None = None
    alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class HyperparameterRequest:
    """Hyperparameters as requested: unset fields are None or 0 and take the documented defaults."""

    steps: int | None = None
    epochs: float | None = None
    learning_rate: float = 0.0
    schedule: str = ""
    warmup_steps: int = 0
    batch_size: int = 0
    lora: LoraRequest | None = None
    seed: int = 0
    eval_interval: int = 0
    early_stopping_patience: int = 0
    early_stopping_min_delta: float | None = None  # None: the default
    early_stopping_min_delta_relative: float | None = None
    checkpoint_interval: int = 0
    max_seq_len: int = 0
    prefix_cache: bool | None = None  # None: the default (on wherever it is exact)


def hyperparameters(
    raw: HyperparameterRequest,
    n_train: int,
    planned_steps: int,
    has_validation: bool,
    planned_learning_rate: float = 0.0,
) -> tuple[Hyperparameters, int]:
    """The job's hyperparameters with the documented defaults filled in, and its number of steps; a bad value is
    INVALID_ARGUMENT naming its field. Unset steps and learning rate take the plan's (0: none planned)."""

    def bad(name: str, description: str) -> InvalidArgument:
        return InvalidArgument.field(f"hyperparameters.{name}", description)

    batch = raw.batch_size or DEFAULT_BATCH_SIZE
    if batch < 1:
        raise bad("batch_size", f"must be >= 1, got {raw.batch_size}")
    if batch > n_train:
        raise InvalidArgument.field(
            "training_data", f"has {n_train} examples, fewer than the batch size {batch}", reason="INVALID_DATASET"
        )
    if raw.steps is not None:
        if not 1 <= raw.steps <= MAX_STEPS:
            raise bad("steps", f"must be in 1..{MAX_STEPS}, got {raw.steps}")
        steps = raw.steps
    elif raw.epochs is not None:
        if not (math.isfinite(raw.epochs) and raw.epochs > 0):
            raise bad("epochs", f"must be a positive number, got {raw.epochs}")
        steps = math.ceil(raw.epochs * n_train / batch)
        if steps > MAX_STEPS:
            raise bad("epochs", f"{raw.epochs} epochs are {steps} steps, more than {MAX_STEPS}")
    else:
        steps = planned_steps or DEFAULT_STEPS
    lr = raw.learning_rate or planned_learning_rate or DEFAULT_LEARNING_RATE
    if not (math.isfinite(lr) and 0 < lr <= 10):
        raise bad("learning_rate", f"must be a positive number (at most 10), got {raw.learning_rate}")
    schedule = raw.schedule or "cosine"
    if schedule not in SCHEDULES:
        raise bad("schedule", f"must be one of {SCHEDULES}, got {raw.schedule!r}")
    if raw.warmup_steps < 0 or raw.warmup_steps > steps:
        raise bad("warmup_steps", f"must be in 0..{steps} (the steps), got {raw.warmup_steps}")
    warmup = raw.warmup_steps or round(0.05 * steps)
    for name in ("eval_interval", "early_stopping_patience", "checkpoint_interval", "max_seq_len"):
        if getattr(raw, name) < 0:
            raise bad(name, f"must be >= 0, got {getattr(raw, name)}")
    if raw.early_stopping_patience and not (raw.eval_interval and has_validation):
        raise bad("early_stopping_patience", "needs eval_interval and validation data")
    if raw.eval_interval and not has_validation:
        raise bad("eval_interval", "needs validation data: set validation_data")
    max_seq_len = raw.max_seq_len or 256
    if not 8 <= max_seq_len <= MAX_SEQ_LEN:
        raise bad("max_seq_len", f"must be in 8..{MAX_SEQ_LEN}, got {raw.max_seq_len}")
    if not 0 <= raw.seed < 2**63:
        raise bad("seed", f"must be in 0..2^63-1, got {raw.seed}")
    min_deltas = {}
    for name, value in (
        ("early_stopping_min_delta", raw.early_stopping_min_delta),
        ("early_stopping_min_delta_rel", raw.early_stopping_min_delta_relative),
    ):
        if value is not None:
            if not (math.isfinite(value) and value >= 0):
                raise bad(name.replace("_rel", "_relative"), f"must be a finite number >= 0, got {value}")
            min_deltas[name] = value
    hp = Hyperparameters(
        steps=steps,
        epochs=raw.epochs or 0.0,
        learning_rate=lr,
        schedule=schedule,
        warmup_steps=warmup,
        batch_size=batch,
        seed=raw.seed,
        eval_interval=raw.eval_interval,
        early_stopping_patience=raw.early_stopping_patience,
        **min_deltas,
        checkpoint_interval=raw.checkpoint_interval or 50,
        max_seq_len=max_seq_len,
        prefix_cache=True if raw.prefix_cache is None else raw.prefix_cache,
    )
    return hp, steps
