"""Inference through the fleet: pick a healthy replica that serves the model or adapter, and call it.

Replicas are tried in round-robin order; one that cannot be reached is skipped for this request. What a
replica serves comes from its ``/v1/models`` (cached for a second: it is checked on every request).

Routing: an adapter the service deploys goes to the version its deployment routes it to (``Routes``), so a
version being loaded and verified gets no traffic until it passes; an adapter the service knows but has not
deployed is not served. An adapter loaded into vLLM by someone else resolves to its newest loaded version,
``id@vN``, or to the id itself when it was loaded unversioned. Requests in flight are counted per served name,
so that a version swap can wait for the old version's requests to finish before unloading it.

A request is a prompt (``str``) or a conversation (``Chat``): both take the same routes, retries and metrics. A
conversation leaves here with the chat template the base model needs sent along (``BaseModelChatTemplate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from layercard_service.errors import FailedPrecondition, InvalidArgument, LayercardError, NotFound, Unavailable
from layercard_service.serving.chat import Chat, check_chat
from layercard_service.serving.vllm_api import Completion, CompletionChunk, Sampling, ServedModel, VllmApi
from layercard_service.telemetry import RequestRecord, Telemetry

__all__ = ["Generated", "InferenceProxy", "Routes", "resolve_served_name", "served_id"]

log = logging.getLogger(__name__)

MODELS_CACHE_SECONDS = 1.0
MAX_PROMPT_CHARS = 1_000_000
# "{id}@v{n}" as served_name() writes it. fullmatch and DOTALL: an id with a newline in it (accepted by an older
# check) still parses, so the service still recognises, and can unload, a version it loaded under such an id.
_VERSION = re.compile(r"(?P<id>.+)@v(?P<n>[0-9]+)", re.DOTALL)


@dataclass(frozen=True)
class Generated:
    completion: Completion
    replica: str
    served_model: str


def served_id(name: str) -> str | None:
    """The adapter id of a versioned served name ("bot@v3" -> "bot"), or None."""
    match = _VERSION.fullmatch(name)
    return match["id"] if match else None


def resolve_served_name(models: Sequence[ServedModel], adapter: str) -> str | None:
    """The served name for ``adapter`` ("" = the base model) on a replica serving ``models``, or None."""
    if not adapter:
        return next((m.name for m in models if m.parent is None), None)
    versions = []
    for m in models:
        if m.parent is None:
            continue
        if m.name == adapter:
            versions.append((0, m.name))
        match = _VERSION.fullmatch(m.name)
        if match and match["id"] == adapter:
            versions.append((int(match["n"]), m.name))
    return max(versions)[1] if versions else None


class Routes:
    """Where each adapter the service manages is routed; ``managed`` says whether the service owns an id."""

    def __init__(self, managed: Callable[[str], bool] = lambda _id: False) -> None:
        self.served: dict[str, str] = {}  # adapter id -> served name of its routed version
        self.managed = managed

    def name_on(self, models: Sequence[ServedModel], adapter: str) -> str | None:
        if adapter in self.served:
            name = self.served[adapter]
            return name if any(m.name == name for m in models) else None
        if adapter and self.managed(adapter):
            return None  # known to the service but not deployed (or its first version not verified yet)
        owner = served_id(adapter)
        if owner is not None and (owner in self.served or self.managed(owner)):
            # A managed adapter's version asked for by name: only its routed version serves.
            return adapter if self.served.get(owner) == adapter and any(m.name == adapter for m in models) else None
        return resolve_served_name(models, adapter)


class InferenceProxy:
    def __init__(
        self,
        members: Callable[[], list[VllmApi]],
        routes: Routes | None = None,
        telemetry: Telemetry | None = None,
        chat_template: Callable[[], str | None] = lambda: None,
        pool_of: Callable[[str], str] = lambda _url: "",
    ) -> None:
        self._members = members
        self.pool_of = pool_of  # a replica URL's serving pool, for the records: a version compares with its pool's base
        self.chat_template = chat_template  # what a conversation's request carries as its chat_template
        self.routes = routes or Routes()
        self.telemetry = telemetry or Telemetry()
        self._turn = itertools.count()
        self._models: dict[str, tuple[float, list[ServedModel]]] = {}
        self.in_flight: Counter[str] = Counter()  # served name -> requests running on it, over every replica
        self.in_flight_at: Counter[tuple[str, str]] = Counter()  # (replica url, served name) -> requests running
        # Called with every finished request's record, after telemetry (the live latency judge listens here).
        self.observers: list[Callable[[RequestRecord], None]] = []

    @property
    def replicas(self) -> list[VllmApi]:
        return self._members()

    def forget(self, url: str) -> None:
        """Drops the cached model list of a replica (after a load or unload there)."""
        self._models.pop(url, None)

    async def drain(self, served_name: str, timeout: float, replicas: Sequence[str] | None = None) -> bool:
        """Waits until no request runs on ``served_name`` (on the ``replicas`` given by URL, else anywhere); False
        when some still do after ``timeout``."""
        deadline = time.monotonic() + timeout

        def running() -> int:
            if replicas is None:
                return self.in_flight[served_name]
            return sum(self.in_flight_at[(url, served_name)] for url in replicas)

        while running() > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()

    async def _served(self, replica: VllmApi) -> list[ServedModel]:
        cached = self._models.get(replica.url)
        if cached and time.monotonic() - cached[0] < MODELS_CACHE_SECONDS:
            return cached[1]
        models = await replica.models()
        self._models[replica.url] = (time.monotonic(), models)
        return models

    async def _candidates(self, adapter: str) -> AsyncIterator[tuple[VllmApi, str]]:
        """Replicas serving ``adapter``, starting from the next in turn; raises when none does."""
        if not self.replicas:
            raise FailedPrecondition(
                "no vLLM servers are configured, or none was discovered (--vllm-urls, --vllm-dns)",
                reason="NO_VLLM_SERVERS",
            )
        start = next(self._turn) % len(self.replicas)
        unreachable: list[str] = []
        found = False
        for replica in self.replicas[start:] + self.replicas[:start]:
            try:
                name = self.routes.name_on(await self._served(replica), adapter)
            except Unavailable:
                unreachable.append(replica.url)
                continue
            if name is not None:
                found = True
                yield replica, name
        if found:
            return
        if unreachable and len(unreachable) == len(self.replicas):
            raise Unavailable(
                f"no vLLM server can be reached ({', '.join(unreachable)})",
                reason="VLLM_UNAVAILABLE",
                retry_after=2.0,
                metadata={"replicas": ",".join(unreachable)},
            )
        raise NotFound(
            f"adapter {adapter!r} is not deployed on any reachable vLLM server",
            reason="ADAPTER_NOT_DEPLOYED",
            metadata={"adapter": adapter},
        )

    def _check(self, prompt: str | Chat) -> str | Chat:
        """The request as it goes to vLLM, after INVALID_ARGUMENT for a bad one."""
        if isinstance(prompt, Chat):
            check_chat(prompt.messages)
            return prompt if prompt.template is not None else replace(prompt, template=self.chat_template())
        if not prompt:
            raise InvalidArgument.field("prompt", "must not be empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument.field("prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
        return prompt

    def _release(self, name: str, url: str, error: str = "") -> None:
        """One attempt on one replica is over."""
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
        self.in_flight_at[(url, name)] -= 1
        if self.in_flight_at[(url, name)] <= 0:
            del self.in_flight_at[(url, name)]
        if error.startswith("VLLM_"):
            self.telemetry.upstream_error(url, error)

    def _record(
        self, adapter: str, name: str, url: str, error: str, first: float = 0.0, total: float = 0.0, tokens: int = 0
    ) -> None:
        """One caller's request is over: recorded once, however many replicas it tried."""
        if error and not name and adapter and adapter not in self.routes.served and not self.routes.managed(adapter):
            adapter = "unknown"  # a name nobody serves: keep the metrics' label values bounded
        record = RequestRecord(
            adapter, name, url, not error, first, total, tokens, error, self.pool_of(url) if url else ""
        )
        self.telemetry.request_finished(record)
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer's failure must not fail the request it observes
                log.exception("request observer failed")

    async def generate(self, prompt: str | Chat, adapter: str, sampling: Sampling) -> Generated:
        prompt = self._check(prompt)
        entered = time.perf_counter()
        try:
            generated, began = await self._generate(prompt, adapter, sampling)
        except BaseException as exc:
            self._record(adapter, "", "", _reason(exc))
            raise
        c = generated.completion
        waited = began - entered  # replica lookups and failed attempts: the caller waited for them too
        self._record(
            adapter,
            generated.served_model,
            generated.replica,
            "",
            waited + c.first_token_seconds,
            waited + c.latency_seconds,
            c.completion_tokens,
        )
        return generated

    async def _generate(self, prompt: str | Chat, adapter: str, sampling: Sampling) -> tuple[Generated, float]:
        last: Unavailable | None = None
        async for replica, name in self._candidates(adapter):
            self.in_flight[name] += 1  # counted before any await: a swap that routes away sees this request
            self.in_flight_at[(replica.url, name)] += 1
            began = time.perf_counter()
            try:
                completion = await replica.complete(name, prompt, sampling)
            except Unavailable as exc:
                self._release(name, replica.url, exc.reason)
                self._models.pop(replica.url, None)
                if exc.reason != "VLLM_UNAVAILABLE":
                    raise  # it reached vLLM: another try could run the completion twice
                last = exc  # never connected: try the next replica that serves it
                continue
            except BaseException as exc:
                self._release(name, replica.url, _reason(exc))
                raise
            self._release(name, replica.url)
            return Generated(completion, replica.url, name), began
        assert last is not None
        raise last

    async def stream(
        self, prompt: str | Chat, adapter: str, sampling: Sampling
    ) -> AsyncIterator[tuple[CompletionChunk, str, str]]:
        """Chunks with (replica, served name). Only a replica failing before its first chunk is retried."""
        prompt = self._check(prompt)
        entered = time.perf_counter()
        first, tokens, name, url, error = 0.0, 0, "", "", "CANCELLED"  # closed early unless it ends below
        try:
            async with contextlib.aclosing(self._stream(prompt, adapter, sampling)) as chunks:
                async for chunk, url, name in chunks:
                    if not first and chunk.text:
                        first = time.perf_counter() - entered
                    tokens = chunk.completion_tokens or tokens
                    yield chunk, url, name
            error = ""
        except Exception as exc:
            error = _reason(exc)
            raise
        finally:
            total = time.perf_counter() - entered
            self._record(adapter, name, url, error, first or total, total, tokens)

    async def _stream(
        self, prompt: str | Chat, adapter: str, sampling: Sampling
    ) -> AsyncIterator[tuple[CompletionChunk, str, str]]:
        last: Unavailable | None = None
        async for replica, name in self._candidates(adapter):
            self.in_flight[name] += 1
            self.in_flight_at[(replica.url, name)] += 1
            error, yielded = "CANCELLED", False
            try:
                async with contextlib.aclosing(replica.stream(name, prompt, sampling)) as chunks:
                    async for chunk in chunks:
                        yielded = True
                        yield chunk, replica.url, name
                error = ""
                return
            except Exception as exc:
                error = _reason(exc)
                if not isinstance(exc, Unavailable) or yielded or exc.reason != "VLLM_UNAVAILABLE":
                    raise
                self._models.pop(replica.url, None)
                last = exc
            finally:  # also when the caller cancels: the request no longer runs on this version
                self._release(name, replica.url, error)
        assert last is not None
        raise last


def _reason(exc: BaseException) -> str:
    if isinstance(exc, LayercardError):
        return exc.reason
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError | GeneratorExit) else type(exc).__name__.upper()
