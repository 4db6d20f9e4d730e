"""The live judge's figures: the base model's requests on the watched version's pool only, and medians."""

from __future__ import annotations

import random

from layercard_service.control.live_latency import LiveLatencyJudge, LiveWatch, Samples
from layercard_service.telemetry import RequestRecord

LEAN, FULL = "http://lean:8000", "http://full:8000"


def record(adapter: str, replica: str, inter_token: float, tokens: int = 9, first: float = 0.05) -> RequestRecord:
    served = f"{adapter}@v2" if adapter else "base-model"
    latency = first + inter_token * (tokens - 1)
    return RequestRecord(adapter, served, replica, True, first, latency, tokens)


def judge_with(records: list[RequestRecord], replicas=frozenset({FULL}), budget: float = 0.1):
    async def never(_watch, _verdict) -> None:
        raise AssertionError("judge() gives the verdict; nothing here rolls back")

    judge = LiveLatencyJudge(window_seconds=60, min_requests=3, on_over=never)
    watch = LiveWatch("steered", "steered@v2", 2, budget, 1, "lean", replicas=replicas)
    judge._watches[watch.adapter_id] = watch  # as watch() does, without its timer
    for r in records:
        judge.observe(r)
    return judge.judge(watch)


def test_base_requests_on_another_pool_do_not_compare():
    """The version runs at 20 ms a token on the full pool, whose base runs at 10 ms; the lean pool's base requests
    (here slow, as beside a busy neighbour) are not its baseline."""
    records = [record("steered", FULL, 0.020) for _ in range(4)]
    records += [record("", FULL, 0.010) for _ in range(4)]
    records += [record("", LEAN, 0.040) for _ in range(8)]
    verdict = judge_with(records)
    assert verdict.outcome == "over" and abs(verdict.overhead_fraction - 1.0) < 1e-9
    assert (verdict.adapter_requests, verdict.base_requests) == (4, 4)


def test_too_little_base_traffic_on_its_pool_is_inconclusive():
    records = [record("steered", FULL, 0.020) for _ in range(4)] + [record("", LEAN, 0.010) for _ in range(8)]
    verdict = judge_with(records)
    assert verdict.outcome == "inconclusive" and verdict.base_requests == 0 and "its pool" in verdict.detail


def test_one_stalled_request_does_not_move_the_verdict():
    """Medians: one base request stalled to 1 s a token would make a mean read the version as 90% faster."""
    records = [record("steered", FULL, 0.0105) for _ in range(5)]
    records += [record("", FULL, 0.010) for _ in range(4)] + [record("", FULL, 1.0)]
    verdict = judge_with(records)
    assert verdict.outcome == "within" and abs(verdict.overhead_fraction - 0.05) < 1e-9


def test_short_and_failed_requests_are_not_samples():
    records = [record("steered", FULL, 0.020, tokens=1) for _ in range(4)]  # no inter-token time in one token
    records += [RequestRecord("steered", "steered@v2", FULL, False, 0.0, 0.0, 0, "VLLM_UNAVAILABLE")]
    records += [record("", FULL, 0.010) for _ in range(4)]
    assert judge_with(records).adapter_requests == 0


def test_a_busy_window_keeps_a_bounded_uniform_sample():
    """Past ``Samples.KEPT`` requests the judge keeps a uniform sample: bounded memory, the median unmoved."""
    samples, rng = Samples(), random.Random(1)
    n = 5 * Samples.KEPT
    for i in range(n):
        samples.add(0.010 if i < n // 2 else 0.030, rng)  # the first half at 10 ms, the second at 30 ms
    assert samples.seen == n and len(samples.values) == Samples.KEPT
    share_slow = sum(v > 0.02 for v in samples.values) / Samples.KEPT
    assert 0.45 < share_slow < 0.55  # not the first KEPT requests only: a uniform draw over all of them
