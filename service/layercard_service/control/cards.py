"""Layer Cards on request: admission, fingerprint and store, compute off the event loop, progress, cancel.

Heavy work runs in worker threads (torch releases the GIL in its kernels), at most ``max_concurrent`` at once
with at most ``queue_size`` more waiting; past that a request is RESOURCE_EXHAUSTED with a retry hint.

Identical requests (same fingerprint) in flight at once share one computation: each caller streams its
progress (a caller that joins late starts from the latest event) and gets the same card; admission counts it
once. ``force`` skips the store, not a computation already running: a forced request joins it too, since
that computation is as fresh as a new one would be. A caller that goes away leaves; the last one to leave
sets the cancel flag, which the engine checks between batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from layercard_service.data.jsonl import Example
from layercard_service.data.sources import DatasetRequest, ResolvedDataset, resolve_dataset, resolve_model_path
from layercard_service.domain.card_codec import card_from_dict, card_to_dict
from layercard_service.domain.cards import CardDataset, CardSettings, LayerCardData
from layercard_service.errors import InvalidArgument, NotFound, ResourceExhausted
from layercard_service.persistence.store import CardRecord, Store, paginate
from layercard_service.telemetry import Telemetry

__all__ = ["CardEngine", "CardProgress", "CardService", "StoredCard"]

CARD_PREFIX = "layerCards/"
WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class CardProgress:
    phase: str
    fraction: float
    eta_seconds: float | None
    message: str


@dataclass(frozen=True)
class StoredCard:
    name: str
    fingerprint: str
    create_time: float
    card: LayerCardData
    from_store: bool


Report = Callable[[str, float, str], None]  # (phase, fraction, message), called from the worker thread


class CardEngine(Protocol):
    """Loads the model and computes its card in a worker thread (card engine: torch). A seam, injected by the
    composition root, so that this control-plane module never imports torch."""

    def __call__(
        self,
        model_path: Path,
        model: str,
        examples: Sequence[Example],
        settings: CardSettings,
        report: Report,
        cancel: threading.Event,
    ) -> LayerCardData: ...


@dataclass(eq=False)
class _Flight:
    """One computation of a fingerprint and the callers streaming it (one event queue each)."""

    task: asyncio.Future = field(init=False)
    cancel: threading.Event = field(default_factory=threading.Event)
    listeners: set[asyncio.Queue] = field(default_factory=set)
    last: CardProgress | None = None

    def publish(self, event: CardProgress) -> None:
        self.last = event
        for listener in self.listeners:
            listener.put_nowait(event)


class CardService:
    def __init__(
        self,
        store: Store,
        engine: CardEngine,
        model_roots: tuple[Path, ...],
        dataset_roots: tuple[Path, ...],
        max_concurrent: int = 1,
        queue_size: int = 4,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.telemetry = telemetry or Telemetry()
        self.model_roots = model_roots
        self.dataset_roots = dataset_roots
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._admitted = 0  # running + waiting
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}  # by fingerprint; touched only on the event loop
        self.computations_started = 0  # computations, not requests: identical concurrent ones count once

    @property
    def in_progress(self) -> int:
        """Cards running or waiting for a slot."""
        with self._lock:
            return self._admitted

    # --- reading ----------------------------------------------------------------------------------------
    def get(self, name: str) -> StoredCard:
        if not name.startswith(CARD_PREFIX) or len(name) == len(CARD_PREFIX):
            raise InvalidArgument.field("name", f"must look like 'layerCards/{{card_id}}', got {name!r}")
        record = self.store.get_card(name[len(CARD_PREFIX) :])
        if record is None:
            raise NotFound(f"no layer card {name!r}", reason="LAYER_CARD_NOT_FOUND", metadata={"name": name})
        return _stored(record, from_store=True)

    def list(
        self, model: str, page_size: int, page_token: str, size_of: Callable[[StoredCard], int] | None = None
    ) -> tuple[list[StoredCard], str]:
        """One page of cards; ``size_of`` (a card's size in the response) bounds the page in bytes too."""

        def fetch(offset: int, limit: int) -> list[StoredCard]:
            return [_stored(r, from_store=True) for r in self.store.list_cards(model, offset, limit)]

        return paginate(fetch, page_size, page_token, size_of=size_of)

    # --- computing --------------------------------------------------------------------------------------
    async def compute(
        self, model: str, dataset: DatasetRequest, settings: CardSettings, force: bool = False
    ) -> AsyncIterator[CardProgress | StoredCard]:
        """Yields progress, then the card. Closing the iterator early leaves; the work stops when no caller is left."""
        began = time.monotonic()
        model_path = resolve_model_path(model, self.model_roots)
        data = await asyncio.to_thread(resolve_dataset, dataset, self.dataset_roots)
        weights = await asyncio.to_thread(self._model_fingerprint, model_path)
        fingerprint = _fingerprint(weights, data.fingerprint, settings)
        if not force:
            record = self.store.find_card(fingerprint)
            if record is not None:
                self.telemetry.card_finished(time.monotonic() - began, cached=True, ok=True)
                yield _stored(record, from_store=True)
                return
        flight = self._flights.get(fingerprint)
        if flight is None or flight.cancel.is_set():  # a cancelled one is winding down: do not join it
            flight = self._start(fingerprint, model, model_path, data, settings)
        events: asyncio.Queue = asyncio.Queue()
        if flight.last is not None:
            events.put_nowait(flight.last)
        flight.listeners.add(events)
        task, getter = flight.task, None
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                # asyncio.wait never cancels the shared task, even when this caller is cancelled
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            card = task.result()
            self.telemetry.card_finished(time.monotonic() - began, cached=False, ok=True)
            yield card
        except Exception:
            self.telemetry.card_finished(time.monotonic() - began, cached=False, ok=False)
            raise
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            flight.listeners.discard(events)
            if not flight.listeners and not task.done():
                flight.cancel.set()  # the last caller went away: stop at the next batch

    def _start(
        self, fingerprint: str, model: str, model_path: Path, data: ResolvedDataset, settings: CardSettings
    ) -> _Flight:
        """Admits one computation (or refuses it when the queue is full) and starts it in a worker thread."""
        queued = self._admit()
        loop = asyncio.get_running_loop()
        flight = _Flight()
        started = time.monotonic()

        def report(phase: str, fraction: float, message: str) -> None:
            elapsed = time.monotonic() - started
            eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
            loop.call_soon_threadsafe(flight.publish, CardProgress(phase, fraction, eta, message))

        def work() -> StoredCard:
            try:
                with self._slots:  # waits here while other cards run: the queue
                    card = self.engine(model_path, model, data.examples, settings, report, flight.cancel)
                    card = dataclasses.replace(card, dataset=_card_dataset(data, card.probe_examples))
                    record = CardRecord(fingerprint[:24], fingerprint, model, time.time(), card_to_dict(card))
                    self.store.put_card(record)
                    return _stored(record, from_store=False)
            finally:
                with self._lock:
                    self._admitted -= 1

        def finished(task: asyncio.Future) -> None:
            if not task.cancelled():
                task.exception()  # retrieved: every caller may have left before it ended
            if self._flights.get(fingerprint) is flight:
                del self._flights[fingerprint]  # later requests find the card in the store

        if queued:
            flight.publish(CardProgress("queued", 0.0, None, "waiting for a running card to finish"))
        flight.task = loop.run_in_executor(None, work)
        flight.task.add_done_callback(finished)
        self._flights[fingerprint] = flight
        self.computations_started += 1
        return flight

    def _admit(self) -> bool:
        """Counts the request in, or refuses it when the queue is full; True when it has to wait."""
        with self._lock:
            if self._admitted >= self.max_concurrent + self.queue_size:
                raise ResourceExhausted(
                    f"too many layer cards in progress ({self._admitted}); try again later",
                    reason="CARD_QUEUE_FULL",
                    retry_after=30.0,
                    metadata={"limit": str(self.max_concurrent + self.queue_size)},
                )
            self._admitted += 1
            return self._admitted > self.max_concurrent

    def _model_fingerprint(self, path: Path) -> str:
        digest = hashlib.sha256()
        for pattern in WEIGHT_FILES:
            for file in sorted(path.glob(pattern)):
                stat = file.stat()
                known = self.store.cached_hash(file, stat.st_size, stat.st_mtime)
                if known is None:
                    known = _sha256(file)
                    self.store.remember_hash(file, stat.st_size, stat.st_mtime, known)
                digest.update(f"{file.name}:{known}\n".encode())
        return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(weights: str, data: str, settings: CardSettings) -> str:
    fields = dataclasses.asdict(settings)
    if not fields["performance_learning_rates"]:  # the default grid: cards stored before the field keep their key
        del fields["performance_learning_rates"]
    canonical = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(f"{weights}\n{data}\n{canonical}".encode()).hexdigest()


def _card_dataset(data: ResolvedDataset, examples_used: int) -> CardDataset:
    return CardDataset(
        kind=data.kind,
        source=data.source,
        split=data.split,
        fingerprint=data.fingerprint,
        examples_used=examples_used,
        examples_total=len(data.examples),
        inline_size_bytes=data.size_bytes,
    )


def _stored(record: CardRecord, from_store: bool) -> StoredCard:
    return StoredCard(
        CARD_PREFIX + record.card_id, record.fingerprint, record.create_time, card_from_dict(record.payload), from_store
    )
