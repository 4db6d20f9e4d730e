"""The seam between the domain and its metrics: what happened, told once, with no metrics library in sight.

The domain calls a ``Telemetry``; the base class ignores everything (unit tests, tools), and
``prometheus_metrics.PrometheusTelemetry`` turns the calls into Prometheus series.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

__all__ = ["JobOutcome", "RequestRecord", "SafeTelemetry", "Telemetry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """One finished inference request: which adapter ("" = base), where, how fast, and how it ended."""

    adapter: str
    served_model: str
    replica: str
    ok: bool
    first_token_seconds: float
    latency_seconds: float
    completion_tokens: int
    error: str = ""  # the failure's reason (VLLM_UNAVAILABLE, CANCELLED, ...) when not ok
    pool: str = ""  # the serving pool of the replica that answered; "" when none did

    @property
    def inter_token_seconds(self) -> float | None:
        """Mean time between generated tokens; None for a failed request or one of fewer than two tokens."""
        if not self.ok or self.completion_tokens < 2:
            return None
        return (self.latency_seconds - self.first_token_seconds) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class JobOutcome:
    """A tuning job whose worker finished, with the plan's predictions beside what was measured (0: unknown)."""

    state: str
    seconds: float
    tokens_per_second: float
    predicted_step_seconds: float
    measured_step_seconds: float
    predicted_peak_memory_bytes: int
    measured_peak_memory_bytes: int


class Telemetry:
    def card_finished(self, seconds: float, cached: bool, ok: bool) -> None:
        """A ComputeLayerCard call ended: computed (``cached`` False) or answered from the store."""

    def job_ended(self, outcome: JobOutcome) -> None:
        """A tuning job's worker exited and the job reached its final state."""

    def deploy_finished(self, outcome: str, seconds: float) -> None:
        """A DeployAdapter call ended: "ok", or the failure's reason (SERVING_BUDGET_EXCEEDED, ...)."""

    def request_finished(self, record: RequestRecord) -> None:
        """An inference request through the proxy ended."""

    def live_latency_verdict(self, outcome: str) -> None:
        """A deployed version's live latency was judged: "within", "over" (it is rolled back) or "inconclusive"."""

    def upstream_error(self, replica: str, reason: str) -> None:
        """A vLLM server failed a call or could not be reached."""


class SafeTelemetry(Telemetry):
    """Passes every call on, and logs instead of raising: a metrics failure must never fail the work it describes
    (these calls run in ``finally`` blocks and after committed deploys)."""

    def __init__(self, inner: Telemetry) -> None:
        self.inner = inner

    def __getattribute__(self, name: str):
        if name.startswith("_") or name == "inner":
            return object.__getattribute__(self, name)
        target = getattr(object.__getattribute__(self, "inner"), name)

        @functools.wraps(target)
        def guarded(*args, **kwargs) -> None:
            try:
                target(*args, **kwargs)
            except Exception:
                log.exception("telemetry call failed", extra={"call": name})

        return guarded
