"""Chats encoded in the model's own chat template: layout, assistant-only labels, multi-turn, truncation, and
the same text vLLM's chat completions render; generation for exact match starts at the generation prompt."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from layercard_service.card_engine.engine import make_probe_batches
from layercard_service.data.chat import FALLBACK_CHAT_TEMPLATE
from layercard_service.data.encode import IGNORE_INDEX, EncodeConfig, encode_example, encode_examples, prompt_ids
from layercard_service.data.jsonl import ChatMessage, Example
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.models.builtin import builtin_model_path
from layercard_service.trainer.evaluate import exact_match_rate

SINGLE = [{"role": "user", "content": "What is the capital of Veltria?"}, {"role": "assistant", "content": "Morvane"}]
MULTI = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "bye"},
]


@pytest.fixture(scope="module")
def tiny():
    """builtin:tiny's tokenizer: no chat template of its own, so chats use the fallback."""
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("builtin:tiny"))
    assert not tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_path):
    """SmolLM2's tokenizer only (cheap): a real chat template, EOS = <|im_end|>."""
    return AutoTokenizer.from_pretrained(smollm2_path)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _labelled(enc) -> list[int]:
    return [t for t in enc.labels if t != IGNORE_INDEX]


def _fallback(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=FALLBACK_CHAT_TEMPLATE, **kwargs)


def test_fallback_layout_single_turn(tiny) -> None:
    enc = encode_example(tiny, Example.chat(SINGLE))
    prompt = _fallback(tiny, SINGLE[:1], add_generation_prompt=True)
    assert prompt.startswith("<s><|user|>\n")  # the template places the BOS ...
    assert enc.input_ids.count(tiny.bos_token_id) == 1  # ... and no second one is added
    context = _ids(tiny, prompt)
    answer = [*_ids(tiny, "Morvane"), tiny.eos_token_id]
    assert list(enc.input_ids) == context + answer  # ends at EOS: nothing after the final end of turn
    assert list(enc.labels) == [IGNORE_INDEX] * len(context) + answer
    assert prompt_ids(tiny, Example.chat(SINGLE)) == context


def test_fallback_multi_turn_trains_every_assistant_turn(tiny) -> None:
    enc = encode_example(tiny, Example.chat(MULTI))
    eos = tiny.eos_token_id
    assert _labelled(enc) == [*_ids(tiny, "hello there"), eos, *_ids(tiny, "bye"), eos]
    text = tiny.decode(enc.input_ids)
    assert text == _fallback(tiny, MULTI).removesuffix("\n")
    # Everything else is masked: system and user turns, headers, the newline after the first end of turn.
    masked = tiny.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE_INDEX])
    assert masked == "<s><|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n\n<|user|>\nand?\n<|assistant|>\n"
    assert prompt_ids(tiny, Example.chat(MULTI)) == _ids(tiny, _fallback(tiny, MULTI[:-1], add_generation_prompt=True))


def test_chat_truncation_keeps_the_final_answer_and_the_end_of_the_context(tiny) -> None:
    full = encode_example(tiny, Example.chat(MULTI))
    answer = [*_ids(tiny, "bye"), tiny.eos_token_id]
    short = encode_example(tiny, Example.chat(MULTI), EncodeConfig(max_length=10))
    assert len(short.input_ids) == 10
    assert list(short.input_ids) == list(full.input_ids[-10:])
    assert list(short.labels) == list(full.labels[-10:])
    assert list(short.labels[-len(answer) :]) == answer
    # A final answer longer than the window keeps its start (and loses its end of turn), as a completion does.
    long = Example.chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "hello world " * 10}])
    cut = encode_example(tiny, long, EncodeConfig(max_length=4))
    assert list(cut.labels) == _ids(tiny, "hello world " * 10)[:4]
    assert len(prompt_ids(tiny, Example.chat(MULTI), EncodeConfig(max_length=6))) == 5  # room to generate


def test_a_chat_of_one_answer_and_a_leading_assistant_turn(tiny) -> None:
    solo = encode_example(tiny, Example.chat([{"role": "assistant", "content": "hi"}]))
    assert tiny.decode(solo.input_ids) == "<s><|assistant|>\nhi</s>"
    assert _labelled(solo) == [*_ids(tiny, "hi"), tiny.eos_token_id]
    # A leading assistant turn has no conversation to prompt it from: context, not trained.
    lead = [{"role": "assistant", "content": "welcome"}, *SINGLE]
    assert _labelled(encode_example(tiny, Example.chat(lead))) == [*_ids(tiny, "Morvane"), tiny.eos_token_id]


def test_smollm2_labels_are_exactly_the_answers_and_im_end(smol) -> None:
    enc = encode_example(smol, Example.chat(MULTI))
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    assert smol.eos_token_id == im_end
    assert _labelled(enc) == [*_ids(smol, "hello there"), im_end, *_ids(smol, "bye"), im_end]
    assert smol.decode(enc.input_ids) == smol.apply_chat_template(MULTI, tokenize=False).removesuffix("\n")


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_training_text_is_what_vllm_renders_plus_the_answer(smol, messages) -> None:
    example = Example.chat(messages)
    served = smol.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)  # vLLM's prompt
    enc = encode_example(smol, example)
    assert smol.decode(enc.input_ids) == served + messages[-1]["content"] + "<|im_end|>"
    # The prompt a generation starts from is token for token what vLLM feeds the model for the same chat.
    assert prompt_ids(smol, example) == _ids(smol, served)
    assert list(enc.input_ids[: len(prompt_ids(smol, example))]) == prompt_ids(smol, example)


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_facts_answers_cost_what_the_floor_counts(which, request) -> None:
    # The prompt-blind floor counts tokenize(answer) + 1 end-of-turn token per example: so do the labels.
    tokenizer = request.getfixturevalue(which)
    task = get_task("builtin:facts")
    for enc, example in zip(encode_examples(tokenizer, task.validation), task.validation, strict=True):
        assert _labelled(enc) == [*_ids(tokenizer, example.completion), tokenizer.eos_token_id]


def test_a_template_that_refuses_a_chat_is_a_failed_precondition_naming_the_example(tiny) -> None:
    strict = copy.deepcopy(tiny)
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    encode_examples(strict, [Example.chat(SINGLE)])  # accepted
    with pytest.raises(FailedPrecondition, match=r"example 1: .*no system role") as info:
        encode_examples(strict, [Example.chat(SINGLE), Example.chat(MULTI)])
    assert info.value.reason == "CHAT_TEMPLATE_ERROR"


def test_a_chat_must_end_with_the_assistant(tiny) -> None:
    with pytest.raises(InvalidArgument):
        Example.chat(SINGLE[:1])
    hand_made = Example("q", "a", (ChatMessage("assistant", "a"), ChatMessage("user", "q")))
    with pytest.raises(InvalidArgument):
        encode_example(tiny, hand_made)


class _Scripted(torch.nn.Module):
    """Stands in for a model in greedy generation: records each prompt, answers from a script, then EOS."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.prompts = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            self.prompts.append(prompt)
            new = [*_ids(self.tokenizer, self.answers.get(prompt, "?")), eos_token_id, *_ids(self.tokenizer, "junk")]
            rows.append(ids + (new + [pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_exact_match_generates_after_the_generation_prompt_and_compares_the_final_answer(smol) -> None:
    right = Example.chat(MULTI)
    wrong = Example.chat(SINGLE)
    prompt = smol.apply_chat_template(MULTI[:-1], add_generation_prompt=True, tokenize=False)
    model = _Scripted(smol, {prompt: "bye"})
    em, predictions = exact_match_rate(model, smol, [right, wrong])
    assert model.prompts[0] == prompt  # the chat up to the final assistant turn, with the generation prompt
    assert predictions == ["bye", "?"]  # stopped at EOS: what follows it is not the answer
    assert em == 0.5


def test_the_cards_probe_sees_the_chat_template(tiny) -> None:
    task = get_task("builtin:facts")
    settings = CardSettings(probe_size=8, batch_size=4, max_seq_len=64)
    batches = make_probe_batches(tiny, task.train, settings, torch.device("cpu"))
    ids, labels = batches[0]["input_ids"][0].tolist(), batches[0]["labels"][0].tolist()
    text = tiny.decode([t for t, m in zip(ids, batches[0]["attention_mask"][0].tolist(), strict=True) if m])
    assert text.startswith("<s><|user|>\n") and "\n<|assistant|>\n" in text
    assert tiny.decode([t for t in labels if t != IGNORE_INDEX]) in {f"{c}</s>" for c in task.table.values()}
