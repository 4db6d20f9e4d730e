"""The card's performance column: a short single-layer LoRA run per layer, scored on held-out probe batches.

For each layer ℓ, only ℓ's adapters (A and B) train, for ``steps`` Adam steps on the first half of the probe
batches; the column is the mean completion-token loss decrease on the second half, in nats (METHOD.md: the
ground truth the cheap columns are scored against). The held-out loss is also taken at a quarter, half and
three quarters of the run (``domain.cards.performance_checkpoints``): each layer's pilot learning curve, which
the planner fits (control/planning/curves.py). It is L training runs, so it is opt-in and priced in the
card's compute time. Every run starts from the card's own adapter state (the fixed A, B = 0), which is restored
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

__all__ = ["DEFAULT_LEARNING_RATE", "layer_gains", "split_batches"]

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
    if len(batches) < 2:
        raise ValueError("the performance column needs at least two probe batches (train and held-out)")
    train, held_out = split_batches(batches)
    every = [p for layer in lora.values() for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
    trainable = [p.requires_grad for p in every]
    for p in every:  # only the layer under test trains, so backward stops at it and no other gradient piles up
        p.requires_grad_(False)
    try:
        base = _held_out_loss(peft_model, held_out)
        gains = []
        for index in range(num_layers):
            params = [
                p
                for key, layer in lora.items()
                if key[0] == index
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
            ]
            losses = _train_and_score(peft_model, params, train, held_out, steps, learning_rate)
            gains.append([base - loss for loss in losses])
            on_layer(index + 1, num_layers)
        return gains
    finally:
        for p, flag in zip(every, trainable):
            p.requires_grad_(flag)


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
