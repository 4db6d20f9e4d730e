"""Chat Generate from the caller's side: the CLI and both clients, over real gRPC, to the real servicer and proxy,
with an in-memory vLLM at the seam that records the conversation it was sent (support/fakes.py)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from support.fakes import BASE, FakeVllm
from support.server_thread import ServerThread

from layercard_client import AsyncLayercardClient, LayercardClient
from layercard_client.cli import main
from layercard_service.api.inference import InferenceServicer
from layercard_service.server import Servicers
from layercard_service.serving.chat import Chat, ChatMessage
from layercard_service.serving.inference import InferenceProxy

TEMPLATE = "the base model's template"


@pytest.fixture
def served():
    fake = FakeVllm("http://vllm-fake:8000", [])
    proxy = InferenceProxy(lambda: [fake], chat_template=lambda: TEMPLATE)
    with ServerThread(servicers=Servicers(inference=InferenceServicer(proxy))) as running:
        running.fake = fake
        yield running


def sent(*turns: tuple[str, str]) -> Chat:
    return Chat(tuple(ChatMessage(role, content) for role, content in turns), TEMPLATE)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_chat_sends_the_prompt_as_the_user_s_message(served, capsys):
    code, out, err = run(capsys, "--address", served.address, "generate", "--chat", "capital of France?")
    assert code == 0, err
    assert out == "[base] capital of France?\n" and BASE in err
    assert served.fake.prompts == [sent(("user", "capital of France?"))]


def test_cli_system_and_earlier_turns_come_first_in_order_and_stream(served, capsys):
    argv = ["--address", served.address, "generate", "--system", "be brief", "--message", "user:hi"]
    argv += ["--message", "assistant:hello: how can I help?", "two plus two?", "--stream"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out == "[base] two plus two?\n"
    conversation = [("system", "be brief"), ("user", "hi"), ("assistant", "hello: how can I help?")]
    assert served.fake.prompts == [sent(*conversation, ("user", "two plus two?"))]


def test_cli_messages_alone_are_the_whole_chat_and_stdin_feeds_a_bare_chat(served, capsys, monkeypatch):
    assert run(capsys, "--address", served.address, "generate", "--message", "user:only this")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    code, out, _ = run(capsys, "--address", served.address, "--json", "generate", "--chat")
    assert code == 0 and json.loads(out)["text"] == "[base] from stdin"
    assert served.fake.prompts == [sent(("user", "only this")), sent(("user", "from stdin"))]
    # Without a chat flag the prompt is completed as is, as before.
    assert run(capsys, "--address", served.address, "generate", "raw text")[1] == "[base] raw text\n"
    assert served.fake.prompts[-1] == "raw text"


def test_cli_a_bad_turn_is_a_usage_error_or_the_server_s_invalid_argument(served, capsys):
    assert run(capsys, "--address", served.address, "generate", "--message", "no colon")[0] == 2
    code, _, err = run(capsys, "--address", served.address, "generate", "--message", "robot:beep", "hi")
    assert code != 0 and "INVALID_ARGUMENT" in err and "messages[0].role" in err
    assert served.fake.prompts == []


def test_both_clients_take_messages_as_pairs_dicts_or_chat_messages(served):
    from layercard.v1 import inference_pb2

    turns = [("system", "s"), {"role": "user", "content": "q1"}, inference_pb2.ChatMessage(role="user", content="q2")]
    with LayercardClient(served.address) as client:
        assert client.generate(messages=turns).text == "[base] q2"
        assert "".join(c.text for c in client.generate_stream(messages=turns)) == "[base] q2"

    async def go() -> str:
        async with AsyncLayercardClient(served.address) as client:
            answer = await client.generate(messages=[("user", "async")])
            return answer.text + "|" + "".join([c.text async for c in client.generate_stream(messages=[("user", "s")])])

    assert asyncio.run(go()) == "[base] async|[base] s"
    expected = sent(("system", "s"), ("user", "q1"), ("user", "q2"))
    assert served.fake.prompts == [expected, expected, sent(("user", "async")), sent(("user", "s"))]
    with LayercardClient(served.address) as client, pytest.raises(TypeError):
        client.generate(messages=["just a string"])
