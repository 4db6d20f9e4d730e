"""Inference through the fleet: pick a healthy replica that serves the model or adapter, and call it.

Replicas are tried in round-robin order; one that cannot be reached is skipped for this request. What a
replica serves comes from its ``/v1/models`` (cached for a second: it is checked on every request). An
adapter id resolves to its newest loaded version, ``id@vN``, or to the id itself when it was loaded unversioned.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from layercard_service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from layercard_service.serve.vllm_api import Completion, CompletionChunk, Sampling, ServedModel, VllmApi

__all__ = ["Generated", "InferenceProxy", "resolve_served_name"]

MODELS_CACHE_SECONDS = 1.0
MAX_PROMPT_CHARS = 1_000_000
_VERSION = re.compile(r"^(?P<id>.+)@v(?P<n>\d+)$")


@dataclass(frozen=True)
class Generated:
    completion: Completion
    replica: str
    served_model: str


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
        match = _VERSION.match(m.name)
        if match and match["id"] == adapter:
            versions.append((int(match["n"]), m.name))
    return max(versions)[1] if versions else None


class InferenceProxy:
    def __init__(self, replicas: Sequence[VllmApi]) -> None:
        self.replicas = list(replicas)
        self._turn = itertools.count()
        self._models: dict[str, tuple[float, list[ServedModel]]] = {}

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
            raise FailedPrecondition("no vLLM servers are configured (set --vllm-urls)", reason="NO_VLLM_SERVERS")
        start = next(self._turn) % len(self.replicas)
        unreachable: list[str] = []
        found = False
        for replica in self.replicas[start:] + self.replicas[:start]:
            try:
                name = resolve_served_name(await self._served(replica), adapter)
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

    @staticmethod
    def _check(prompt: str) -> None:
        if not prompt:
            raise InvalidArgument.field("prompt", "must not be empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument.field("prompt", f"must be at most {MAX_PROMPT_CHARS} characters")

    async def generate(self, prompt: str, adapter: str, sampling: Sampling) -> Generated:
        self._check(prompt)
        last: Unavailable | None = None
        async for replica, name in self._candidates(adapter):
            try:
                return Generated(await replica.complete(name, prompt, sampling), replica.url, name)
            except Unavailable as exc:  # try the next replica that serves it
                self._models.pop(replica.url, None)
                last = exc
        assert last is not None
        raise last

    async def stream(
        self, prompt: str, adapter: str, sampling: Sampling
    ) -> AsyncIterator[tuple[CompletionChunk, str, str]]:
        """Chunks with (replica, served name). Only a replica failing before its first chunk is retried."""
        self._check(prompt)
        last: Unavailable | None = None
        async for replica, name in self._candidates(adapter):
            started = False
            try:
                async for chunk in replica.stream(name, prompt, sampling):
                    started = True
                    yield chunk, replica.url, name
                return
            except Unavailable as exc:
                if started:
                    raise
                self._models.pop(replica.url, None)
                last = exc
        assert last is not None
        raise last
