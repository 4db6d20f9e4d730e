"""Fakes at the project's seams, shared by the test folders: one definition each, imported as ``support.fakes``.

- ``FakeVllm`` (the VllmApi seam): one vLLM server in memory; ``ListDiscovery`` a fleet whose members a test sets;
- ``RecordingRunner`` (the JobRunner seam): runs nothing, records what it was asked;
- ``RecordingTelemetry`` (the Telemetry seam): keeps the records the domain reports instead of exporting them.

Each ``FakeVllm`` keeps the adapters it has loaded and appends every call to a log the test shares between
servers, with the route of the adapter under test at the time of the call, so the order of a version swap (load,
route, drain, unload) can be read back. The latency a fake reports is made up, not slept: the probes only read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from layercard_service.errors import AlreadyExists, LayercardError, NotFound, Unavailable
from layercard_service.runners.local import JobRunner
from layercard_service.serving.chat import Chat
from layercard_service.serving.fleet import Discovery
from layercard_service.serving.vllm_api import Completion, CompletionChunk, Sampling, ServedModel, VllmApi
from layercard_service.telemetry import JobOutcome, RequestRecord, Telemetry

__all__ = ["BASE", "BASE_LATENCY", "FakeVllm", "ListDiscovery", "RecordingRunner", "RecordingTelemetry"]

BASE = "base-model"  # the base model's served name on every FakeVllm
BASE_LATENCY = 0.1  # seconds a fake reports for one base-model completion


class FakeVllm(VllmApi):
    """One vLLM server in memory. The switches below make it misbehave the ways the deploy must handle."""

    def __init__(self, url: str, log: list[tuple]) -> None:
        self.url = url
        self.log = log  # (call, url, served name, route of the watched adapter at that moment)
        self.route: Callable[[], str | None] = lambda: None
        self.loaded: dict[str, str] = {}  # served name -> path
        self.down = False  # every call raises Unavailable
        self.hang = False  # models() never answers
        self.models_error: Exception | None = None  # models() raises it (HttpVllmApi: ValueError on a non-JSON body)
        self.load_error: LayercardError | None = None  # load_adapter raises it (after logging the call)
        self.no_effect: set[str] = set()  # served names that answer exactly like the base model
        self.adapter_latency_factor = 1.0  # adapter completions report this times the base latency
        self.same_text = False  # adapters answer with the base model's text (their log-probabilities still differ)
        self.gates: dict[str, asyncio.Event] = {}  # completions on a served name wait for its event
        self.load_gates: dict[str, asyncio.Event] = {}  # loads of a served name wait for its event
        self.prompts: list[str | Chat] = []  # every completion's prompt or conversation, as it arrived

    def _call(self, call: str, name: str = "") -> None:
        if self.down:
            raise Unavailable(f"{self.url} is down", reason="VLLM_UNAVAILABLE", retry_after=1.0)
        self.log.append((call, self.url, name, self.route()))

    async def models(self, timeout: float | None = None) -> list[ServedModel]:
        if self.hang:
            await asyncio.Event().wait()
        self._call("models")
        if self.models_error is not None:
            raise self.models_error
        return [ServedModel(BASE, None), *(ServedModel(n, BASE, p) for n, p in self.loaded.items())]

    async def complete(self, model: str, prompt: str | Chat, sampling: Sampling) -> Completion:
        self._call("complete", model)
        self.prompts.append(prompt)
        if model != BASE and model not in self.loaded:
            raise NotFound(f"{self.url} does not serve {model!r}", reason="MODEL_NOT_SERVED")
        if model in self.gates:
            await self.gates[model].wait()
        self.log.append(("completed", self.url, model, self.route()))
        adapted = model != BASE and model not in self.no_effect
        tokens = sampling.max_tokens
        logprobs = tuple(-0.5 if adapted else -1.0 for _ in range(tokens)) if sampling.logprobs else ()
        latency = BASE_LATENCY * (self.adapter_latency_factor if model != BASE else 1.0)
        said = prompt if isinstance(prompt, str) else prompt.messages[-1].content  # a chat: echo its question
        text = f"[{model}] {said}" if adapted and not self.same_text else f"[base] {said}"
        return Completion(text, "length", len(said), tokens, latency / 4, latency, logprobs)

    async def stream(self, model: str, prompt: str | Chat, sampling: Sampling) -> AsyncIterator[CompletionChunk]:
        done = await self.complete(model, prompt, sampling)
        yield CompletionChunk(done.text, token_logprobs=done.token_logprobs)
        yield CompletionChunk("", done.finish_reason, done.prompt_tokens, done.completion_tokens)

    async def load_adapter(self, name: str, path: str) -> None:
        self._call("load", name)
        if name in self.load_gates:
            await self.load_gates[name].wait()
        if self.load_error is not None:
            raise self.load_error
        if name in self.loaded:
            raise AlreadyExists(f"{name} is loaded", reason="ADAPTER_ALREADY_LOADED")
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._call("unload", name)
        if name not in self.loaded:
            raise NotFound(f"{name} is not loaded", reason="MODEL_NOT_SERVED")
        del self.loaded[name]


class ListDiscovery(Discovery):
    """Discovery whose answer a test changes (replicas joining and leaving)."""

    def __init__(self, urls: list[str]) -> None:
        self.current = list(urls)

    async def urls(self) -> list[str]:
        return list(self.current)


class RecordingRunner(JobRunner):
    """Runs nothing: jobs stay QUEUED until cancelled (which ends a queued job at once); records every call."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.forgotten: list[str] = []

    def start(self) -> None: ...

    def submit(self, job_id: str) -> None:
        self.submitted.append(job_id)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def close(self) -> None: ...

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)


class RecordingTelemetry(Telemetry):
    """Keeps what the domain reports: ended jobs and finished inference requests."""

    def __init__(self) -> None:
        self.outcomes: list[JobOutcome] = []
        self.requests: list[RequestRecord] = []

    def job_ended(self, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)

    def request_finished(self, record: RequestRecord) -> None:
        self.requests.append(record)
