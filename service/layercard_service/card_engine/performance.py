"""The card's performance column: a short single-layer LoRA run per layer, scored on held-out probe batches.

For each layer ℓ, only ℓ's adapters (A and B) train, for ``steps`` Adam steps on the first half of the probe
batches; the column is the mean completion-token loss decrease on the second half, in nats (METHOD.md: the
ground truth the cheap columns are scored against). The held-out loss is also taken at a quarter, half and
three quarters of the run (``domain.cards.performance_checkpoints``): each layer's pilot learning curve, which
the planner fits (control/planning/curves.py). Beside them, one run of every layer's adapters per learning rate
of the card's grid (``rate_gains``): how the learning rate speeds or spoils a run, which the planner applies to
every set's curve to choose the rate. It is L + |grid| training runs, so it is opt-in and priced in the card's
compute time. Every run starts from the card's own adapter state (the fixed A, B = 0), which is restored
afterwards, so the other phases of the card are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from layercard_service.card_engine.probe import ADAPTER, ModuleKey
from layercard_service.domain.cards import PERFORMANCE_LEARNING_RATE, performance_checkpoints
from layercard_service.models.head import completion_loss

__all__ = ["DEFAULT_LEARNING_RATE", "layer_gains", "rate_gains", "split_batches"]

DEFAULT_LEARNING_RATE = PERFORMANCE_LEARNING_RATE


def split_batches(batches: Sequence[dict[str, torch.Tensor]]) -> tuple[list[dict], list[dict]]:
    """Train on the first half of the probe batches, score on the rest (at least one batch each)."""
    cut = max(1, len(batches) // 2)
    return list(batches[:cut]), list(batches[cut:])


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean completion-token cross-entropy of one batch, as the probe pass computes it."""
    return completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


@torch.no_grad()
def _held_out_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    losses = [float(_loss(model, batch)) for batch in batches]
    return sum(losses) / len(losses)


def _weights(lora: dict[ModuleKey, LoraLayer], layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The A and B weights of ``layers``' adapters (None: every layer's)."""
    return [
        p
        for key, layer in lora.items()
        if layers is None or key[0] in layers
        for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
    ]


def _pilots(
    peft_model: nn.Module,
    lora: dict[ModuleKey, LoraLayer],
    batches: Sequence[dict[str, torch.Tensor]],
    runs: Sequence[tuple[list[torch.Tensor], float]],
    steps: int,
    on_run: Callable[[int, int], None],
) -> list[list[float]]:
    """Per run (its parameters and learning rate), the held-out loss decrease at each checkpoint."""
    if len(batches) < 2:
        raise ValueError("the performance column needs at least two probe batches (train and held-out)")
    train, held_out = split_batches(batches)
    every = _weights(lora)
    trainable = [p.requires_grad for p in every]
    for p in every:  # only the run's parameters train, so backward stops at the lowest and no other gradient piles up
        p.requires_grad_(False)
    try:
        base = _held_out_loss(peft_model, held_out)
        gains = []
        for done, (params, learning_rate) in enumerate(runs, start=1):
            losses = _train_and_score(peft_model, params, train, held_out, steps, learning_rate)
            gains.append([base - loss for loss in losses])
            on_run(done, len(runs))
        return gains
    finally:
        for p, flag in zip(every, trainable):
            p.requires_grad_(flag)


def layer_gains(
    peft_model: nn.Module,
    lora: dict[ModuleKey, LoraLayer],
    batches: Sequence[dict[str, torch.Tensor]],
    num_layers: int,
    steps: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    on_layer: Callable[[int, int], None] = lambda done, total: None,
) -> list[list[float]]:
    """Per layer, the held-out loss decrease (nats) at each of ``performance_checkpoints(steps)`` of LoRA on that
    layer alone (the last is the column's figure); ``on_layer`` may raise (cancel)."""
    runs = [(_weights(lora, (index,)), learning_rate) for index in range(num_layers)]
    return _pilots(peft_model, lora, batches, runs, steps, on_layer)


def rate_gains(
    peft_model: nn.Module,
    lora: dict[ModuleKey, LoraLayer],
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    learning_rates: Sequence[float],
    on_run: Callable[[int, int], None] = lambda done, total: None,
) -> list[list[float]]:
    """Per learning rate, the held-out loss decrease at each checkpoint of LoRA on every layer at that rate."""
    return _pilots(peft_model, lora, batches, [(_weights(lora), rate) for rate in learning_rates], steps, on_run)


def _train_and_score(
    model: nn.Module,
    params: list[torch.Tensor],
    train: Sequence[dict[str, torch.Tensor]],
    held_out: Sequence[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float,
) -> list[float]:
    """Trains ``params`` alone, returns the held-out loss at each checkpoint, and puts ``params`` back as they were."""
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=learning_rate)
        marks, losses = set(performance_checkpoints(steps)), []
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            _loss(model, train[step % len(train)]).backward()
            optimizer.step()
            if step + 1 in marks:
                losses.append(_held_out_loss(model, held_out))
        return losses
    finally:
        with torch.no_grad():  # back to the card's state: the fixed A, B = 0
            for p, original in zip(params, saved):
                p.copy_(original)
                p.grad = None
                p.requires_grad_(False)
