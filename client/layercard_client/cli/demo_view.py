"""What ``layercard demo`` shows at each step: compact tables of the figures, built from the response messages.

Pure functions of protobuf messages (no RPC), like ``render``; kept apart so ``demo`` reads as the pipeline.
Each returns a list of parts: tables, printed at their natural width, and lines of text, which wrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from layercard.v1 import adapter_pb2, inference_pb2, layer_card_pb2, placement_pb2, tuning_pb2
from layercard_client.cardview import dataset_line, share_bar
from layercard_client.cli.render import deploy_checks_table, fmt_bytes, state_name

__all__ = [
    "GenerationRow",
    "card_figures",
    "deployment_figures",
    "generation_table",
    "job_figures",
    "plan_figures",
]


def _kv(title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    return table


def _seconds(duration) -> float:
    return duration.ToTimedelta().total_seconds()


def card_figures(card: layer_card_pb2.LayerCard, wall_seconds: float) -> list[RenderableType]:
    """Per layer: resnorm (share with a bar, Res², predicted gain) and training cost (calibrated fwd/bwd of one
    step, adapter size). The header says which card, how it was obtained and how long the call took."""
    if card.from_store:
        origin = "from the store (same model, data and settings as an earlier card)"
    else:
        origin = f"computed in {_seconds(card.compute_duration):.1f} s on the server"
    head = _kv()
    head.add_row("card", card.name)
    head.add_row("model", f"{card.model} ({card.architecture}, {card.num_layers} layers)")
    head.add_row("dataset", dataset_line(card))
    head.add_row("probe", f"{card.probe_examples} examples, {card.probe_tokens:,} tokens, loss {card.probe_loss:.4f}")
    head.add_row("time", f"{wall_seconds:.1f} s for the call; {origin}")
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    for header in ("layer", "Res² share", "Res²", "gain nats", "fwd+bwd ms", "adapter params"):
        table.add_column(header, justify="left" if header == "Res² share" else "right", no_wrap=True)
    largest = max((layer.resnorm_share for layer in card.layers), default=0.0)
    for layer in card.layers:
        table.add_row(
            str(layer.index),
            f"{layer.resnorm_share:6.1%} {share_bar(layer.resnorm_share, largest)}",
            f"{layer.resnorm_sq:.4g}",
            f"{layer.predicted_gain:.4f}",
            f"{(layer.forward_seconds + layer.backward_seconds) * 1e3:.2f}",
            f"{layer.adapter_parameters:,}",
        )
    parts: list[RenderableType] = [head, table]
    if card.HasField("training_cost"):
        tc = card.training_cost
        parts.append(
            Text(
                f"full-layer LoRA step: predicted {tc.predicted_full_step_seconds:.4f} s, measured "
                f"{tc.measured_full_step_seconds:.4f} s (cost model error {tc.step_time_relative_error:.1%}, "
                f"batch {tc.batch_size} x {tc.seq_len} tokens)"
            )
        )
    return parts


def plan_figures(plan: placement_pb2.Placement, max_step_fraction: float) -> list[RenderableType]:
    table = _kv()
    table.add_row("budget", f"step time at most {max_step_fraction:.0%} of full-layer LoRA's")
    table.add_row("layers", ", ".join(map(str, plan.layers)) or "-")
    modules = ", ".join(plan.lora.target_modules) or "all"
    table.add_row("adapter", f"rank {plan.lora.rank}, alpha {plan.lora.alpha:g}, modules {modules}")
    table.add_row(
        "predicted gain",
        f"{plan.predicted_gain.value:.4f} nats, {plan.predicted_gain_share:.1%} of full-layer LoRA's",
    )
    step = f"{plan.step_seconds.value:.4f} s"
    if plan.HasField("step_fraction_of_full"):
        step += f" ({plan.step_fraction_of_full.value:.1%} of full-layer LoRA's)"
    table.add_row("predicted step", step)
    if plan.HasField("adapter_parameters"):
        table.add_row("adapter size", f"{plan.adapter_parameters.value:,.0f} parameters")
    table.add_row("binding limits", ", ".join(plan.binding_limits) or "none")
    return [table, Text(f"rationale: {plan.rationale}")] if plan.rationale else [table]


def job_figures(job: tuning_pb2.TuningJob) -> list[RenderableType]:
    table = _kv()
    table.add_row("job", f"{job.name}: {state_name(tuning_pb2.TuningJobState, job.state, 'TUNING_JOB_STATE_')}")
    if job.error_code:
        table.add_row("error", Text(f"{job.error_code}: {job.error_message}"))
    if not job.HasField("result"):
        return [table]
    r = job.result
    layers = f" (layers {', '.join(map(str, job.placement.layers))})" if job.placement.layers else ""
    table.add_row("adapter", r.adapter_version + layers)
    table.add_row("steps", f"{job.step} in {_seconds(r.training_duration):.1f} s, {r.tokens_per_second:,.0f} tokens/s")
    if r.predicted_step_seconds:
        ratio = r.measured_step_seconds / r.predicted_step_seconds
        step = (
            f"measured {r.measured_step_seconds:.4f} s, predicted {r.predicted_step_seconds:.4f} s "
            f"(measured / predicted {ratio:.2f})"
        )
    else:
        step = f"measured {r.measured_step_seconds:.4f} s, no prediction"
    table.add_row("step time", step)
    if r.measured_peak_memory_bytes:
        memory = f"measured {fmt_bytes(r.measured_peak_memory_bytes)}"
        if r.predicted_peak_memory_bytes:
            memory += f", predicted {fmt_bytes(r.predicted_peak_memory_bytes)}"
        table.add_row("peak memory", memory)
    base, final = r.base_eval, r.final_eval
    table.add_row(
        "validation",
        f"loss {base.loss:.4f} -> {final.loss:.4f}, exact match {base.exact_match:.1%} -> {final.exact_match:.1%} "
        f"({final.examples} examples)",
    )
    return [table]


def deployment_figures(deployment: adapter_pb2.Deployment) -> list[RenderableType]:
    head = _kv()
    head.add_row("served as", f"{deployment.served_name} ({deployment.adapter} v{deployment.version})")
    head.add_row("state", state_name(adapter_pb2.DeploymentState, deployment.state, "DEPLOYMENT_STATE_"))
    replicas = Table(title="replicas", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("replica", "healthy", "loaded", "served names", "error"):
        replicas.add_column(name)
    for replica in deployment.replicas:
        replicas.add_row(
            replica.replica,
            "yes" if replica.healthy else "no",
            "yes" if replica.desired_loaded else "no",
            ", ".join(replica.observed_adapters) or "-",
            Text(replica.error),
        )
    parts: list[RenderableType] = [head, replicas]
    if deployment.checks:
        parts.append(deploy_checks_table(deployment.checks))
    if deployment.HasField("latency"):
        m = deployment.latency
        if m.source == adapter_pb2.LATENCY_SOURCE_SHAPE_CALIBRATION:
            where = Text(f"latency of the serving shape, not probed again ({m.basis}):")
        else:
            where = Text(f"latency measured on {m.replica or 'the fleet'} over {m.samples} samples:")
        latency = Table(box=box.SIMPLE_HEAD)
        for name in ("", "base", "adapter"):
            latency.add_column(name, justify="right" if name else "left")
        latency.add_row("time to first token", f"{m.base_ttft_ms:.1f} ms", f"{m.adapter_ttft_ms:.1f} ms")
        latency.add_row("inter-token", f"{m.base_inter_token_ms:.2f} ms", f"{m.adapter_inter_token_ms:.2f} ms")
        parts += [where, latency, Text(f"overhead of the adapter per request: {m.overhead_fraction:+.1%}")]
    return parts


@dataclass(frozen=True)
class GenerationRow:
    prompt: str
    expected: str
    base: inference_pb2.GenerateResponse
    adapted: inference_pb2.GenerateResponse


def _answer(response: inference_pb2.GenerateResponse, expected: str) -> Text:
    right = response.text.strip() == expected.strip()  # the task's metric: exact match after stripping space
    mark = "✓" if right else "✗"
    text = Text(f"{mark} {response.text.strip()!r}", style="green" if right else "red")
    text.append(f"\n{response.latency_ms:.0f} ms, ttft {response.time_to_first_token_ms:.0f} ms", style="dim")
    return text


def generation_table(rows: Sequence[GenerationRow], adapter_id: str) -> list[RenderableType]:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for name in ("prompt", "expected", "base model", f"with {adapter_id}"):
        table.add_column(name, no_wrap=True)
    for row in rows:
        prompt, expected = Text(repr(row.prompt)), Text(repr(row.expected.strip()))
        table.add_row(prompt, expected, _answer(row.base, row.expected), _answer(row.adapted, row.expected))
    base = sum(r.base.text.strip() == r.expected.strip() for r in rows)
    adapted = sum(r.adapted.text.strip() == r.expected.strip() for r in rows)
    served = rows[-1].adapted.served_model if rows else ""
    summary = f"exact match: base {base}/{len(rows)}, with the adapter {adapted}/{len(rows)} (served by {served})"
    return [table, Text(summary)]
