"""The cost sections of a card's views: the cost model's error line and the Markdown report's training and serving
costs, with every placement the calibration measured (fitted and held out) so a plan can be audited."""

from __future__ import annotations

from collections.abc import Iterable

from layercard.v1 import layer_card_pb2
from layercard_client.markdown import md_table

__all__ = ["MIB", "cost_error", "costs_markdown"]

MIB = 1024 * 1024


def cost_error(tc: layer_card_pb2.TrainingCost) -> str:
    """The cost model's error: on held-out random placements when the card has a fitted calibration."""
    if tc.HasField("calibration"):
        c = tc.calibration
        return (
            f"step time p50 {c.step_error_p50:.1%}, p90 {c.step_error_p90:.1%}; peak memory p50 "
            f"{c.memory_error_p50:.1%}, p90 {c.memory_error_p90:.1%} on {len(c.held_out_placements)} held-out "
            "placements"
        )
    return f"step time {tc.step_time_relative_error:.1%}, peak memory {tc.peak_memory_relative_error:.1%}"


def costs_markdown(card: layer_card_pb2.LayerCard) -> list[str]:
    lines: list[str] = []
    if card.HasField("training_cost"):
        tc = card.training_cost
        validation = ", ".join(map(str, tc.validation_layers)) or "-"
        lines += [
            "",
            "## Training cost",
            "",
            f"Per step at batch {tc.batch_size} x {tc.seq_len} tokens.",
            "",
            f"- fixed: {tc.fixed_seconds:.4f} s per step; per adapter: {tc.per_adapter_seconds:.4f} s",
            f"- base memory: {tc.base_memory_bytes / MIB:.1f} MiB",
            f"- full-layer step: predicted {tc.predicted_full_step_seconds:.4f} s, "
            f"measured {tc.measured_full_step_seconds:.4f} s",
            f"- partial step (layers {validation}): predicted {tc.predicted_partial_step_seconds:.4f} s, "
            f"measured {tc.measured_partial_step_seconds:.4f} s",
            f"- full-layer peak memory: predicted {tc.predicted_full_peak_memory_bytes / MIB:.1f} MiB, "
            f"measured {tc.measured_full_peak_memory_bytes / MIB:.1f} MiB",
            f"- validation error: step time {tc.step_time_relative_error:.1%}, "
            f"peak memory {tc.peak_memory_relative_error:.1%}",
            f"- frozen-prefix cache: {_cache_line(tc)}",
        ]
        if tc.HasField("calibration"):
            lines += _calibration_markdown(tc)
    if card.HasField("serving_cost"):
        sc = card.serving_cost
        vllm = (
            f"{sc.vllm_overhead_fraction:.1%} over base ({sc.vllm_basis or 'measured'})"
            if sc.HasField("vllm_overhead_fraction")
            else "not measured yet"
        )
        lines += [
            "",
            "## Serving cost",
            "",
            f"- unmerged peft: base {sc.peft_base_ms_per_token:.3f} ms/token, plus each adapted layer's overhead",
            f"- vLLM (independent of the number of adapted layers): {vllm}",
            *(f"  - {line}" for line in pool_cost_lines(sc)),
        ]
    return lines


def _cache_line(tc: layer_card_pb2.TrainingCost) -> str:
    if not tc.prefix_cache_bytes_per_token:
        return "bytes per token not recorded (a card from before the cache was priced: plans are priced uncached)"
    return f"{tc.prefix_cache_bytes_per_token:,} bytes per training token (the hidden states entering a block)"


def _calibration_markdown(tc: layer_card_pb2.TrainingCost) -> list[str]:
    """Every placement the calibration measured, fitted and held out, with its prediction: a plan can be audited."""
    c = tc.calibration
    seconds = c.duration.ToTimedelta().total_seconds() if c.HasField("duration") else 0.0
    lines = [
        "",
        "### Calibration",
        "",
        f"{c.method}. {c.measured_steps} training steps ({c.rounds} interleaved rounds over the fitted placements, "
        f"then one step per held-out placement) in {seconds:.1f} s.",
        "",
        f"- fitted: fixed {tc.fixed_seconds * 1e3:.3f} ms per step; per block of average size "
        f"{c.graph_seconds_per_block * 1e3:.3f} ms inside the backward graph, "
        f"{c.adapter_seconds_per_block * 1e3:.3f} ms for an adapter",
        f"- held-out error: step time p50 {c.step_error_p50:.1%}, p90 {c.step_error_p90:.1%}; "
        f"peak memory p50 {c.memory_error_p50:.1%}, p90 {c.memory_error_p90:.1%}",
        *(f"- note: {note}" for note in c.notes),
        "",
    ]
    headers = ["placement", "layers", "measured ms", "predicted ms", "error", "measured MiB", "predicted MiB"]
    rows = [
        [
            kind,
            _layer_list(t.layers),
            f"{t.measured_step_seconds * 1e3:.3f}",
            f"{t.predicted_step_seconds * 1e3:.3f}",
            f"{_relative(t.predicted_step_seconds, t.measured_step_seconds):+.1%}",
            f"{t.measured_peak_memory_bytes / MIB:.2f}",
            f"{t.predicted_peak_memory_bytes / MIB:.2f}",
        ]
        for kind, timings in (("fitted", c.fit_placements), ("held out", c.held_out_placements))
        for t in timings
    ]
    return lines + md_table(headers, rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"])


def _relative(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else 0.0


def _layer_list(layers: Iterable[int]) -> str:
    """Layers as ranges where they run on: 0-3, 6, 8-9."""
    spans: list[list[int]] = []
    for i in sorted(layers):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def pool_cost_lines(sc: layer_card_pb2.ServingCost) -> list[str]:
    """One line per serving pool: its LoRA settings and the overhead measured at each adapter rank."""
    lines = []
    for pool in sc.vllm_pools:
        wrapped = ", ".join(pool.lora_target_modules) or "every module"
        ranks = "; ".join(
            f"rank {r.rank} {r.overhead_fraction:+.1%} ({r.samples} probe{'s' if r.samples != 1 else ''})"
            for r in pool.ranks
        )
        lines.append(
            f"pool {pool.pool} (wrapping {wrapped}, max rank {pool.max_lora_rank}): {ranks or 'not measured yet'}"
        )
    return lines
