"""The placement rules the benchmark compares: each turns a card (and what it may measure) into a layer ranking.

Every rule is a ranking of the blocks; a rule's placement at size k is its top k (sorted). The rules:
- ``full``: every block (full-layer LoRA, the reference);
- ``first_k`` (depth order: shallower first), ``last_k``, ``uniform_k`` (evenly spaced), ``random_k`` (seeded draws);
- ``activation_norm``: the card's activation energy per block, largest first (Act-LoRA's rule);
- ``gradient_norm``: the plain norm of the adapter's gradient per block at B = 0, largest first (gradient-probe
  selection); measured here with the card's own adapter setup;
- ``resnorm``: the paper's ½·Res² per block, largest first;
- ``stream_normalized``: ½·Res² scaled by the residual stream's mean square entering the block (METHOD.md);
- ``type_normalized``: each module type's Res² shared out over the blocks, summed over types (gains.py);
- ``pilot``: the card's performance column (a short single-layer run per block), largest measured gain first;
- ``planner``: the service's planner, as a user would call it (its layers, whatever k it picks).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from layercard_service.control.planning.gains import layer_scores
from layercard_service.data.encode import EncodeConfig, collate, encode_examples
from layercard_service.domain.cards import LayerCardData
from layercard_service.models.head import completion_loss
from layercard_service.trainer.lora import LoraSettings, attach_lora

__all__ = ["RANKED_RULES", "gradient_norms", "placement", "rankings"]

RANKED_RULES = (
    "first_k",
    "last_k",
    "uniform_k",
    "random_k",
    "activation_norm",
    "gradient_norm",
    "resnorm",
    "stream_normalized",
    "type_normalized",
    "pilot",
)


def _descending(values: Sequence[float]) -> list[int]:
    """Blocks by value, largest first; ties go to the shallower block."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def gradient_norms(model, tokenizer, examples, rank: int, modules: Sequence[str], seed: int) -> list[float]:
    """Σ over a block's adapted modules of ‖∂L/∂B‖²_F at B = 0 (A seeded as the card seeds it), one pass."""
    torch.manual_seed(seed)
    peft_model = attach_lora(model, LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=tuple(modules)))
    encoded = encode_examples(tokenizer, examples, EncodeConfig())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    L = int(model.config.num_hidden_layers)
    batches = [encoded[i : i + 16] for i in range(0, len(encoded), 16)]
    for chunk in batches:
        batch = collate(chunk, pad)
        loss = completion_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss * len(chunk) / len(encoded)).backward()  # the probe's mean gradient
    norms = [0.0] * L
    for name, param in peft_model.named_parameters():
        if "lora_B" in name and param.grad is not None:
            layer = int(name.split(".layers.")[1].split(".")[0])
            norms[layer] += float(param.grad.pow(2).sum())
    return norms


def rankings(
    card: LayerCardData, grad_norms: Sequence[float], rank: int, rng: random.Random, random_draws: int
) -> dict[str, list[list[int]]]:
    """Each ranked rule's block orders (random_k has several draws; the others one)."""
    L = card.num_layers
    modules = card.module_types
    orders: dict[str, list[list[int]]] = {
        "first_k": [list(range(L))],
        "last_k": [list(range(L - 1, -1, -1))],
        "activation_norm": [_descending([row.activation_energy for row in card.layers])],
        "gradient_norm": [_descending(grad_norms)],
        "resnorm": [_descending(layer_scores(card, "resnorm", modules, rank))],
        "stream_normalized": [_descending(layer_scores(card, "stream_normalized", modules, rank))],
        "type_normalized": [_descending(layer_scores(card, "type_normalized", modules, rank))],
        "random_k": [rng.sample(range(L), L) for _ in range(random_draws)],
    }
    if all(row.measured_gain is not None for row in card.layers):
        orders["pilot"] = [_descending([row.measured_gain or 0.0 for row in card.layers])]
    orders["uniform_k"] = []  # depends on k: see placement()
    return orders


def placement(rule: str, order: list[int] | None, k: int, num_layers: int) -> tuple[int, ...]:
    if rule == "uniform_k":  # evenly spaced, centred
        return tuple(sorted({int((i + 0.5) * num_layers / k) for i in range(k)}))
    assert order is not None
    return tuple(sorted(order[:k]))
