"""Judging a deployed version's latency on live traffic, and rolling it back when it is over its budget.

A deploy asked to (``rollback_over_budget``) hands its version to ``LiveLatencyJudge.watch``. For
``window_seconds`` the judge collects the time between tokens of every successful request of two or more
tokens: the version's, and the base model's on the same pool's replicas in the same window. Then it gives its
verdict: the live overhead median(version) / median(base) - 1 against the budget, or "inconclusive" when either
side had fewer than ``min_requests`` requests (nothing is rolled back on too little evidence). Inter-token time
does not grow with the number of tokens asked for, so live requests of any length compare.

Why the same pool, and medians: base requests served by another pool's servers run on other machines, or (on a
small host) beside a server whose worker still spins a core for about a second after its last request; measured
here, that made a +100% version read -6% against another pool's base. Medians keep one stalled request from
moving the verdict. The Prometheus rule ``adapter:layercard_inference_inter_token_overhead:ratio_15m`` (the
dashboards and the alert) asks the same question per pool with 15-minute means (the metric's ``pool`` label).
Over budget, the judge calls ``on_over``: the adapter manager rolls back to the version that served before, or
undeploys.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from layercard_service.telemetry import RequestRecord

__all__ = ["LiveLatencyJudge", "LiveVerdict", "LiveWatch", "Samples"]

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Inter-token seconds of one side of a watch: a uniform sample (reservoir) of at most ``KEPT`` of its
    ``seen`` requests, so a busy pool's window holds a bounded list and its median stays unbiased."""

    KEPT: ClassVar[int] = 4096
    values: list[float] = field(default_factory=list)
    seen: int = 0

    def add(self, seconds: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < self.KEPT:
            self.values.append(seconds)
        elif (slot := rng.randrange(self.seen)) < self.KEPT:
            self.values[slot] = seconds


@dataclass
class LiveWatch:
    adapter_id: str
    served: str  # the watched version's served name
    version: int
    budget: float
    previous_version: int | None  # what a rollback restores; None: there was none, a rollback undeploys
    previous_pool: str = ""  # the pool that version served on
    replicas: frozenset[str] = frozenset()  # the pool's replica URLs: base requests elsewhere do not compare
    # Inter-token seconds of the version's requests, and of the base model's on those replicas, in the window.
    adapter: Samples = field(default_factory=Samples)
    base: Samples = field(default_factory=Samples)
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class LiveVerdict:
    adapter_id: str
    version: int
    outcome: str  # "within" | "over" | "inconclusive"
    overhead_fraction: float | None
    adapter_requests: int
    base_requests: int
    detail: str
    budget: float = 0.0
    judged_at: float = field(default_factory=time.time)


class LiveLatencyJudge:
    def __init__(
        self,
        window_seconds: float,
        min_requests: int,
        on_over: Callable[[LiveWatch, LiveVerdict], Awaitable[None]],
        on_verdict: Callable[[LiveVerdict], None] = lambda _v: None,
    ) -> None:
        self.window_seconds, self.min_requests = window_seconds, min_requests
        self._on_over, self._on_verdict = on_over, on_verdict
        self._watches: dict[str, LiveWatch] = {}  # adapter id -> its watched version (a newer deploy replaces it)
        self._tasks: set[asyncio.Task] = set()
        self.verdicts: dict[str, LiveVerdict] = {}  # adapter id -> its newest verdict
        self._rng = random.Random(0)  # the reservoirs' draws: which samples a busy window keeps

    def watch(self, watch: LiveWatch) -> None:
        """Starts judging ``watch``'s version; must be called on the event loop."""
        self._watches[watch.adapter_id] = watch
        task = asyncio.get_running_loop().create_task(self._judge_later(watch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, adapter_id: str) -> None:
        """The adapter was redeployed or undeployed: its watch, if any, ends without a verdict."""
        self._watches.pop(adapter_id, None)

    def observe(self, record: RequestRecord) -> None:
        """Called for every finished inference request (InferenceProxy.observers)."""
        if not self._watches:
            return
        seconds = record.inter_token_seconds
        if seconds is None:
            return
        for watch in self._watches.values():
            if not record.adapter:
                if record.replica in watch.replicas or not watch.replicas:
                    watch.base.add(seconds, self._rng)
            elif record.served_model == watch.served:
                watch.adapter.add(seconds, self._rng)

    def judge(self, watch: LiveWatch) -> LiveVerdict:
        """The verdict on what ``watch`` has collected so far."""
        n_adapter, n_base = watch.adapter.seen, watch.base.seen

        def verdict(outcome: str, overhead: float | None, detail: str) -> LiveVerdict:
            return LiveVerdict(
                watch.adapter_id, watch.version, outcome, overhead, n_adapter, n_base, detail, watch.budget
            )

        if min(n_adapter, n_base) < max(1, self.min_requests):
            return verdict(
                "inconclusive",
                None,
                f"{n_adapter} requests to {watch.served} and {n_base} to the base model on its pool's replicas in "
                f"the window; the judge needs {self.min_requests} of each",
            )
        base = statistics.median(watch.base.values)
        overhead = statistics.median(watch.adapter.values) / base - 1 if base > 0 else 0.0
        outcome = "over" if overhead > watch.budget else "within"
        return verdict(
            outcome,
            overhead,
            f"live inter-token overhead {overhead:+.1%} (medians) over {n_adapter} requests (base on its pool: "
            f"{n_base}), {'over' if outcome == 'over' else 'within'} the budget of {watch.budget:.0%}",
        )

    async def _judge_later(self, watch: LiveWatch) -> None:
        await asyncio.sleep(self.window_seconds)
        if self._watches.get(watch.adapter_id) is not watch:
            return  # superseded by a newer deploy, or undeployed
        del self._watches[watch.adapter_id]
        verdict = self.judge(watch)
        self.verdicts[watch.adapter_id] = verdict
        log.info(
            "live latency verdict",
            extra={"adapter": watch.adapter_id, "version": watch.version, "outcome": verdict.outcome,
                   "detail": verdict.detail},
        )  # fmt: skip
        self._on_verdict(verdict)
        if verdict.outcome == "over":
            try:
                await self._on_over(watch, verdict)
            except Exception:
                log.exception("rollback after a live latency verdict failed", extra={"adapter": watch.adapter_id})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
