"""Evaluation of a (possibly adapted) causal LM on prompt/completion or chat examples.

Two figures, because loss alone cannot tell content from format (METHOD.md):
- the mean completion-token loss, a ratio of sums over the whole set (so it is comparable with the
  prompt-blind floor, which is defined the same way);
- greedy exact-match: decode the completion from the prompt alone and compare it with the reference (for a
  chat: the answer generated after the chat template's generation prompt, against the final assistant content).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layercard_service.data.encode import IGNORE_INDEX, EncodeConfig, collate, encode_examples, prompt_ids
from layercard_service.data.jsonl import Example
from layercard_service.data.task_base import exact_match
from layercard_service.errors import InvalidArgument
from layercard_service.models.head import completion_loss

__all__ = ["EvalResult", "evaluate", "exact_match_rate", "greedy_completions", "mean_completion_loss"]


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per completion token (EOS included)
    completion_tokens: int
    exact_match: float | None  # None when not computed
    examples: int


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def mean_completion_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    encode: EncodeConfig | None = None,
) -> tuple[float, int]:
    """(sum of completion-token losses / number of completion tokens, number of completion tokens)."""
    if not examples:
        raise InvalidArgument.field("examples", "must not be empty")
    model.eval()
    encoded = encode_examples(tokenizer, examples, encode)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], _pad_id(tokenizer)).items()}
        # Position t predicts token t+1; the head runs only where that token is labelled.
        loss = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")
        total += float(loss)
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / count, count


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    encode: EncodeConfig | None = None,
) -> list[str]:
    """Greedy decoding after each example's prompt, stopped at EOS, decoded to text (EOS and pads dropped).

    Prompts are encoded exactly as in training, up to the completion (``prompt_ids``: BOS and prompt, or a
    chat up to its final assistant turn with the generation prompt) and left-padded, so every row's next
    token is generated at the same position.
    """
    model.eval()
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(examples), batch_size):
        rows = [prompt_ids(tokenizer, e, encode) for e in examples[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T], left-padded
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        device = next(model.parameters()).device
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )[:, width:]  # [B, <= max_new_tokens]: only the new tokens
        for row in generated.tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def exact_match_rate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    encode: EncodeConfig | None = None,
) -> tuple[float, list[str]]:
    """(fraction of examples whose greedy completion matches the reference, the predictions).

    The reference is ``completion``: for a chat, the final assistant content, which the greedy answer after
    the chat's generation prompt is compared with.
    """
    if not examples:
        raise InvalidArgument.field("examples", "must not be empty")
    longest = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples)
    predictions = greedy_completions(
        model, tokenizer, examples, max_new_tokens=longest + 1, batch_size=batch_size, encode=encode
    )
    hits = sum(exact_match(p, e.completion) for p, e in zip(predictions, examples, strict=True))
    return hits / len(examples), predictions


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    with_exact_match: bool = True,
    batch_size: int = 64,
    encode: EncodeConfig | None = None,
) -> EvalResult:
    """Loss and (optionally) greedy exact-match on ``examples``."""
    loss, tokens = mean_completion_loss(model, tokenizer, examples, batch_size=batch_size, encode=encode)
    em = None
    if with_exact_match:
        em = exact_match_rate(model, tokenizer, examples, batch_size=batch_size, encode=encode)[0]
    return EvalResult(loss=loss, completion_tokens=tokens, exact_match=em, examples=len(examples))
