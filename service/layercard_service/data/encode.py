"""Examples to token tensors, with the loss on completion (assistant) tokens only.

Prompt and completion are tokenized *separately* and concatenated. Tokenizing ``prompt + completion`` as
one string would let byte-level BPE merge across the boundary (``"code:" + " 41"`` can become ``": 4"`` +
``"1"``), so the first completion token would depend on the prompt's last characters, and masking by
character offset would mislabel a token that straddles both. Separate tokenization makes the completion's
tokens a function of the completion alone, which is also what the prompt-blind floor assumes.

Layout of one prompt/completion (or text) example (``-100`` is ignored by the cross-entropy)::

    input_ids: [bos] p_1 ... p_m  c_1 ... c_n  eos
    labels:    -100  -100 ... -100  c_1 ... c_n  eos

The model shifts labels by one inside its loss, so ``c_1`` is predicted from the last prompt token; a BOS
(when the tokenizer has one) gives an empty prompt a position to predict ``c_1`` from.

A chat (``Example.messages``) is rendered here, with the tokenizer's own chat template or, for a model
without one, :data:`~layercard_service.data.chat.FALLBACK_CHAT_TEMPLATE` (no BOS is added: the template
decides). Each assistant turn ``i`` is located by rendering prefixes: the conversation before it with the
generation prompt (``messages[:i]``, ``add_generation_prompt=True``) and the conversation through it
(``messages[:i+1]``); the difference is the turn, and the text between turns is context. Segments are
tokenized separately, for the reason above, and special tokens (``<|im_end|>``) split out of the text, so an
answer's tokens are those of its content alone, as for a completion. Labels cover every assistant turn up to
and including its end-of-turn token (the tokenizer's EOS, e.g. ``<|im_end|>``), so the model learns to stop;
what the template writes after it (a newline) is context, and after the final turn it is dropped::

    input_ids: <system/user turns, assistant header>  a_1 ... a_n <|im_end|>  <|im_start|>user ... a'_1 ... <|im_end|>
    labels:    -100 ...                               a_1 ... a_n <|im_end|>  -100 ...             a'_1 ... <|im_end|>

The prompt a generation starts from is the same ids up to the final answer: the chat before the final
assistant turn with the generation prompt, exactly what vLLM's chat completions render.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError

from layercard_service.data.chat import FALLBACK_CHAT_TEMPLATE
from layercard_service.data.jsonl import ChatMessage, Example
from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "IGNORE_INDEX",
    "EncodeConfig",
    "EncodedExample",
    "collate",
    "encode_example",
    "encode_examples",
    "prompt_ids",
    "render_chat",
]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeConfig:
    """How examples become token sequences.

    Truncation keeps the completion when it can: tokens are dropped from the *left* of the prompt first
    (the end of the prompt is what the answer depends on), and only a completion longer than
    ``max_length`` (less BOS) is cut on the right, which then also drops its EOS. A chat is cut the same way:
    its final assistant turn is the completion, everything before it (earlier turns too) the prompt.
    ``add_bos`` and ``add_eos`` apply to prompt/completion examples only; a chat's template places both.
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


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> str:
    """``messages`` as text in the tokenizer's own chat template, or the fallback when it has none."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            [m.as_dict() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=template,
        )
    except (TemplateError, ValueError, TypeError) as exc:  # a template may refuse a chat (raise_exception)
        raise FailedPrecondition(
            f"the model's chat template cannot render this chat: {exc}", reason="CHAT_TEMPLATE_ERROR"
        ) from exc


def _chat_parts(tokenizer: Any, messages: Sequence[ChatMessage]) -> tuple[list[int], list[int], list[int]]:
    """(context ids, their labels, final answer ids) of a chat; see the module docstring."""
    if not messages or messages[-1].role != "assistant":
        raise InvalidArgument.field("messages", "a chat must end with an assistant message")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    answer: list[int] = []
    done = ""  # the text rendered so far
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if i == 0 and i < last:
            before = full  # nothing to prompt from (no template renders an empty chat): a leading turn is context
        elif i == 0 and message.content and message.content in full:  # the chat is one answer: cut at its content
            before = full[: full.find(message.content)]
        else:
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        if not (before.startswith(done) and full.startswith(before)):
            raise FailedPrecondition(
                f"the model's chat template does not render message {i} as a continuation of the chat before it, "
                "so its tokens cannot be told apart",
                reason="CHAT_TEMPLATE_NOT_INCREMENTAL",
            )
        context = _ids(tokenizer, before[len(done) :])
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        turn = _ids(tokenizer, full[len(before) :])
        end = turn.index(eos) + 1 if eos is not None and eos in turn else len(turn)  # through the end of turn
        if i == last:
            answer = turn[:end]
        else:
            ids += turn
            labels += turn[:end] + [IGNORE_INDEX] * (len(turn) - end)
        done = full
    return ids, labels, answer


def _parts(tokenizer: Any, example: Example, config: EncodeConfig) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, their labels, completion ids): the one split that training, loss and generation share."""
    if example.messages is not None:
        return _chat_parts(tokenizer, example.messages)
    bos = [tokenizer.bos_token_id] if config.add_bos and tokenizer.bos_token_id is not None else []
    if config.add_eos and tokenizer.eos_token_id is None:
        raise FailedPrecondition(
            "the tokenizer has no EOS token, so completions cannot be terminated", reason="TOKENIZER_WITHOUT_EOS"
        )
    prompt = bos + _ids(tokenizer, example.prompt)
    completion = _ids(tokenizer, example.completion) + ([tokenizer.eos_token_id] if config.add_eos else [])
    return prompt, [IGNORE_INDEX] * len(prompt), completion


def encode_example(tokenizer: Any, example: Example, config: EncodeConfig | None = None) -> EncodedExample:
    """One example as ids and labels; see the module docstring for the layout and truncation rule."""
    config = config or EncodeConfig()
    prompt, prompt_labels, completion = _parts(tokenizer, example, config)
    pinned = 0 if example.is_chat else int(config.add_bos and tokenizer.bos_token_id is not None)  # the BOS stays

    room = config.max_length - pinned
    completion = completion[:room]  # a completion alone longer than the window: keep its start
    keep = room - len(completion)
    start = max(pinned, len(prompt) - keep)  # keep the prompt's end
    input_ids = prompt[:pinned] + prompt[start:] + completion
    labels = prompt_labels[:pinned] + prompt_labels[start:] + completion
    return EncodedExample(tuple(input_ids), tuple(labels))


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], config: EncodeConfig | None = None
) -> list[EncodedExample]:
    encoded = []
    for index, example in enumerate(examples):
        try:
            encoded.append(encode_example(tokenizer, example, config))
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"example {index}: {exc.message}", reason=exc.reason) from exc
    return encoded


def prompt_ids(tokenizer: Any, example: Example, config: EncodeConfig | None = None) -> list[int]:
    """The ids a generation of the answer starts from: the encoding up to the completion (the final answer),
    keeping its last ``max_length - 1`` tokens so at least one token can be generated."""
    config = config or EncodeConfig()
    ids = _parts(tokenizer, example, config)[0]
    return ids[-(config.max_length - 1) :] if len(ids) >= config.max_length else ids


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
