"""The seam to one vLLM server: its admin routes (models, runtime LoRA load/unload), its completions and its chat
completions APIs.

``VllmApi`` is the small interface the fleet and the inference proxy use; ``HttpVllmApi`` is the real one over
vLLM's OpenAI-compatible HTTP server. Connection failures of idempotent calls (listing models) are retried a
few times; completions and load/unload are not (a retried completion would run twice). Every failure becomes
one of the service's errors: a server that cannot be reached is UNAVAILABLE with a retry hint.

A prompt (``str``) goes to ``/v1/completions``; a conversation (``Chat``) to ``/v1/chat/completions``, streamed
the same way: both become the same ``CompletionChunk`` stream, so the proxy, its routing and its metrics do not
tell them apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from layercard_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LayercardError,
    NotFound,
    Unavailable,
)
from layercard_service.serving.chat import Chat

__all__ = ["Completion", "CompletionChunk", "HttpVllmApi", "Sampling", "ServedModel", "VllmApi", "chunks_of", "request"]

RUNTIME_LORA_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Service-internal (the deploy probes): the chosen token's log-probability, and a fixed output length.
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("sampling.max_tokens", 1 <= self.max_tokens <= 32_768, "must be in 1..32768"),
            ("sampling.temperature", 0.0 <= self.temperature <= 10.0, "must be in 0..10"),
            ("sampling.top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("sampling.top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("sampling.stop", len(self.stop) <= 8 and all(self.stop), "at most 8 non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidArgument.field(name, f"{rule}, got {getattr(self, name.split('.')[1])!r}")

    def body(self, chat: bool = False) -> dict:
        """The sampling fields of a completions request, or of a chat completions request with ``chat``."""
        body: dict = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.top_k:
            body["top_k"] = self.top_k
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.logprobs:  # only the sampled token's own log-probability
            body.update({"logprobs": True, "top_logprobs": 0} if chat else {"logprobs": 0})
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


@dataclass(frozen=True)
class ServedModel:
    name: str
    parent: str | None  # the base model's name for a LoRA adapter; None for the base model
    path: str = ""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    first_token_seconds: float
    latency_seconds: float
    token_logprobs: tuple[float, ...] = ()  # with Sampling.logprobs


@dataclass(frozen=True)
class CompletionChunk:
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_logprobs: tuple[float, ...] = ()


class VllmApi(ABC):
    """One vLLM server. ``url`` names it in errors and responses."""

    url: str

    @abstractmethod
    async def models(self, timeout: float | None = None) -> list[ServedModel]: ...

    @abstractmethod
    async def complete(self, model: str, prompt: str | Chat, sampling: Sampling) -> Completion: ...

    @abstractmethod
    def stream(self, model: str, prompt: str | Chat, sampling: Sampling) -> AsyncIterator[CompletionChunk]: ...

    @abstractmethod
    async def load_adapter(self, name: str, path: str) -> None: ...

    @abstractmethod
    async def unload_adapter(self, name: str) -> None: ...

    async def close(self) -> None:  # optional: only implementations holding resources override it
        return None


def _unavailable(url: str, exc: Exception) -> Unavailable:
    return Unavailable(
        f"vLLM server {url} cannot be reached: {type(exc).__name__}",
        reason="VLLM_UNAVAILABLE",
        metadata={"replica": url},
        retry_after=2.0,
    )


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message", error))[:500]
        return str(error)[:500]
    return str(payload)[:500]


def request(model: str, prompt: str | Chat, sampling: Sampling) -> tuple[str, dict]:
    """The route and streaming body of one completion: a prompt's, or a conversation's in its chat template."""
    body: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if isinstance(prompt, str):
        return "/v1/completions", {**body, "prompt": prompt, **sampling.body()}
    body["messages"] = [{"role": m.role, "content": m.content} for m in prompt.messages]
    # The answer is the assistant's next turn. The template emits BOS itself where the model wants one, so the
    # tokenizer adds none (vLLM's default for chat, written out: a doubled BOS changes what the model sees).
    body.update(add_generation_prompt=True, add_special_tokens=False)
    if prompt.template is not None:
        body["chat_template"] = prompt.template
    return "/v1/chat/completions", {**body, **sampling.body(chat=True)}


def chunks_of(event: dict, finish: str) -> tuple[list[CompletionChunk], str]:
    """The chunks of one stream event of either API, and the finish reason so far.

    A completions choice has ``text`` and ``logprobs.token_logprobs``; a chat choice has ``delta.content`` and
    ``logprobs.content[].logprob``. The usage (``include_usage``) comes last, in an event without choices."""
    chunks = []
    for choice in event.get("choices") or []:
        finish = choice.get("finish_reason") or finish
        logprobs = choice.get("logprobs") or {}
        if "delta" in choice:
            text = (choice.get("delta") or {}).get("content") or ""
            values = tuple(t.get("logprob", 0.0) for t in logprobs.get("content") or ())
        else:
            text = choice.get("text") or ""
            values = tuple(logprobs.get("token_logprobs") or ())
        if text or values:
            chunks.append(CompletionChunk(text, token_logprobs=values))
    usage = event.get("usage") or {}
    if usage:
        chunks.append(CompletionChunk("", finish, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
    return chunks, finish


# vLLM's 400s for a chat it cannot render as asked: the fleet's settings, not the caller's request, are wrong.
_TEMPLATE_REFUSALS = (
    ("--trust-request-chat-template", "CHAT_TEMPLATE_UNTRUSTED", "start vLLM with --trust-request-chat-template"),
    ("provide a chat template", "NO_CHAT_TEMPLATE", "the base model has no chat template; check --vllm-model"),
)


def _raise_for(url: str, response: httpx.Response, model: str = "") -> None:
    if response.status_code < 400:
        return
    message = _error_message(response)
    metadata = {"replica": url, "status": str(response.status_code)}
    if response.status_code == 404 and model and model in message:
        raise NotFound(f"vLLM server {url} does not serve {model!r}", reason="MODEL_NOT_SERVED", metadata=metadata)
    for marker, reason, hint in _TEMPLATE_REFUSALS:
        if response.status_code == 400 and marker in message:
            raise FailedPrecondition(
                f"vLLM server {url} cannot render the chat: {hint}", reason=reason, metadata=metadata
            )
    if response.status_code == 400:
        raise InvalidArgument(f"vLLM server {url} refused the request: {message}", metadata=metadata)
    if response.status_code >= 500:
        raise Unavailable(
            f"vLLM server {url} failed: {message}", reason="VLLM_ERROR", metadata=metadata, retry_after=2.0
        )
    raise LayercardError(f"vLLM server {url} answered {response.status_code}: {message}", metadata=metadata)


# vLLM's server (uvicorn) closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). A pool that keeps
# idle connections as long (httpx's default) races that close: a request sent as the server drops the connection
# fails mid-request (it cost a bench.serving run one request at 16 streams). Idle connections are dropped a second
# before the server would drop them; shorter only opens more connections.
KEEPALIVE_SECONDS = 4.0


class HttpVllmApi(VllmApi):
    def __init__(
        self,
        url: str,
        timeout_seconds: float = 30.0,
        retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: an in-memory vLLM
        keepalive_seconds: float = KEEPALIVE_SECONDS,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_seconds, connect=5.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=keepalive_seconds),
            transport=transport,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def models(self, timeout: float | None = None) -> list[ServedModel]:
        extra = {"timeout": timeout} if timeout is not None else {}
        for attempt in range(self.retries + 1):  # idempotent: safe to retry a failed connection
            try:
                response = await self._client.get("/v1/models", **extra)
                break
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise _unavailable(self.url, exc) from exc
                await asyncio.sleep(0.2 * 2**attempt)
        _raise_for(self.url, response)
        try:
            return [ServedModel(m["id"], m.get("parent"), m.get("root", "")) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:  # something other than vLLM answers on that port
            raise Unavailable(
                f"{self.url} does not answer like a vLLM server: /v1/models is not a model list",
                reason="VLLM_ERROR",
                metadata={"replica": self.url},
                retry_after=2.0,
            ) from exc

    async def complete(self, model: str, prompt: str | Chat, sampling: Sampling) -> Completion:
        started = time.perf_counter()
        first = None
        chunks: list[str] = []
        logprobs: list[float] = []
        last = CompletionChunk("")
        async for chunk in self.stream(model, prompt, sampling):
            if first is None and chunk.text:
                first = time.perf_counter() - started
            chunks.append(chunk.text)
            logprobs.extend(chunk.token_logprobs)
            if chunk.finish_reason or chunk.completion_tokens:
                last = chunk
        latency = time.perf_counter() - started
        return Completion(
            text="".join(chunks),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            first_token_seconds=first if first is not None else latency,
            latency_seconds=latency,
            token_logprobs=tuple(logprobs),
        )

    async def stream(self, model: str, prompt: str | Chat, sampling: Sampling) -> AsyncIterator[CompletionChunk]:
        route, body = request(model, prompt, sampling)
        try:
            async with self._client.stream("POST", route, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(self.url, response, model)
                finish, done = "", False
                async for line in response.aiter_lines():
                    # After [DONE], read on to the end of the body (vLLM ends it there): a stream left unread
                    # cannot go back to the pool, and every request would pay for a new connection.
                    if done or not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        event = json.loads(data)
                    except ValueError as exc:
                        raise Unavailable(
                            f"vLLM server {self.url} sent a malformed stream event",
                            reason="VLLM_ERROR",
                            metadata={"replica": self.url},
                        ) from exc
                    if not isinstance(event, dict):
                        raise Unavailable(
                            f"vLLM server {self.url} sent a stream event that is not an object",
                            reason="VLLM_ERROR",
                            metadata={"replica": self.url},
                        )
                    chunks, finish = chunks_of(event, finish)
                    for chunk in chunks:
                        yield chunk
        except (
            httpx.ConnectError,
            httpx.ConnectTimeout,
        ) as exc:  # never reached vLLM: safe for the caller to try another replica
            raise _unavailable(self.url, exc) from exc
        except httpx.TransportError as exc:  # reached vLLM, then lost it: the completion may have run
            raise Unavailable(
                f"lost the connection to vLLM server {self.url} mid-request: {type(exc).__name__}",
                reason="VLLM_CONNECTION_LOST",
                metadata={"replica": self.url},
                retry_after=2.0,
            ) from exc
        # Closing this iterator early closes the HTTP stream, and vLLM aborts the request.

    async def load_adapter(self, name: str, path: str) -> None:
        await self._admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._admin("/v1/unload_lora_adapter", {"lora_name": name})

    async def _admin(self, route: str, body: dict) -> None:
        try:
            response = await self._client.post(route, json=body)
        except httpx.TransportError as exc:
            raise _unavailable(self.url, exc) from exc
        if response.status_code == 404 and "lora" not in _error_message(response).lower():
            raise FailedPrecondition(
                f"vLLM server {self.url} has runtime LoRA updating disabled; start it with {RUNTIME_LORA_FLAG}=True",
                reason="RUNTIME_LORA_DISABLED",
                metadata={"replica": self.url, "setting": RUNTIME_LORA_FLAG},
            )
        if response.status_code == 400 and "already" in _error_message(response).lower():
            raise AlreadyExists(
                f"vLLM server {self.url} already has {body['lora_name']!r} loaded",
                reason="ADAPTER_ALREADY_LOADED",
                metadata={"replica": self.url},
            )
        _raise_for(self.url, response, body.get("lora_name", ""))
