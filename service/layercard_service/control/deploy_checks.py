"""What a deploy checked, one ``DeployCheck`` per step, and the over-budget refusal: the reply's ``checks``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from layercard_service.errors import FailedPrecondition
from layercard_service.persistence.deployments import LatencyMeasurement, ServingShape
from layercard_service.serving.probes import Effect

__all__ = [
    "LIVE_ALERT",
    "DeployCheck",
    "budget_check",
    "compatibility_check",
    "effect_check",
    "latency_check",
    "live_check",
]

LIVE_ALERT = "LayercardAdapterLiveOverheadOverBudget"  # deploy/prometheus/rules/layercard.yml


@dataclass(frozen=True)
class DeployCheck:
    """One check of a deploy, as the reply reports it."""

    name: str  # compatibility | pool | replicas | load | effect | latency_N_streams | latency | budget | live_latency
    outcome: str  # PASSED | SKIPPED | PENDING | FAILED_FORCED
    detail: str
    replica: str = ""
    value: float | None = None


def live_check(
    adapter_id: str, budget: float, rollback: bool, previous: int | None, window_seconds: float, min_requests: int
) -> DeployCheck:
    alert = (
        f"the alert {LIVE_ALERT} fires when {adapter_id}'s mean inter-token time over 15 minutes exceeds the base "
        f"model's on the same pool by more than the budget of {budget:.0%}"
    )
    if not rollback:
        return DeployCheck("live_latency", "PENDING", f"judged on live traffic: {alert}")
    then = f"rolled back to version {previous}" if previous else "undeployed (no version served before it)"
    return DeployCheck(
        "live_latency",
        "PENDING",
        f"judged on live traffic for {window_seconds:g} s (at least {min_requests} requests of it and of the base "
        f"model on its pool): over the budget of {budget:.0%}, it is {then}; and {alert}",
    )


def compatibility_check(config: dict, shape: ServingShape) -> DeployCheck:
    modules = ", ".join(config.get("target_modules") or ()) or "?"
    return DeployCheck(
        "compatibility",
        "PASSED",
        f"a rank-{shape.adapter_rank} LoRA of {shape.model} on {modules}; the servers take rank "
        f"<= {shape.server_max_rank} and wrap {', '.join(shape.server_modules) or 'every LoRA-capable module'}",
    )


def effect_check(effect: Effect, replica: str) -> DeployCheck:
    found = (
        "the greedy text differs from the base model's"
        if math.isinf(effect.max_logprob_delta)
        else f"a token's log-probability moves by up to {effect.max_logprob_delta:.2g}"
    )
    return DeployCheck(
        "effect", "PASSED", f"{found} ({effect.prompts} greedy prompt(s))", replica, effect.max_logprob_delta
    )


def latency_check(latency: LatencyMeasurement, full_probe: bool) -> DeployCheck:
    """PASSED for a probe after this load; SKIPPED when the serving shape's calibration stood in for it."""
    if latency.source == "calibration":
        return DeployCheck(
            "latency",
            "SKIPPED",
            f"not probed: {latency.basis}; overhead {latency.overhead_fraction:+.1%}",
            value=latency.overhead_fraction,
        )
    why = "full probe asked for" if full_probe else "the serving shape is not calibrated yet"
    return DeployCheck(
        "latency",
        "PASSED",
        f"probed ({why}): {latency.samples} interleaved base/adapter pairs of {latency.tokens} tokens, overhead "
        f"{latency.overhead_fraction:+.1%}",
        latency.replica,
        latency.overhead_fraction,
    )


def concurrency_check(latency: LatencyMeasurement) -> DeployCheck:
    """A probe at several streams at once: recorded for budgets at that concurrency, not held to this deploy's."""
    return DeployCheck(
        f"latency_{latency.concurrency}_streams",
        "PASSED",
        f"probed at {latency.concurrency} streams: {latency.samples} interleaved base/adapter pairs of "
        f"{latency.concurrency} requests, overhead {latency.overhead_fraction:+.1%}",
        latency.replica,
        latency.overhead_fraction,
    )


def budget_check(served: str, latency: LatencyMeasurement, budget: float | None, force: bool, verb: str) -> DeployCheck:
    """PASSED within the budget; over it, FAILED_FORCED with force, else FAILED_PRECONDITION."""
    figure = latency.overhead_fraction
    if budget is None:
        return DeployCheck("budget", "SKIPPED", "no latency budget asked for", value=figure)
    if figure <= budget:
        return DeployCheck(
            "budget", "PASSED", f"overhead {figure:+.1%} within the budget of {budget:.0%}", value=figure
        )
    if force:
        return DeployCheck(
            "budget",
            "FAILED_FORCED",
            f"overhead {figure:+.1%} over the budget of {budget:.0%}; deployed with force",
            value=figure,
        )
    where = f"on {latency.replica}" if latency.replica else "by its serving shape's calibration"
    raise FailedPrecondition(
        f"{served} {verb} {figure:.0%} latency overhead over the base model {where}, over its budget of "
        f"{budget:.0%}; deploy with force to accept it",
        reason="SERVING_BUDGET_EXCEEDED",
        metadata={
            "overhead_fraction": f"{figure:.4f}",
            "max_overhead_fraction": f"{budget:.4f}",
            "base_latency_ms": f"{latency.base_latency_ms:.2f}",
            "adapter_latency_ms": f"{latency.adapter_latency_ms:.2f}",
            "replica": latency.replica,
            "latency_source": latency.source,
        },
    )
