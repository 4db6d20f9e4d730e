"""InferenceService through the layercard server to the real vLLM server: base model, an adapter, streaming, and
chats in the fallback chat template (builtin:tiny has none of its own)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from support.server_thread import ServerThread

from layercard.v1 import inference_pb2, inference_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.chat import FALLBACK_CHAT_TEMPLATE
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.serving.vllm_api import HttpVllmApi
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

ADAPTER = "e2e-echo"


@pytest.fixture(scope="module")
def inference(vllm_server, tmp_path_factory):
    # An adapter trained for a few steps to answer one fixed word, loaded into vLLM under a versioned name.
    model, tokenizer = load_model(builtin_model_path("tiny"))
    from layercard_service.data.jsonl import Example

    examples = [Example(prompt=f"word {i}:", completion=" zebra") for i in range(32)]
    peft_model = attach_lora(model, LoraSettings(rank=8, alpha=16.0, target_modules=("o_proj",), layers=(6, 7)))
    train_lora(peft_model, tokenizer, examples, TrainConfig(steps=60, batch_size=8, learning_rate=1e-2, seed=0))
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter_dir)

    async def load() -> None:
        api = HttpVllmApi(vllm_server.url)
        try:
            await api.load_adapter(f"{ADAPTER}@v1", str(adapter_dir))
        finally:
            await api.close()

    asyncio.run(load())
    state = tmp_path_factory.mktemp("state")
    config = ServiceConfig(port=0, log_format="text", vllm_urls=(vllm_server.url,), data_dir=state)
    with ServerThread(config) as running:
        with grpc.insecure_channel(running.address) as channel:
            running.stub = inference_pb2_grpc.InferenceServiceStub(channel)
            running.vllm_url = vllm_server.url
            running.served_name = vllm_server.settings.served_model_name
            yield running


def generate(server, prompt="The module", adapter="", **sampling) -> inference_pb2.GenerateResponse:
    sampling.setdefault("max_tokens", 8)
    request = inference_pb2.GenerateRequest(
        prompt=prompt, adapter=adapter, sampling=inference_pb2.SamplingParams(**sampling)
    )
    return server.stub.Generate(request, timeout=120)


def test_generate_with_the_base_model(inference):
    first = generate(inference)
    assert first.served_model == inference.served_name and first.replica == inference.vllm_url
    assert first.finish_reason in ("stop", "length")
    assert 1 <= first.usage.completion_tokens <= 8 and first.usage.prompt_tokens > 0
    assert 0 < first.time_to_first_token_ms <= first.latency_ms
    assert generate(inference).text == first.text  # greedy by default: deterministic


def test_generate_through_an_adapter_resolves_its_newest_version(inference):
    tuned = generate(inference, prompt="word 3:", adapter=ADAPTER, max_tokens=8)
    base = generate(inference, prompt="word 3:", max_tokens=8)
    assert tuned.served_model == f"{ADAPTER}@v1"
    # The adapter (60 steps on two blocks' o_proj) starts the word it was trained on; the base model does not.
    assert tuned.text.startswith(" zeb") and not base.text.startswith(" zeb")


def test_generate_stream_streams_the_same_text(inference):
    request = inference_pb2.GenerateStreamRequest(
        prompt="The module", sampling=inference_pb2.SamplingParams(max_tokens=12)
    )
    chunks = list(inference.stub.GenerateStream(request, timeout=120))
    assert len([c for c in chunks if c.text]) >= 2  # more than one piece: it streams
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1
    assert "".join(c.text for c in chunks) == generate(inference, max_tokens=12).text


def test_a_cancelled_stream_leaves_the_server_serving(inference):
    request = inference_pb2.GenerateStreamRequest(
        prompt="The module", sampling=inference_pb2.SamplingParams(max_tokens=400, temperature=1.0, seed=1)
    )
    call = inference.stub.GenerateStream(request, timeout=120)
    assert next(call).served_model == inference.served_name
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert generate(inference).finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(adapter="not-deployed"), grpc.StatusCode.NOT_FOUND),
        (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests(inference, fields, code):
    with pytest.raises(grpc.RpcError) as err:
        generate(inference, **fields)
    assert err.value.code() == code, err.value.details()
    assert generate(inference).usage.completion_tokens >= 1  # still serving


CHAT = [("system", "Be brief."), ("user", "The module")]


def _rendered_tokens() -> list[int]:
    """The conversation's tokens as training renders it: the fallback template, whose BOS is the only one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("tiny"))
    messages = [{"role": role, "content": content} for role, content in CHAT]
    text = tokenizer.apply_chat_template(
        messages, chat_template=FALLBACK_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    return ids


@pytest.mark.parametrize("adapter", ["", ADAPTER])
def test_chat_unary_and_streamed_in_the_fallback_template(inference, adapter):
    expected_tokens = len(_rendered_tokens())
    messages = [inference_pb2.ChatMessage(role=role, content=content) for role, content in CHAT]
    sampling = inference_pb2.SamplingParams(max_tokens=8)
    unary = inference.stub.Generate(
        inference_pb2.GenerateRequest(messages=messages, adapter=adapter, sampling=sampling), timeout=120
    )
    served = f"{ADAPTER}@v1" if adapter else inference.served_name
    assert unary.served_model == served and unary.replica == inference.vllm_url
    assert unary.finish_reason in ("stop", "length") and 1 <= unary.usage.completion_tokens <= 8
    # vLLM rendered the same template (the request carried it) and added no BOS of its own on top.
    assert unary.usage.prompt_tokens == expected_tokens
    assert 0 < unary.time_to_first_token_ms <= unary.latency_ms
    request = inference_pb2.GenerateStreamRequest(messages=messages, adapter=adapter, sampling=sampling)
    chunks = list(inference.stub.GenerateStream(request, timeout=120))
    assert all(c.served_model == served for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.prompt_tokens == expected_tokens
    assert "".join(c.text for c in chunks) == unary.text  # greedy: the stream says what the unary call said


def test_cli_generate_plain_and_streamed(inference, capsys):
    from layercard_client.cli import main

    assert main(["--address", inference.address, "generate", "word 3:", "--adapter", ADAPTER, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith(" zeb")
    assert main(["--address", inference.address, "generate", "The module", "--stream", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--address", inference.address, "generate", "--chat", "The module", "--max-tokens", "4"]) == 0
    assert "finish" in capsys.readouterr().err
