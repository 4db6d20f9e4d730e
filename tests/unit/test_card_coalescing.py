"""Identical concurrent ComputeLayerCard requests share one computation (control/cards.py).

The card engine (``card.engine.compute_card``, called through card.run) is replaced by a gated
fake, so each test decides when the computation ends; the card it returns is a real one of the built-in model,
computed once.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from layercard_service.card_engine import engine as card_engine
from layercard_service.card_engine.run import compute_with_engine
from layercard_service.control.cards import CardProgress, CardService, StoredCard
from layercard_service.data.sources import DatasetRequest
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings
from layercard_service.errors import Cancelled, ResourceExhausted
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.persistence.store import Store

SETTINGS = CardSettings(probe_size=8, max_seq_len=32)
DATASET = DatasetRequest(builtin="builtin:cipher")


@pytest.fixture(scope="module")
def real_card():
    examples = get_task("builtin:cipher").train[:8]
    model, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    return card_engine.compute_card(model, tokenizer, examples, SETTINGS, "builtin:tiny", lambda *_: None, None)


class GatedEngine:
    """Reports half-way, then waits for ``gate`` (or the cancel flag) before returning the card."""

    def __init__(self, card) -> None:
        self.card, self.calls, self.cancelled = card, 0, 0
        self.gate = threading.Event()

    def __call__(self, model, tokenizer, examples, settings, name, report, cancel):
        self.calls += 1
        report("probe", 0.5, "half way")
        while not self.gate.wait(0.01):
            if cancel.is_set():
                self.cancelled += 1
                raise Cancelled("the card computation was cancelled", reason="CANCELLED")
        report("probe", 1.0, "done")
        return self.card


@pytest.fixture
def engine(real_card, monkeypatch):
    gated = GatedEngine(real_card)
    monkeypatch.setattr(card_engine, "compute_card", gated)
    return gated


def _service(tmp_path, queue_size=4) -> CardService:
    return CardService(Store(tmp_path), compute_with_engine, (), (), max_concurrent=1, queue_size=queue_size)


async def _until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.005)


async def _drain(events) -> list[CardProgress | StoredCard]:
    return [event async for event in events]


def _run(body):
    return asyncio.run(asyncio.wait_for(body(), timeout=60))


def test_identical_concurrent_requests_share_one_computation(tmp_path, engine):
    service = _service(tmp_path)

    async def body():
        first = asyncio.ensure_future(_drain(service.compute("builtin:tiny", DATASET, SETTINGS)))
        await _until(lambda: engine.calls == 1, "the first computation's start")
        second = service.compute("builtin:tiny", DATASET, SETTINGS, force=True)  # forced: joins all the same
        joined = await second.__anext__()
        assert service.in_progress == 1  # admitted once
        engine.gate.set()
        return await first, [joined, *await _drain(second)]

    first, second = _run(body)
    assert engine.calls == 1 and service.computations_started == 1
    for events in (first, second):
        assert isinstance(events[-1], StoredCard) and not events[-1].from_store
        assert [e.fraction for e in events[:-1] if isinstance(e, CardProgress)][-1] == 1.0
    assert first[-1].name == second[-1].name
    assert second[0].fraction == 0.5  # the joiner starts from the latest progress
    assert service.in_progress == 0


def test_admission_counts_a_shared_computation_once(tmp_path, engine):
    service = _service(tmp_path, queue_size=0)  # room for exactly one computation

    async def body():
        first = asyncio.ensure_future(_drain(service.compute("builtin:tiny", DATASET, SETTINGS)))
        await _until(lambda: engine.calls == 1, "the first computation's start")
        same = service.compute("builtin:tiny", DATASET, SETTINGS)
        joined = await same.__anext__()  # joins the running computation: no second admission
        other = service.compute("builtin:tiny", DATASET, CardSettings(probe_size=8, max_seq_len=32, seed=1))
        with pytest.raises(ResourceExhausted):
            await other.__anext__()
        engine.gate.set()
        return await first, [joined, *await _drain(same)]

    first, same = _run(body)
    assert first[-1].name == same[-1].name and engine.calls == 1


def test_a_caller_leaving_does_not_cancel_while_another_waits(tmp_path, engine):
    service = _service(tmp_path)

    async def body():
        leaving = service.compute("builtin:tiny", DATASET, SETTINGS)
        assert isinstance(await leaving.__anext__(), CardProgress)
        staying = service.compute("builtin:tiny", DATASET, SETTINGS)
        joined = await staying.__anext__()
        await leaving.aclose()  # the client went away
        await asyncio.sleep(0.1)  # time for a (wrongly) cancelled engine to notice; passes without it too
        engine.gate.set()
        return [joined, *await _drain(staying)]

    events = _run(body)
    assert isinstance(events[-1], StoredCard) and engine.cancelled == 0 and engine.calls == 1


def test_the_last_caller_leaving_cancels_and_a_new_request_starts_afresh(tmp_path, engine):
    service = _service(tmp_path)

    async def body():
        callers = [service.compute("builtin:tiny", DATASET, SETTINGS) for _ in range(2)]
        for caller in callers:
            await caller.__anext__()
        for caller in callers:
            await caller.aclose()
        await _until(lambda: service.in_progress == 0, "the cancelled computation's end")
        assert engine.cancelled == 1
        engine.gate.set()
        return await _drain(service.compute("builtin:tiny", DATASET, SETTINGS))

    events = _run(body)
    assert isinstance(events[-1], StoredCard) and engine.calls == 2 and service.computations_started == 2
