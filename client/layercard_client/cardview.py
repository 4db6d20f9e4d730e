"""Views of a Layer Card for people and files: a terminal table, a short summary, Markdown and JSON.

Pure functions of a ``layer_card_pb2.LayerCard`` (no RPC, no torch), so the CLI, notebooks and other services
render a card the same way whether it came from ``ComputeLayerCard``, ``GetLayerCard`` or a saved JSON file.
Definitions of every column: METHOD.md, "Our definitions".
"""

from __future__ import annotations

from google.protobuf import json_format
from rich import box
from rich.table import Table

from layercard.v1 import common_pb2, layer_card_pb2
from layercard_client.cardcost import MIB as _MIB
from layercard_client.cardcost import cost_error, costs_markdown, pool_cost_lines
from layercard_client.markdown import md_table

__all__ = [
    "card_table",
    "card_summary",
    "card_markdown",
    "card_json",
    "dataset_line",
    "module_types",
    "coupling_rows",
    "share_bar",
]

_BAR_WIDTH = 8
_PARTIAL_BLOCKS = " ▏▎▍▌▋▊▉"  # eighths, so eight cells resolve 64 levels
_TOP = 3


def share_bar(value: float, largest: float, width: int = _BAR_WIDTH) -> str:
    """A bar scaled to the largest value: with dozens of layers raw shares are all a few percent, and what the
    reader needs is which layers stand out."""
    if largest <= 0 or value <= 0:
        return ""
    eighths = round(min(value / largest, 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_PARTIAL_BLOCKS[part] if part else "")


def module_types(card: layer_card_pb2.LayerCard) -> list[str]:
    """Module types the card covers, in first-seen order; the requested targets when no layer lists modules."""
    seen: dict[str, None] = {}
    for layer in card.layers:
        for module in layer.modules:
            seen.setdefault(module.module_type, None)
    return list(seen) or list(card.settings.lora.target_modules)


def coupling_rows(card: layer_card_pb2.LayerCard) -> list[list[float]]:
    """The coupling matrix as rows, or ``[]`` when it was not computed (or is malformed: size² values needed)."""
    size, values = card.coupling.size, list(card.coupling.values)
    if size <= 0 or len(values) != size * size:
        return []
    return [values[i * size : (i + 1) * size] for i in range(size)]


def _top_layers(card: layer_card_pb2.LayerCard, count: int = _TOP) -> list[layer_card_pb2.LayerStats]:
    return sorted(card.layers, key=lambda layer: (-layer.predicted_gain, layer.index))[:count]


def _num(x: float) -> str:
    """Three significant digits at a fixed number of decimals, so a column's figures line up (5.00, 0.273, 130)."""
    size = abs(x)
    if size == 0:
        return "0"
    if size >= 1000 or size < 1e-3:
        return f"{x:.2e}"
    decimals = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    return f"{x:.{decimals}f}"


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _model_line(card: layer_card_pb2.LayerCard) -> str:
    return f"{card.model} ({card.architecture}, {card.num_layers} layers, {_params(card.num_parameters)} params)"


def _probe_line(card: layer_card_pb2.LayerCard) -> str:
    return f"probe loss {card.probe_loss:.4f} nats on {card.probe_examples} examples, {card.probe_tokens:,} tokens"


def dataset_line(card: layer_card_pb2.LayerCard, fingerprint_chars: int = 12) -> str:
    """Which data the card was computed on, how much of it the probe used, and its fingerprint (shortened to
    ``fingerprint_chars``, 0 for all of it); "unknown" for cards stored before the dataset was recorded."""
    if not card.HasField("dataset"):
        return "unknown (a card stored before cards recorded their dataset)"
    d = card.dataset
    source = f"{d.source} ({d.split})" if d.split else d.source
    fingerprint = d.fingerprint[:fingerprint_chars] if fingerprint_chars else d.fingerprint
    return f"{source}: {d.examples_used:,} of {d.examples_total:,} examples, fingerprint {fingerprint}"


def _seconds(card: layer_card_pb2.LayerCard) -> float:
    return card.compute_duration.ToTimedelta().total_seconds() if card.HasField("compute_duration") else 0.0


def card_table(card: layer_card_pb2.LayerCard) -> Table:
    """One row per layer; the three layers with the largest predicted gain in bold. The caption holds what a
    reader needs to trust the rows: model, probe set, how well the cost model matched a measured step."""
    store = "  (from store)" if card.from_store else f"  (computed in {_seconds(card):.1f} s)"
    table = Table(
        title=f"{card.name or 'Layer Card'}{store}",
        title_justify="left",
        caption=_caption(card),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
    )
    measured = any(layer.HasField("measured_gain") for layer in card.layers)
    # Two-line headers: the values, not the names, should set the widths of a 13-column table.
    headers = ["#", "Res² share", "Res²", "split-\nhalf", "gain\nnats", "E_act", "eff.\nrank", "cond.", "fwd/bwd\nms"]
    headers += ["pass/no-\ngraph ms", "act.\nMiB", "adapter\nparams", "peft\nms/tok"]
    headers += ["measured\ngain"] if measured else []
    for header in headers:
        table.add_column(header, justify="left" if header == "Res² share" else "right", no_wrap=True)
    top = {layer.index for layer in _top_layers(card)}
    largest = max((layer.resnorm_share for layer in card.layers), default=0.0)
    for layer in card.layers:
        row = [
            str(layer.index),
            f"{layer.resnorm_share:6.1%} {share_bar(layer.resnorm_share, largest):<{_BAR_WIDTH}}",
            _num(layer.resnorm_sq),
            _num(layer.resnorm_sq_split_half),
            f"{layer.predicted_gain:.4f}",
            _num(layer.activation_energy),
            f"{layer.effective_rank:.1f}",
            _num(layer.condition_number),
            f"{layer.forward_seconds * 1e3:.2f}/{layer.backward_seconds * 1e3:.2f}",
            f"{layer.pass_through_seconds * 1e3:.2f}/{layer.no_graph_seconds * 1e3:.2f}",
            f"{layer.activation_bytes / _MIB:.2f}",
            f"{layer.adapter_parameters:,}",
            f"{layer.peft_serving_overhead_ms_per_token:.3f}",
        ]
        if measured:
            row.append(f"{layer.measured_gain:.4f}" if layer.HasField("measured_gain") else "-")
        table.add_row(*row, style="bold" if layer.index in top else None)
    return table


def _caption(card: layer_card_pb2.LayerCard) -> str:
    lines = [_model_line(card), f"dataset {dataset_line(card)}", _probe_line(card)]
    if card.HasField("training_cost"):
        tc = card.training_cost
        lines.append(f"cost model error: {cost_error(tc)} (batch {tc.batch_size} x {tc.seq_len} tokens)")
    lora = card.settings.lora
    rank = f"rank {lora.rank}, " if lora.rank else ""
    lines.append(f"adapter: {rank}modules {', '.join(module_types(card)) or 'all'}")
    return "\n".join(lines)


def _most_coupled(card: layer_card_pb2.LayerCard) -> tuple[int, int, float] | None:
    rows = coupling_rows(card)
    pairs = [(i, j, rows[i][j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return max(pairs, key=lambda pair: (abs(pair[2]), -pair[0], -pair[1]), default=None)


def card_summary(card: layer_card_pb2.LayerCard) -> str:
    """A few lines to read before the table: where the gain is, whether the cost model held, what serving costs."""
    total_gain = sum(layer.predicted_gain for layer in card.layers) or 1.0
    top = ", ".join(
        f"{layer.index} ({layer.predicted_gain:.4f} nats, {layer.predicted_gain / total_gain:.0%})"
        for layer in _top_layers(card)
    )
    lines = [f"top layers by predicted gain: {top or '-'}"]
    plain = sum(layer.resnorm_sq for layer in card.layers)
    split = sum(layer.resnorm_sq_split_half for layer in card.layers)
    if plain > 0 and split != 0:
        # The split-half estimate drops the probe's sampling noise; a low ratio says the probe set is too small.
        noise = " (the rest is probe noise)" if split < plain else ""
        lines.append(f"signal: split-half Res² is {split / plain:.0%} of plain Res²{noise}")
    if card.HasField("training_cost"):
        tc = card.training_cost
        error = (
            f"cost model error: {cost_error(tc)}"
            if tc.HasField("calibration")
            else f"cost model fit: step time error {tc.step_time_relative_error:.1%}, peak memory error "
            f"{tc.peak_memory_relative_error:.1%}"
        )
        lines.append(
            f"{error}; full-layer step predicted {tc.predicted_full_step_seconds:.4f} s, "
            f"measured {tc.measured_full_step_seconds:.4f} s"
        )
        lines += [f"cost model note: {note}" for note in tc.calibration.notes]
    sc = card.serving_cost
    if sc.HasField("vllm_overhead_fraction"):
        vllm = f"+{sc.vllm_overhead_fraction:.1%} over base ({sc.vllm_basis or 'measured'})"
        if sc.HasField("vllm_base_ms_per_token"):
            vllm += f"; base {sc.vllm_base_ms_per_token:.3f} ms/token on the serving vLLM"
    else:
        vllm = "not measured yet (measured after a deployment)"
    # vLLM wraps every layer of the module types it serves: fewer adapted layers do not make it cheaper.
    lines.append(f"serving on vLLM (independent of the number of adapted layers): {vllm}")
    lines += [f"  {line}" for line in pool_cost_lines(sc)]
    if sc.peft_base_ms_per_token > 0:
        every = sum(layer.peft_serving_overhead_ms_per_token for layer in card.layers)
        lines.append(
            f"serving (unmerged peft): base {sc.peft_base_ms_per_token:.3f} ms/token, "
            f"+{every:.3f} ms/token with every layer adapted"
        )
    pair = _most_coupled(card)
    if pair is not None:
        i, j, rho = pair
        lines.append(
            f"coupling: layers {i} and {j} overlap most (ρ = {rho:+.2f}); adapting both buys less than the sum"
        )
    return "\n".join(lines)


def _dataset_text(card: layer_card_pb2.LayerCard) -> str:
    source = card.settings.dataset
    kind = source.WhichOneof("source")
    if kind == "builtin":
        text = source.builtin
    elif kind == "path":
        text = f"`{source.path}`"
    elif kind == "inline_jsonl":
        text = (
            f"inline JSONL, {source.inline_jsonl_size_bytes or len(source.inline_jsonl):,} bytes"  # responses: by hash
        )
        if source.inline_jsonl_sha256:
            text += f", sha256 `{source.inline_jsonl_sha256}`"
    else:
        return "unknown (a card stored before cards recorded their dataset)"
    text = f"{text} ({source.split})" if source.split else text
    if card.HasField("dataset"):
        d = card.dataset
        text += f"; {d.examples_used:,} of {d.examples_total:,} examples used; fingerprint `{d.fingerprint}`"
    return text


def _settings_rows(card: layer_card_pb2.LayerCard) -> list[list[object]]:
    s = card.settings
    device = common_pb2.Device.Name(s.device).removeprefix("DEVICE_").lower().replace("unspecified", "auto")
    precision = common_pb2.Precision.Name(s.precision).removeprefix("PRECISION_").lower().replace("unspecified", "auto")
    alpha = f", alpha {s.lora.alpha:g}" if s.lora.alpha else ""
    created = card.create_time.ToJsonString() if card.HasField("create_time") else "-"
    return [
        ["card", f"`{card.name}`" if card.name else "-"],
        ["model", _model_line(card)],
        ["fingerprint", f"`{card.fingerprint}`" if card.fingerprint else "-"],
        ["dataset", _dataset_text(card)],
        ["probe", _probe_line(card)],
        ["adapter", f"rank {s.lora.rank}{alpha}, modules {', '.join(module_types(card)) or 'all'}"],
        ["device", f"{device}, {precision}, seed {s.seed}, max seq len {s.max_seq_len}"],
        [
            "extras",
            f"coupling {'yes' if s.compute_coupling else 'no'}, performance "
            + (f"yes ({s.performance_steps} steps{_rates(card)})" if s.compute_performance else "no"),
        ],
        ["created", f"{created}, computed in {_seconds(card):.1f} s" + (" (from store)" if card.from_store else "")],
    ]


def _rates(card: layer_card_pb2.LayerCard) -> str:
    """The all-layer pilots' learning rates and the gain each reached."""
    if not card.learning_rate_pilots:
        return ""
    runs = ", ".join(
        f"{p.learning_rate:g}: {p.gain_curve[-1]:+.3g} nats" for p in card.learning_rate_pilots if p.gain_curve
    )
    return f"; all layers at learning rate {runs}"


def card_markdown(card: layer_card_pb2.LayerCard) -> str:
    """A self-contained Markdown report (settings, layers, modules, costs, coupling) for notes and reviews."""
    lines = [f"# Layer Card: {card.model or card.name}", ""]
    lines += md_table(["setting", "value"], _settings_rows(card), ["---", "---"])
    lines += ["", "## Summary", ""] + [f"- {line}" for line in card_summary(card).splitlines()]
    measured = any(layer.HasField("measured_gain") for layer in card.layers)
    headers = ["layer", "Res² share", "Res²", "split-half Res²", "predicted gain (nats)", "E_act", "eff. rank"]
    headers += ["cond.", "fwd ms", "bwd ms", "pass-through ms", "no-graph ms", "act. MiB", "pass-through act. MiB"]
    headers += ["adapter params", "adapter bytes", "peft ms/token"]
    rows = []
    for layer in card.layers:
        row: list[object] = [
            layer.index,
            f"{layer.resnorm_share:.2%}",
            f"{layer.resnorm_sq:.4g}",
            f"{layer.resnorm_sq_split_half:.4g}",
            f"{layer.predicted_gain:.5f}",
            f"{layer.activation_energy:.4g}",
            f"{layer.effective_rank:.2f}",
            f"{layer.condition_number:.4g}",
            f"{layer.forward_seconds * 1e3:.3f}",
            f"{layer.backward_seconds * 1e3:.3f}",
            f"{layer.pass_through_seconds * 1e3:.3f}",
            f"{layer.no_graph_seconds * 1e3:.3f}",
            f"{layer.activation_bytes / _MIB:.3f}",
            f"{layer.pass_through_activation_bytes / _MIB:.3f}",
            f"{layer.adapter_parameters:,}",
            f"{layer.adapter_bytes:,}",
            f"{layer.peft_serving_overhead_ms_per_token:.4f}",
        ]
        if measured:
            row.append(f"{layer.measured_gain:.5f}" if layer.HasField("measured_gain") else "-")
        rows.append(row)
    if measured:
        headers.append("measured gain")
    lines += ["", "## Layers", "", *md_table(headers, rows)]
    module_rows = [
        [
            layer.index,
            f"`{m.module_type}`",
            f"{m.resnorm_sq:.4g}",
            f"{m.resnorm_sq_split_half:.4g}",
            f"{m.activation_energy:.4g}",
            f"{m.effective_rank:.2f}",
            f"{m.condition_number:.4g}",
            f"{m.adapter_parameters:,}",
        ]
        for layer in card.layers
        for m in layer.modules
    ]
    if module_rows:
        headers = ["layer", "module", "Res²", "split-half Res²", "E_act", "eff. rank", "cond.", "adapter params"]
        lines += ["", "## Modules", "", "Activation energies compare within a module type only.", ""]
        lines += md_table(headers, module_rows)
    lines += costs_markdown(card)
    rows_rho = coupling_rows(card)
    if rows_rho:
        lines += ["", "## Coupling", "", "Function-space cosine ρ of the layers' whitened steps.", ""]
        headers = ["ρ"] + [str(j) for j in range(len(rows_rho))]
        lines += md_table(headers, ([i] + [f"{v:+.2f}" for v in row] for i, row in enumerate(rows_rho)))
    return "\n".join(lines) + "\n"


def card_json(card: layer_card_pb2.LayerCard) -> str:
    """Protobuf JSON with the proto's field names and sorted keys, so saved cards diff cleanly."""
    text = json_format.MessageToJson(card, preserving_proto_field_name=True, sort_keys=True, indent=2)
    return text + "\n"
