"""How the CLI shows things: protobuf JSON for scripts, rich tables for people.

With ``--json`` every response message is one JSON document on one line of stdout (streams: one per
message), so ``jq`` and line-oriented tools both work. Without it, messages are rendered as tables.
Progress and errors go to stderr, keeping stdout clean for pipes either way.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf import message as pb_message
from rich.console import Console, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from layercard.v1 import adapter_pb2, layer_card_pb2, placement_pb2, tuning_pb2
from layercard_client.cardview import card_summary, card_table  # beside the client, for non-CLI users too
from layercard_client.errors import LayercardClientError

__all__ = [
    "Output",
    "card_table",
    "card_view",
    "print_wide",
    "deployment_table",
    "fmt_bytes",
    "fmt_eta",
    "fmt_time",
    "job_table",
    "placement_table",
    "progress_bar",
    "state_name",
]


def fmt_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def fmt_time(message: pb_message.Message, field: str) -> str:
    """A Timestamp field as local ISO time, or "-" when unset."""
    if not message.HasField(field):
        return "-"
    return getattr(message, field).ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def state_name(enum: Any, value: int, prefix: str) -> str:
    name = enum.Name(value) if value in enum.values() else str(value)
    return name.removeprefix(prefix).lower()


class Output:
    """Where results go: JSON lines or rich renderings on stdout, progress and errors on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # Built per invocation so they bind to the sys.stdout/sys.stderr of the moment (pytest's capsys).
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=False)
        # soft_wrap: error lines stay whole in logs and CI output instead of breaking at 80 columns.
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def json(self, message: pb_message.Message) -> None:
        line = json_format.MessageToJson(message, indent=None, ensure_ascii=False)
        print(line, file=sys.stdout, flush=True)  # flush per line: a stream's consumer sees each event now

    def show(self, message: pb_message.Message, human: Any = None) -> None:
        """JSON in JSON mode; otherwise the rich renderable ``human`` (or its text)."""
        if self.as_json:
            self.json(message)
        elif human is not None:
            self.out.print(human)

    def error(self, exc: LayercardClientError) -> None:
        if self.as_json:
            print(json.dumps({"error": exc.to_dict()}, ensure_ascii=False), file=sys.stderr, flush=True)
            return
        self.err.print(f"[bold red]error:[/] [bold]{exc.code.name}[/]: {escape(exc.message)}", markup=True)
        if exc.reason:
            domain = f" ({exc.domain})" if exc.domain else ""
            self.err.print(f"  reason: {exc.reason}{domain}", markup=False)
        for key, value in sorted(exc.metadata.items()):
            self.err.print(f"  {key}: {value}", markup=False)
        for violation in exc.field_violations:
            self.err.print(f"  field {violation.field}: {violation.description}", markup=False)
        if exc.retry_after is not None:
            self.err.print(f"  retry after: {exc.retry_after:g} s", markup=False)

    def problem(self, text: str) -> None:
        """A CLI-side problem (bad option, unreadable file): stderr, JSON-shaped in JSON mode."""
        if self.as_json:
            print(json.dumps({"error": {"message": text}}), file=sys.stderr, flush=True)
        else:
            self.err.print(f"[bold red]error:[/] {escape(text)}", markup=True, highlight=False)


def progress_bar(out: Output, *, eta: bool = False) -> Progress:
    """A bar on stderr. ``eta``: a column for the server's own estimate (``task.fields["eta"]``), which knows
    the phases ahead; rich's rate-based guess does not."""
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn()]
    columns.append(TimeElapsedColumn())
    if eta:
        columns.append(TextColumn("{task.fields[eta]}", style="cyan", markup=False))
    columns.append(TextColumn("{task.fields[note]}", markup=False))
    # transient: the bar is for watching; what stays on screen is the result
    return Progress(*columns, console=out.err, transient=True)


def fmt_eta(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"eta {seconds} s"
    hours, rest = divmod(seconds, 3600)
    return f"eta {hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"eta {rest // 60}:{rest % 60:02d}"


def _kv_table(title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    return table


def card_view(card: layer_card_pb2.LayerCard) -> Group:
    """The card's table, then its summary lines (as plain text: names from the server may hold brackets)."""
    return Group(card_table(card), Text(card_summary(card)))


def print_wide(console: Console, renderable: Any) -> None:
    """On a terminal, as wide as the terminal; in files and pipes at the renderable's natural width, where rich
    would otherwise cut a wide table to 80 columns."""
    if console.is_terminal:
        console.print(renderable)
        return
    width = console.width  # print(width=...) cannot go beyond the console's own width: widen it for this call
    console.width = max(width, Measurement.get(console, console.options.update_width(10_000), renderable).maximum)
    try:
        console.print(renderable)
    finally:
        console.width = width


def _card_dataset_cells(card: layer_card_pb2.LayerCard) -> tuple[str, str, str]:
    if not card.HasField("dataset"):
        return "unknown", "-", "-"
    d = card.dataset
    source = f"{d.source} ({d.split})" if d.split else d.source
    return source, f"{d.examples_used:,}/{d.examples_total:,}", d.fingerprint[:12]


def cards_list_table(cards: list[layer_card_pb2.LayerCard]) -> Table:
    """One row per card. The name never wraps: print it with :func:`print_wide` so a pipe gets whole ids."""
    table = Table()
    for name in ("name", "model", "dataset", "examples", "data fingerprint", "layers", "probe loss", "created"):
        table.add_column(name, no_wrap=name in ("name", "data fingerprint", "created"))
    for card in cards:
        table.add_row(
            card.name,
            card.model,
            *_card_dataset_cells(card),
            str(card.num_layers),
            f"{card.probe_loss:.4f}",
            fmt_time(card, "create_time"),
        )
    return table


def placement_table(plan: placement_pb2.Placement) -> Table:
    outer = Table.grid()
    head = _kv_table()
    head.add_row("card", plan.layer_card)
    head.add_row("objective", state_name(placement_pb2.Objective, plan.objective, "OBJECTIVE_"))
    head.add_row("layers", ", ".join(map(str, plan.layers)) or "-")
    head.add_row("adapter", f"rank {plan.lora.rank}, modules {', '.join(plan.lora.target_modules) or 'all'}")
    if plan.steps:
        head.add_row("steps", str(plan.steps))
    if plan.serving_pool:
        head.add_row("serving pool", plan.serving_pool)
    head.add_row("binding", ", ".join(plan.binding_limits) or "none")
    if plan.gain_score:
        head.add_row("gain score", plan.gain_score)
    outer.add_row(head)
    predictions = Table(title="predictions", title_justify="left")
    for name in ("figure", "value", "unit", "basis"):
        predictions.add_column(name)
    for field in (
        "predicted_gain",
        "step_seconds",
        "step_fraction_of_full",
        "peak_memory_bytes",
        "adapter_parameters",
        "adapter_bytes",
        "serving_overhead_ms_per_token",
        "serving_overhead_fraction",
        "prefix_cache_build_seconds",  # set when the step is priced with the frozen-prefix cache
        "prefix_cache_bytes",
    ):
        if plan.HasField(field):
            p = getattr(plan, field)
            predictions.add_row(field.replace("_", " "), f"{p.value:.6g}", p.unit, p.basis)
    outer.add_row(predictions)
    if plan.predicted_curve:
        lr = f" at learning rate {plan.learning_rate:g}" if plan.learning_rate else " (a prior)"
        curve = Table(title=f"predicted learning curve{lr}", title_justify="left")
        for name in ("steps", "seconds", "gain", "low", "high"):
            curve.add_column(name, justify="right")
        for point in plan.predicted_curve:
            curve.add_row(
                str(point.steps),
                f"{point.seconds:.4g}",
                f"{point.gain:.4g}",
                f"{point.gain_low:.4g}",
                f"{point.gain_high:.4g}",
            )
        outer.add_row(curve)
    if plan.rationale:
        outer.add_row(f"\n{plan.rationale}")
    return outer


def job_table(job: tuning_pb2.TuningJob) -> Table:
    table = _kv_table()
    table.add_row("job", job.name)
    table.add_row("state", state_name(tuning_pb2.TuningJobState, job.state, "TUNING_JOB_STATE_"))
    table.add_row("adapter", job.adapter_id)
    table.add_row("model", job.model)
    table.add_row("progress", f"step {job.step} / {job.total_steps}")
    if job.placement.layers:
        table.add_row("layers", ", ".join(map(str, job.placement.layers)))
    table.add_row("created", fmt_time(job, "create_time"))
    if job.HasField("end_time"):
        table.add_row("ended", fmt_time(job, "end_time"))
    if job.error_code:
        table.add_row("error", f"{job.error_code}: {job.error_message}")
    if job.HasField("result"):
        r = job.result
        table.add_row("result", r.adapter_version)
        table.add_row(
            "eval",
            f"loss {r.base_eval.loss:.4f} -> {r.final_eval.loss:.4f}, exact match {r.final_eval.exact_match:.1%}",
        )
        predicted = (
            f"predicted {r.predicted_step_seconds:.4f} s" if r.predicted_step_seconds else "no prediction (no card)"
        )
        table.add_row("step time", f"measured {r.measured_step_seconds:.4f} s, {predicted}")
        if r.measured_peak_memory_bytes:
            memory = f"measured {r.measured_peak_memory_bytes / 2**20:.1f} MiB"
            if r.predicted_peak_memory_bytes:
                memory += f", predicted {r.predicted_peak_memory_bytes / 2**20:.1f} MiB"
            table.add_row("peak memory", memory)
    return table


def jobs_list_table(jobs: list[tuning_pb2.TuningJob]) -> Table:
    table = Table()
    for name in ("name", "state", "adapter", "step", "created"):
        table.add_column(name)
    for job in jobs:
        state = state_name(tuning_pb2.TuningJobState, job.state, "TUNING_JOB_STATE_")
        table.add_row(job.name, state, job.adapter_id, f"{job.step}/{job.total_steps}", fmt_time(job, "create_time"))
    return table


def deployment_table(deployment: adapter_pb2.Deployment, replicas: Any = None) -> Table:
    outer = Table.grid()
    if deployment.adapter:
        head = _kv_table()
        head.add_row("adapter", f"{deployment.adapter} v{deployment.version} as {deployment.served_name}")
        head.add_row("state", state_name(adapter_pb2.DeploymentState, deployment.state, "DEPLOYMENT_STATE_"))
        if deployment.pool:
            head.add_row("pool", deployment.pool)
        if deployment.HasField("latency"):
            m = deployment.latency
            source = "calibrated" if m.source == adapter_pb2.LATENCY_SOURCE_SHAPE_CALIBRATION else "probed"
            head.add_row("latency", f"overhead {m.overhead_fraction:+.1%} ({source}, {m.samples} samples)")
        outer.add_row(head)
    if deployment.checks:
        outer.add_row(deploy_checks_table(deployment.checks))
    rows = Table(title="replicas", title_justify="left")
    for name in ("replica", "healthy", "desired loaded", "loaded adapters", "error"):
        rows.add_column(name)
    for replica in replicas if replicas is not None else deployment.replicas:
        rows.add_row(
            replica.replica,
            "yes" if replica.healthy else "no",
            "yes" if replica.desired_loaded else "no",
            ", ".join(replica.observed_adapters) or "-",
            replica.error or "",
        )
    outer.add_row(rows)
    return outer


def deploy_checks_table(checks) -> Table:
    """What a deploy checked, in order: the verify result of every replica among them."""
    table = Table(title="checks", title_justify="left")
    for name in ("check", "outcome", "replica", "detail"):
        table.add_column(name)
    for c in checks:
        outcome = state_name(adapter_pb2.CheckOutcome, c.outcome, "CHECK_OUTCOME_").replace("_", " ")
        table.add_row(c.name, outcome, c.replica or "-", c.detail)
    return table


def adapters_list_table(adapters: list[adapter_pb2.Adapter]) -> Table:
    table = Table()
    for name in ("name", "base model", "versions", "deployed", "pool", "state", "replicas ready", "live verdict"):
        table.add_column(name)
    for adapter in adapters:
        d = adapter.deployment
        deployed = adapter.HasField("deployment")
        ready = sum(r.desired_loaded for r in d.replicas)
        table.add_row(
            adapter.name,
            adapter.base_model,
            ", ".join(str(v.version) for v in adapter.versions) or "-",
            f"v{d.version}" if deployed else "-",
            d.pool or "-" if deployed else "-",
            state_name(adapter_pb2.DeploymentState, d.state, "DEPLOYMENT_STATE_") if deployed else "-",
            f"{ready}/{len(d.replicas)}" if deployed else "-",
            live_verdict_text(adapter.live_verdict) if adapter.HasField("live_verdict") else "-",
        )
    return table


def live_verdict_text(v: adapter_pb2.LiveVerdict) -> str:
    """'v2 over: +62.0% > 10%' (rolled back), 'v3 within: +4.1% <= 20%', 'v2 inconclusive'."""
    outcome = state_name(adapter_pb2.LiveOutcome, v.outcome, "LIVE_OUTCOME_")
    if not v.HasField("overhead_fraction"):
        return f"v{v.version} {outcome}"
    sign = ">" if v.outcome == adapter_pb2.LIVE_OUTCOME_OVER else "<="
    return f"v{v.version} {outcome}: {v.overhead_fraction:+.1%} {sign} {v.budget:.0%}"
