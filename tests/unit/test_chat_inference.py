"""Chat inference below the gRPC edge: a conversation's rules, the template it carries, the chat completions
request vLLM gets and the stream it answers (an in-memory vLLM behind httpx's mock transport), and the routing
of a chat through the proxy (fake vLLM servers, support/fleet.py).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from support.fakes import RecordingTelemetry
from support.fleet import reason, run_async

from layercard_service.data.chat import FALLBACK_CHAT_TEMPLATE
from layercard_service.errors import FailedPrecondition, InvalidArgument, Unavailable
from layercard_service.serving.chat import MAX_MESSAGES, BaseModelChatTemplate, Chat, ChatMessage, check_chat
from layercard_service.serving.vllm_api import HttpVllmApi, Sampling, request

URL = "http://vllm-test:8000"


def chat(*turns: tuple[str, str], template: str | None = None) -> Chat:
    return Chat(tuple(ChatMessage(role, content) for role, content in turns), template)


# --- the rules of a conversation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "field"),
    [
        ((), "messages"),
        ((("robot", "hi"),), "messages[0].role"),
        ((("user", "hi"), ("tool", "x"), ("user", "hi")), "messages[1].role"),
        ((("user", ""),), "messages[0].content"),
        ((("system", "be brief"), ("user", "hi"), ("system", "late"), ("user", "hi")), "messages[2].role"),
        ((("user", "hi"), ("assistant", "hello")), "messages[1].role"),  # the answer is asked for, not given
        ((("system", "be brief"),), "messages[0].role"),
        ((("user", "x"),) * (MAX_MESSAGES + 1), "messages"),
        ((("system", "x" * 600_000), ("user", "y" * 600_000)), "messages"),
    ],
)
def test_a_bad_conversation_names_its_field(turns, field):
    with pytest.raises(InvalidArgument) as err:
        check_chat(chat(*turns).messages)
    assert [v.field for v in err.value.violations] == [field]


def test_a_good_conversation_passes():
    check_chat(chat(("system", "a"), ("system", "b"), ("user", "q"), ("assistant", "a"), ("user", "q")).messages)
    check_chat(chat(("user", "q"), ("user", "again")).messages)  # roles need not alternate


# --- which template a chat carries ----------------------------------------------------------------------------


def test_a_base_model_without_a_template_gets_the_fallback_and_one_with_its_own_gets_none(tmp_path):
    assert BaseModelChatTemplate("builtin:tiny")() == FALLBACK_CHAT_TEMPLATE
    own, bare = tmp_path / "own", tmp_path / "bare"
    for directory in (own, bare):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    (own / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert BaseModelChatTemplate(str(own))() is None  # vLLM renders with the model's own
    assert BaseModelChatTemplate(str(bare))() == FALLBACK_CHAT_TEMPLATE
    # Not on this host (vLLM in its own pods): nothing is sent, vLLM uses what the model has.
    assert BaseModelChatTemplate(str(tmp_path / "elsewhere"))() is None
    assert BaseModelChatTemplate("builtin:no-such-model")() is None


# --- the request vLLM gets ------------------------------------------------------------------------------------


def test_a_chat_request_asks_for_the_answer_in_the_template_without_a_second_bos():
    route, body = request("bot@v2", chat(("user", "q"), template="T"), Sampling(max_tokens=5, stop=("\n",)))
    assert route == "/v1/chat/completions"
    assert body["model"] == "bot@v2" and body["messages"] == [{"role": "user", "content": "q"}]
    assert body["chat_template"] == "T" and body["add_generation_prompt"] is True
    assert body["add_special_tokens"] is False  # the template writes BOS itself
    assert (body["max_tokens"], body["stop"], body["stream"]) == (5, ["\n"], True)
    assert body["stream_options"] == {"include_usage": True}
    _, own = request("base", chat(("user", "q")), Sampling())
    assert "chat_template" not in own  # the model's own template renders it
    route, text = request("base", "q", Sampling())
    assert route == "/v1/completions" and text["prompt"] == "q" and "messages" not in text


def test_logprobs_are_asked_for_in_each_api_s_own_shape():
    _, completion = request("base", "q", Sampling(logprobs=True))
    _, conversation = request("base", chat(("user", "q")), Sampling(logprobs=True))
    assert completion["logprobs"] == 0
    assert (conversation["logprobs"], conversation["top_logprobs"]) == (True, 0)


# --- the stream vLLM answers ----------------------------------------------------------------------------------


def _sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


CHAT_STREAM = _sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "is."}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}},
    "[DONE]",
)


def _api(body: bytes, status: int = 200, seen: list | None = None) -> HttpVllmApi:
    def handle(req: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append((req.url.path, json.loads(req.content)))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    return HttpVllmApi(URL, transport=httpx.MockTransport(handle))


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


def test_a_chat_stream_becomes_the_same_chunks_and_completion_as_a_prompt_s():
    seen: list = []
    api = _api(CHAT_STREAM, seen=seen)

    async def go():
        try:
            chunks = [c async for c in api.stream("base", chat(("user", "q"), template="T"), Sampling())]
            done = await api.complete("base", chat(("user", "q")), Sampling())
        finally:
            await api.close()
        return chunks, done

    chunks, done = _run(go())
    assert [c.text for c in chunks] == ["Par", "is.", ""]  # the empty role delta is no chunk
    assert (chunks[-1].finish_reason, chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == ("stop", 11, 3)
    assert (done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("Paris.", "stop", 11, 3)
    assert 0 < done.first_token_seconds <= done.latency_seconds
    assert [path for path, _ in seen] == ["/v1/chat/completions"] * 2
    assert seen[0][1]["chat_template"] == "T" and "chat_template" not in seen[1][1]


def test_chat_logprobs_are_read_from_their_content_list():
    stream = _sse(
        {"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [{"token": "a", "logprob": -0.25}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
        "[DONE]",
    )
    api = _api(stream)

    async def go():
        try:
            return await api.complete("base", chat(("user", "q")), Sampling(logprobs=True, max_tokens=1))
        finally:
            await api.close()

    done = _run(go())
    assert (done.text, done.token_logprobs, done.finish_reason) == ("a", (-0.25,), "length")


@pytest.mark.parametrize(
    ("message", "error", "why"),
    [
        (
            "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request "
            "with untrusted chat template.",
            FailedPrecondition,
            "CHAT_TEMPLATE_UNTRUSTED",
        ),
        (
            "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
            "template if the tokenizer does not define one.",
            FailedPrecondition,
            "NO_CHAT_TEMPLATE",
        ),
        ("Conversation roles must alternate user/assistant/user/assistant/...", InvalidArgument, "INVALID_ARGUMENT"),
    ],
)
def test_vllm_refusing_a_chat_is_the_fleet_s_fault_or_the_caller_s(message, error, why):
    api = _api(json.dumps({"error": {"message": message, "code": 400}}).encode(), status=400)

    async def go():
        try:
            await api.complete("base", chat(("user", "q")), Sampling())
        finally:
            await api.close()

    with pytest.raises(error) as err:
        _run(go())
    assert err.value.reason == why


def test_a_stream_event_that_is_not_an_object_is_a_vllm_error():
    api = _api(_sse("[1, 2]", "[DONE]"))

    async def go():
        try:
            await api.complete("base", chat(("user", "q")), Sampling())
        finally:
            await api.close()

    with pytest.raises(Unavailable) as err:
        _run(go())
    assert err.value.reason == "VLLM_ERROR"


# --- a chat through the proxy ---------------------------------------------------------------------------------


@run_async
async def test_a_chat_is_routed_like_a_prompt_and_carries_the_base_model_s_template(env):
    env.publish("echo")
    await env.manager.deploy("adapters/echo")
    env.proxy.chat_template = lambda: "FALLBACK"
    env.proxy.telemetry = recorder = RecordingTelemetry()
    conversation = chat(("system", "be brief"), ("user", "capital of France?"))
    done = await env.proxy.generate(conversation, "echo", Sampling())
    assert done.served_model == "echo@v1" and done.completion.text == "[echo@v1] capital of France?"
    streamed = [c async for c, _, name in env.proxy.stream(conversation, "", Sampling())]
    assert "".join(c.text for c in streamed) == "[base] capital of France?"
    sent = [p for fake in env.replicas for p in fake.prompts if isinstance(p, Chat)]
    assert len(sent) == 2 and all(p.template == "FALLBACK" and p.messages == conversation.messages for p in sent)
    assert not env.proxy.in_flight
    unary, stream = recorder.requests  # the same per-request metrics as a prompt's
    assert (unary.adapter, unary.served_model, unary.ok, unary.completion_tokens) == ("echo", "echo@v1", True, 64)
    assert (stream.adapter, stream.ok) == ("", True) and 0 < stream.first_token_seconds <= stream.latency_seconds


@run_async
async def test_a_bad_chat_reaches_no_vllm(env):
    with pytest.raises(InvalidArgument) as err:
        await env.proxy.generate(chat(("user", "q"), ("assistant", "a")), "", Sampling())
    assert reason(err) == "INVALID_ARGUMENT"
    assert not [p for fake in env.replicas for p in fake.prompts]


def test_the_service_s_own_vllm_trusts_the_template_a_chat_carries(tmp_path):
    from layercard_service.serving.vllm_process import VllmServerSettings

    settings = VllmServerSettings(model=tmp_path, served_model_name="m")
    assert "--trust-request-chat-template" in settings.command(8000)
    off = VllmServerSettings(model=tmp_path, served_model_name="m", trust_request_chat_template=False)
    assert "--trust-request-chat-template" not in off.command(8000)
