"""Examples to token tensors, with the loss on completion tokens only.

Prompt and completion are tokenized *separately* and concatenated. Tokenizing ``prompt + completion`` as
one string would let byte-level BPE merge across the boundary (``"code:" + " 41"`` can become ``": 4"`` +
``"1"``), so the first completion token would depend on the prompt's last characters, and masking by
character offset would mislabel a token that straddles both. Separate tokenization makes the completion's
tokens a function of the completion alone, which is also what the prompt-blind floor assumes.

Layout of one encoded example (``-100`` is ignored by the cross-entropy)::

    input_ids: [bos] p_1 ... p_m  c_1 ... c_n  eos
    labels:    -100  -100 ... -100  c_1 ... c_n  eos

The model shifts labels by one inside its loss, so ``c_1`` is predicted from the last prompt token; a BOS
(when the tokenizer has one) gives an empty prompt a position to predict ``c_1`` from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layercard_service.data.jsonl import Example
from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["IGNORE_INDEX", "EncodeConfig", "EncodedExample", "collate", "encode_example", "encode_examples"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeConfig:
    """How examples become token sequences.

    Truncation keeps the completion when it can: tokens are dropped from the *left* of the prompt first
    (the end of the prompt is what the answer depends on), and only a completion longer than
    ``max_length`` (less BOS) is cut on the right, which then also drops its EOS.
    """

    max_length: int = 256
    add_bos: bool = True  # prepend the tokenizer's BOS when it has one
    add_eos: bool = True  # append EOS to the completion, so the model learns where an answer stops

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise InvalidArgument.field("max_length", f"must be an integer >= 2, got {self.max_length!r}")


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # same length as input_ids; IGNORE_INDEX on BOS and prompt tokens

    @property
    def n_completion_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_example(tokenizer: Any, example: Example, config: EncodeConfig | None = None) -> EncodedExample:
    """One example as ids and labels; see the module docstring for the layout and truncation rule."""
    config = config or EncodeConfig()
    bos = [tokenizer.bos_token_id] if config.add_bos and tokenizer.bos_token_id is not None else []
    if config.add_eos and tokenizer.eos_token_id is None:
        raise FailedPrecondition(
            "the tokenizer has no EOS token, so completions cannot be terminated", reason="TOKENIZER_WITHOUT_EOS"
        )
    prompt = _ids(tokenizer, example.prompt)
    completion = _ids(tokenizer, example.completion) + ([tokenizer.eos_token_id] if config.add_eos else [])

    room = config.max_length - len(bos)
    completion = completion[:room]  # a completion alone longer than the window: keep its start
    keep_prompt = room - len(completion)
    prompt = prompt[max(0, len(prompt) - keep_prompt) :] if keep_prompt > 0 else []  # keep the prompt's end

    input_ids = bos + prompt + completion
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion
    return EncodedExample(tuple(input_ids), tuple(labels))


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], config: EncodeConfig | None = None
) -> list[EncodedExample]:
    return [encode_example(tokenizer, ex, config) for ex in examples]


def collate(batch: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: pads are masked in attention and ignored in the loss.

    Returns ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 = real token), ``labels`` [B, T].
    """
    if not batch:
        raise InvalidArgument.field("batch", "must not be empty")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
