"""InferenceService: proto <-> domain conversion only."""

from __future__ import annotations

import asyncio

from layercard.v1 import inference_pb2, inference_pb2_grpc
from layercard_service.errors import DeadlineExceeded, InvalidArgument
from layercard_service.serving.chat import Chat, ChatMessage
from layercard_service.serving.inference import InferenceProxy
from layercard_service.serving.vllm_api import Sampling

__all__ = ["InferenceServicer", "prompt_from_proto", "sampling_from_proto"]


def sampling_from_proto(message: inference_pb2.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=message.max_tokens or 64,
        temperature=message.temperature,
        top_p=message.top_p or 1.0,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
    )


def prompt_from_proto(request: inference_pb2.GenerateRequest | inference_pb2.GenerateStreamRequest) -> str | Chat:
    """The prompt, or the conversation: exactly one of the two is set."""
    if not request.messages:
        if not request.prompt:
            raise InvalidArgument.field("prompt", "must not be empty (or give messages instead)")
        return request.prompt
    if request.prompt:
        raise InvalidArgument.field("messages", "must be empty when prompt is set: give one of prompt or messages")
    return Chat(tuple(ChatMessage(m.role, m.content) for m in request.messages))


def _deadline(context) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return remaining if remaining is not None and remaining < 1e6 else None


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, proxy: InferenceProxy) -> None:
        self.proxy = proxy

    async def Generate(self, request: inference_pb2.GenerateRequest, context) -> inference_pb2.GenerateResponse:
        prompt, sampling = prompt_from_proto(request), sampling_from_proto(request.sampling)
        try:
            # The caller's deadline reaches vLLM: past it the HTTP request is closed, which aborts it there.
            async with asyncio.timeout(_deadline(context)):
                result = await self.proxy.generate(prompt, request.adapter, sampling)
        except TimeoutError as exc:
            raise DeadlineExceeded("the deadline passed before vLLM answered", reason="DEADLINE_EXCEEDED") from exc
        c = result.completion
        return inference_pb2.GenerateResponse(
            text=c.text,
            finish_reason=c.finish_reason,
            usage=inference_pb2.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
            replica=result.replica,
            served_model=result.served_model,
            time_to_first_token_ms=c.first_token_seconds * 1000.0,
            latency_ms=c.latency_seconds * 1000.0,
        )

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest, context):
        prompt, sampling = prompt_from_proto(request), sampling_from_proto(request.sampling)
        # A cancelled call cancels this coroutine, which closes the upstream HTTP stream: vLLM stops generating.
        async for chunk, replica, served in self.proxy.stream(prompt, request.adapter, sampling):
            usage = None
            if chunk.completion_tokens or chunk.prompt_tokens:
                usage = inference_pb2.Usage(
                    prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
                )
            yield inference_pb2.GenerateStreamResponse(
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                usage=usage,
                replica=replica,
                served_model=served,
            )
