"""The LM head only where the loss is: logits at the positions whose next token carries a label.

Position t predicts token t+1, so the completion-token loss needs the logits of positions t with
``labels[t + 1] != -100`` only, a few in forty on a chat batch. A causal LM's own forward applies the head (hidden
-> vocabulary: 49,152 columns on SmolLM2) at every position, in forward and in backward. Here the backbone runs
alone (its final norm is inside it), its last hidden states are gathered at the labelled positions [N, H], and the
head (tied or not, with its bias if any) runs on those rows only, followed by what the family does to its logits:
Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``.

Anything else a family might do between backbone and head is caught by a one-time check per model: the head-only
logits of a short sequence must equal the full forward's. A model that fails it, that has no separable backbone and
head, or that adds a router's auxiliary loss to its training loss, gets the full forward instead, and
``head_plan(model).reason`` says why. Both paths give the same loss up to float rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from layercard_service.data.encode import IGNORE_INDEX

__all__ = [
    "HeadPlan",
    "TrainingObjective",
    "completion_loss",
    "head_plan",
    "labelled_logits",
    "training_loss",
    "unwrap",
]

_CHECK_TOKENS = 8
_plans: weakref.WeakKeyDictionary[nn.Module, HeadPlan] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HeadPlan:
    """How the loss is computed for one model: head-only (``exact``) or the full forward, and why."""

    head_only: bool
    reason: str = ""  # why not head-only; empty when it is


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP, objective or peft wrapper (or the model itself)."""
    while isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel, TrainingObjective
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _parts(hf: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[torch.Tensor], torch.Tensor]] | str:
    """(backbone, head, logit post-processing) of a transformers causal LM, or why it has none."""
    backbone = getattr(hf, "base_model", None)
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(backbone, nn.Module) or backbone is hf or not isinstance(head, nn.Module):
        return f"{type(hf).__name__} has no separate backbone and output head"
    config = getattr(hf, "config", None)
    if getattr(config, "output_router_logits", False):
        return f"{type(hf).__name__} adds the router's auxiliary loss to its training loss"
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(hf, "logit_scale", None)  # Cohere multiplies (a float attribute of the model)
    divisor = getattr(config, "logits_scaling", None)  # Granite divides

    def post(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 1:
            logits = logits / divisor
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return backbone, head, post


def _hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]  # last_hidden_state [B, T, H], after the final norm


@torch.no_grad()
def _check(model: nn.Module, parts: tuple) -> str:
    """Empty when head-only logits equal the full forward's on a short sequence; else the difference."""
    backbone, head, post = parts
    vocab = int(getattr(unwrap(model).config, "vocab_size", 0) or 2)
    device = next(model.parameters()).device
    input_ids = (torch.arange(_CHECK_TOKENS, device=device) * 7 % vocab).unsqueeze(0)  # [1, 8]
    mask = torch.ones_like(input_ids)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout in the comparison
    try:
        full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()  # [1, 8, V]
        mine = post(head(_hidden(backbone, input_ids, mask))).float()
    finally:
        for module, training in modes.items():
            module.training = training
    if mine.shape != full.shape:
        return f"head-only logits have shape {list(mine.shape)}, the model's {list(full.shape)}"
    diff = float((mine - full).abs().max())
    if not diff <= 1e-4 * (1.0 + float(full.abs().max())):
        return f"head-only logits differ from the model's by {diff:.3g}"
    return ""


def head_plan(model: nn.Module) -> HeadPlan:
    """Whether ``model``'s loss can be taken head-only (checked once per model, then remembered)."""
    hf = unwrap(model)
    plan = _plans.get(hf)
    if plan is None:
        parts = _parts(hf)
        if isinstance(parts, str):
            plan = HeadPlan(False, parts)
        else:
            mismatch = _check(model, parts)
            plan = HeadPlan(not mismatch, f"{type(hf).__name__}: {mismatch}" if mismatch else "")
        _plans[hf] = plan
    return plan


def labelled_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] in float32, targets [N]) at the N positions whose next token is labelled, in batch order.

    ``input_ids``, ``attention_mask``, ``labels``: [B, T], labels -100 where there is no loss.
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts token t+1
    targets = labels[:, 1:][keep]  # [N]
    hf = unwrap(model)
    if head_plan(model).head_only:
        backbone, head, post = _parts(hf)  # type: ignore[misc]
        hidden = _hidden(backbone, input_ids, attention_mask)[:, :-1][keep]  # [N, H]
        return post(head(hidden)).float(), targets
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    return logits[:, :-1][keep].float(), targets


def completion_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the completion tokens: their mean (``reduction="mean"``) or sum (``"sum"``)."""
    logits, targets = labelled_logits(model, input_ids, attention_mask, labels)
    return nn.functional.cross_entropy(logits, targets, reduction=reduction)


def training_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The model's training objective: the mean completion-token loss (head-only where exact), or, for a model
    that falls back, what its own forward returns with ``labels`` (a router's auxiliary loss included).

    A DDP-wrapped model runs its full forward: gradients are only averaged across processes when the forward
    goes through the DDP wrapper, so wrap a ``TrainingObjective`` in DDP instead to keep the head-only saving.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    if head_plan(model).head_only:
        return completion_loss(model, input_ids, attention_mask, labels)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


class TrainingObjective(nn.Module):
    """``training_loss`` as a module, so a data-parallel wrapper (DDP) sees the whole step in its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return training_loss(self.module, input_ids, attention_mask, labels)
