"""The JSONL loader: the three good shapes, every kind of bad input, and loss masking of the encoding."""

from __future__ import annotations

import json

import pytest
import torch
from support.bpe import small_bpe
from transformers import PreTrainedTokenizerFast

from layercard_service.data.encode import IGNORE_INDEX, EncodeConfig, collate, encode_example
from layercard_service.data.jsonl import ChatMessage, Example, JsonlLimits, load_jsonl, parse_jsonl
from layercard_service.errors import InvalidArgument, NotFound


def _lines(*objs: object) -> bytes:
    return "\n".join(json.dumps(o) for o in objs).encode() + b"\n"


def _error(data: bytes | str, limits: JsonlLimits | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_jsonl(data, limits)
    return info.value


# --- good shapes -----------------------------------------------------------------------------------------


def test_prompt_completion_shape_and_extra_keys_ignored() -> None:
    data = _lines({"prompt": "2+2=", "completion": " 4", "id": 7}, {"prompt": "", "completion": "x"})
    assert parse_jsonl(data) == [Example("2+2=", " 4"), Example("", "x")]


def test_text_shape_is_all_completion() -> None:
    assert parse_jsonl(_lines({"text": "hello world"})) == [Example("", "hello world")]


def test_messages_shape_keeps_the_messages_and_takes_final_assistant_as_completion() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "name": "bot"},  # extra keys on a message are ignored
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    (example,) = parse_jsonl(_lines({"messages": messages}))
    assert example.is_chat
    assert example.completion == "bye"
    assert example.prompt == "and?"  # the final question, for display; encoding renders the messages
    assert example.messages == tuple(ChatMessage(m["role"], m["content"]) for m in messages)
    assert example == Example.chat(messages)
    hash(example)  # immutable all the way down: examples can be set members
    assert not parse_jsonl(_lines({"prompt": "p", "completion": "c"}))[0].is_chat


def test_blank_lines_crlf_bom_and_missing_final_newline_are_tolerated() -> None:
    data = b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}'
    assert parse_jsonl(data) == [Example("", "a"), Example("", "b")]
    assert parse_jsonl('{"text": "\u00e9t\u00e9"}') == [Example("", "\u00e9t\u00e9")]  # str input, non-ASCII


def test_load_jsonl_from_path(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(_lines({"prompt": "p", "completion": "c"}))
    assert load_jsonl(path) == [Example("p", "c")]


# --- bad inputs ------------------------------------------------------------------------------------------


def test_empty_file() -> None:
    err = _error(b"")
    assert err.message == "dataset: is empty"
    assert err.violations[0].field == "dataset"


def test_blank_only_file() -> None:
    assert "no examples" in _error(b"\n  \n\r\n").message


def test_invalid_utf8_names_the_line() -> None:
    err = _error(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    assert err.message.startswith("line 2: is not valid UTF-8")
    assert err.violations[0].field == "line 2"


def test_invalid_json_names_the_line() -> None:
    err = _error(b'{"text": "ok"}\n{"text": "a",}\n')
    assert err.message.startswith("line 2: is not valid JSON")


@pytest.mark.parametrize(
    "line, kind", [(b"[1, 2]", "array"), (b'"text"', "string"), (b"3", "number"), (b"null", "null")]
)
def test_non_object_line(line: bytes, kind: str) -> None:
    assert _error(line).message == f"line 1: must be a JSON object, got {kind}"


def test_wrong_type_names_line_and_field() -> None:
    data = _lines(
        {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}
    )
    err = _error(data)
    assert err.message == "line 3: field 'completion' must be a string, got number"
    assert err.violations[0].field == "line 3: completion"
    assert err.reason == "INVALID_DATASET"


@pytest.mark.parametrize("obj, field", [({"prompt": "a"}, "completion"), ({"completion": "b"}, "prompt")])
def test_missing_field(obj: dict, field: str) -> None:
    err = _error(_lines(obj))
    assert err.message == f"line 1: field '{field}' is missing"
    assert err.violations[0].field == f"line 1: {field}"


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"prompt": None, "completion": "b"}, "line 1: field 'prompt' must be a string, got null"),
        ({"prompt": "a", "completion": ["b"]}, "line 1: field 'completion' must be a string, got array"),
        ({"text": True}, "line 1: field 'text' must be a string, got boolean"),
        ({"text": ""}, "line 1: field 'text' must not be empty"),
        ({"prompt": "a", "completion": ""}, "line 1: field 'completion' must not be empty"),
    ],
)
def test_wrong_types_and_empty_values(obj: dict, message: str) -> None:
    assert _error(_lines(obj)).message == message


def test_unknown_shape() -> None:
    assert _error(_lines({"input": "a", "output": "b"})).message.startswith(
        "line 1: must have 'prompt' and 'completion', or 'text', or 'messages'"
    )


def test_fields_of_two_shapes_on_one_line() -> None:
    assert "mixes the fields of several shapes" in _error(_lines({"text": "a", "prompt": "b"})).message


def test_mixed_shapes_across_lines() -> None:
    err = _error(_lines({"text": "a"}, {"prompt": "b", "completion": "c"}))
    assert err.message.startswith("line 2: has shape 'prompt_completion' but line 1 has shape 'text'")


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hi", "line 1: field 'messages' must be an array, got string"),
        ([], "line 1: field 'messages' must not be empty"),
        (["hi"], "line 1: field 'messages[0]' must be an object, got string"),
        ([{"content": "x"}], "line 1: field 'messages[0].role' is missing"),
        ([{"role": "bot", "content": "x"}], "line 1: field 'messages[0].role' must be one of"),
        ([{"role": "assistant", "content": 5}], "line 1: field 'messages[0].content' must be a string, got number"),
        ([{"role": "user", "content": "x"}], "line 1: the final message must have role 'assistant'"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
            "line 1: the final assistant message must not be empty",
        ),
    ],
)
def test_bad_messages(messages: object, message: str) -> None:
    assert _error(_lines({"messages": messages})).message.startswith(message)


def test_bad_message_field_path_names_the_message() -> None:
    err = _error(_lines({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}))
    assert err.violations[0].field == "line 1: messages[1].content"
    assert err.message == "line 1: field 'messages[1].content' is missing"


def test_huge_line_is_rejected_without_reading_it_whole() -> None:
    limits = JsonlLimits(max_line_bytes=64)
    ok = json.dumps({"text": "x" * 40}).encode()
    huge = json.dumps({"text": "x" * 10_000}).encode()
    err = _error(ok + b"\n" + huge + b"\n", limits)
    assert err.message == "line 2: is longer than the limit of 64 bytes"
    # A line of exactly the limit (plus CRLF) is fine.
    exact = json.dumps({"text": "y" * (64 - len('{"text": ""}'))}).encode()
    assert len(exact) == 64
    assert parse_jsonl(exact + b"\r\n", limits) == [Example("", "y" * 52)]


def test_too_many_examples() -> None:
    err = _error(_lines({"text": "a"}, {"text": "b"}, {"text": "c"}), JsonlLimits(max_examples=2))
    assert err.message == "dataset: has more than the limit of 2 examples"


def test_several_problems_are_reported_together() -> None:
    err = _error(b'{"text": 1}\nnot json\n{"text": "ok"}\n[]\n')
    assert [v.field for v in err.violations] == ["line 1: text", "line 2", "line 4"]
    assert err.message.endswith("(and 2 more problem(s))")


@pytest.mark.parametrize(
    "kwargs", [{"max_line_bytes": 0}, {"max_examples": -1}, {"max_reported_errors": 1.5}, {"max_examples": True}]
)
def test_limits_are_validated(kwargs: dict) -> None:
    with pytest.raises(InvalidArgument):
        JsonlLimits(**kwargs)


def test_missing_path_and_directory(tmp_path) -> None:
    with pytest.raises(NotFound):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidArgument, match="is a directory"):
        load_jsonl(tmp_path)


def test_non_bytes_input() -> None:
    with pytest.raises(InvalidArgument):
        parse_jsonl(123)  # type: ignore[arg-type]


# --- encoding and loss masking -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE with the built-in model's special tokens (<s>, </s>, <pad>)."""
    return small_bpe(["code: 41 42 43 the answer is", "hello world, hello there"] * 20, vocab_size=320)


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_loss_only_on_completion_tokens(tokenizer) -> None:
    ex = Example("code:", " 41")
    enc = encode_example(tokenizer, ex)
    prompt, completion = _ids(tokenizer, "code:"), _ids(tokenizer, " 41")
    assert list(enc.input_ids) == [tokenizer.bos_token_id, *prompt, *completion, tokenizer.eos_token_id]
    assert list(enc.labels) == [IGNORE_INDEX] * (1 + len(prompt)) + [*completion, tokenizer.eos_token_id]
    assert enc.n_completion_tokens == len(completion) + 1


def test_prompt_and_completion_are_tokenized_separately(tokenizer) -> None:
    # Joined, BPE may merge across the boundary; separately, the completion's tokens never depend on the prompt.
    a = encode_example(tokenizer, Example("hello", " world"))
    b = encode_example(tokenizer, Example("hel", "lo world"))
    completion_a = [t for t in a.labels if t != IGNORE_INDEX]
    assert completion_a == [*_ids(tokenizer, " world"), tokenizer.eos_token_id]
    assert [t for t in b.labels if t != IGNORE_INDEX] == [*_ids(tokenizer, "lo world"), tokenizer.eos_token_id]


def test_text_shape_trains_every_token(tokenizer) -> None:
    enc = encode_example(tokenizer, Example("", "hello"))
    assert enc.labels[0] == IGNORE_INDEX  # BOS only
    assert list(enc.labels[1:]) == [*_ids(tokenizer, "hello"), tokenizer.eos_token_id]


def test_truncation_drops_prompt_from_the_left_first(tokenizer) -> None:
    prompt = "hello world " * 10
    enc = encode_example(tokenizer, Example(prompt, " 41"), EncodeConfig(max_length=8))
    completion = [*_ids(tokenizer, " 41"), tokenizer.eos_token_id]
    assert len(enc.input_ids) == 8
    assert enc.input_ids[0] == tokenizer.bos_token_id
    assert list(enc.input_ids[-len(completion) :]) == completion
    assert list(enc.input_ids[1 : -len(completion)]) == _ids(tokenizer, prompt)[-(7 - len(completion)) :]
    # A completion longer than the window keeps its start and loses its EOS.
    long = encode_example(tokenizer, Example("p", "hello world " * 10), EncodeConfig(max_length=5))
    assert list(long.labels) == [IGNORE_INDEX, *_ids(tokenizer, "hello world " * 10)[:4]]


def test_encode_config_is_validated() -> None:
    with pytest.raises(InvalidArgument):
        EncodeConfig(max_length=1)


def test_collate_right_pads_and_masks(tokenizer) -> None:
    batch = [encode_example(tokenizer, Example("code:", " 41")), encode_example(tokenizer, Example("", "x"))]
    out = collate(batch, tokenizer.pad_token_id)
    n0, n1 = len(batch[0].input_ids), len(batch[1].input_ids)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, max(n0, n1))
    assert out["attention_mask"].sum(dim=1).tolist() == [n0, n1]
    assert (out["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (out["input_ids"][1, n1:] == tokenizer.pad_token_id).all()
    assert out["input_ids"].dtype == torch.long
