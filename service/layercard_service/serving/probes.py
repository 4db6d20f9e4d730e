"""Probes a deploy runs on a replica after loading an adapter: does it change the output, and what does it cost.

vLLM serves the base model silently when an adapter's weights touch nothing the server wraps, so a load that
succeeded proves nothing: the effect probe decodes a few prompts greedily with and without the adapter and
compares the log-probability of every generated token. The latency probe times interleaved base and adapter
requests of a fixed length (``ignore_eos``), so both sides do the same work and drift hits both alike.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

from layercard_service.persistence.deployments import LatencyMeasurement
from layercard_service.serving.vllm_api import Completion, Sampling, VllmApi

__all__ = ["EFFECT_PROMPTS", "LATENCY_SAMPLES", "Effect", "measure_effect", "measure_latency"]

EFFECT_PROMPTS = ("The module", "def main():\n    ", "Q: What does the function return?\nA:")
EFFECT_TOKENS = 8
# Identical weights give bit-identical log-probabilities here; a trained adapter moves them by far more.
EFFECT_TOLERANCE = 1e-4
LATENCY_PROMPT = "The standard library provides"
LATENCY_TOKENS = 32
LATENCY_SAMPLES = 5


@dataclass(frozen=True)
class Effect:
    changed: bool
    max_logprob_delta: float  # over every compared token; inf when the texts differ
    prompts: int


async def measure_effect(
    replica: VllmApi, base: str, adapter: str, prompts: tuple[str, ...] = EFFECT_PROMPTS
) -> Effect:
    """Greedy decoding of ``prompts`` with and without the adapter; it stops at the first prompt whose texts
    differ (``prompts`` then counts the prompts it took)."""
    sampling = Sampling(max_tokens=EFFECT_TOKENS, temperature=0.0, logprobs=True, ignore_eos=True)
    delta = 0.0
    for i, prompt in enumerate(prompts):
        with_base = await replica.complete(base, prompt, sampling)
        with_adapter = await replica.complete(adapter, prompt, sampling)
        if with_base.text != with_adapter.text:
            return Effect(True, float("inf"), i + 1)
        pairs = zip(with_base.token_logprobs, with_adapter.token_logprobs)
        delta = max([delta, *(abs(a - b) for a, b in pairs if a is not None and b is not None)])
    return Effect(delta > EFFECT_TOLERANCE, delta, len(prompts))


def _inter_token(c: Completion) -> float:
    return (c.latency_seconds - c.first_token_seconds) / max(1, c.completion_tokens - 1)


async def measure_latency(
    replica: VllmApi,
    base: str,
    adapter: str,
    samples: int = LATENCY_SAMPLES,
    tokens: int = LATENCY_TOKENS,
    concurrency: int = 1,
) -> LatencyMeasurement:
    """Medians over ``samples`` interleaved pairs, after one warm-up request each. At ``concurrency`` c, each side
    of a pair is c requests at once (vLLM batches them), and the medians are over every request."""
    sampling = Sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[Completion]] = {base: [], adapter: []}
    for name in (base, adapter):
        await replica.complete(name, LATENCY_PROMPT, sampling)  # warm-up: first use moves the weights into place
    for i in range(samples):
        order = (base, adapter) if i % 2 == 0 else (adapter, base)
        for name in order:
            batch = [replica.complete(name, LATENCY_PROMPT, sampling) for _ in range(concurrency)]
            runs[name] += await asyncio.gather(*batch)

    def median_ms(name: str, figure) -> float:
        return 1000.0 * statistics.median(figure(c) for c in runs[name])

    base_total = median_ms(base, lambda c: c.latency_seconds)
    adapter_total = median_ms(adapter, lambda c: c.latency_seconds)
    return LatencyMeasurement(
        replica=replica.url,
        base_ttft_ms=median_ms(base, lambda c: c.first_token_seconds),
        adapter_ttft_ms=median_ms(adapter, lambda c: c.first_token_seconds),
        base_inter_token_ms=median_ms(base, _inter_token),
        adapter_inter_token_ms=median_ms(adapter, _inter_token),
        overhead_fraction=(adapter_total - base_total) / base_total if base_total > 0 else 0.0,
        samples=samples,
        base_latency_ms=base_total,
        adapter_latency_ms=adapter_total,
        tokens=tokens,
        concurrency=concurrency,
    )
