"""Card views and figures on a synthetic 8-layer card: the table, Markdown, JSON and PNG/SVG exports."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET

import pytest
from google.protobuf import duration_pb2, json_format
from rich.console import Console

from layercard.v1 import common_pb2, layer_card_pb2
from layercard_client.cardview import card_json, card_markdown, card_summary, card_table, coupling_rows, share_bar

L = 8
TYPES = ("q_proj", "v_proj", "o_proj")
ENERGY = {"q_proj": 1.0, "v_proj": 0.6, "o_proj": 10.0}  # o_proj's input is not normalised (METHOD.md)


def synthetic_card(num_layers: int = L, coupling: bool = True) -> layer_card_pb2.LayerCard:
    """A plausible card: gain peaking in the middle, energies growing with depth, a banded coupling matrix."""
    res = [1.0 + 4.0 * math.exp(-((i - num_layers / 2) ** 2) / 4) for i in range(num_layers)]
    total = sum(res)
    layers = []
    for i, r in enumerate(res):
        modules = [
            layer_card_pb2.ModuleStats(
                module_type=name,
                resnorm_sq=r / len(TYPES),
                resnorm_sq_split_half=(r - 0.8) / len(TYPES),
                activation_energy=ENERGY[name] * (1 + i) ** 1.5,
                effective_rank=6.0 - 0.1 * i,
                condition_number=20.0 + i,
                adapter_parameters=8 * 128,
            )
            for name in TYPES
        ]
        layers.append(
            layer_card_pb2.LayerStats(
                index=i,
                resnorm_sq=r,
                resnorm_sq_split_half=r - 0.8,  # probe noise: a fixed part of every layer's Res²
                resnorm_share=r / total,
                predicted_gain=0.5 * r,
                activation_energy=sum(m.activation_energy for m in modules),
                effective_rank=6.0 - 0.1 * i,
                condition_number=20.0 + i,
                modules=modules,
                forward_seconds=0.002,
                backward_seconds=0.004,
                activation_bytes=3 * 2**20,
                adapter_parameters=3 * 8 * 128,
                adapter_bytes=3 * 8 * 128 * 4,
                peft_serving_overhead_ms_per_token=0.05,
                measured_gain=0.4 * r if i % 2 == 0 else None,
            )
        )
    card = layer_card_pb2.LayerCard(
        name="layerCards/synthetic",
        model="builtin:tiny",
        architecture="LlamaForCausalLM",
        num_layers=num_layers,
        num_parameters=2_200_000,
        fingerprint="f" * 16,
        settings=layer_card_pb2.ComputeLayerCardRequest(
            model="builtin:tiny",
            dataset=common_pb2.DatasetSource(builtin="builtin:cipher", split="train"),
            probe_size=64,
            lora=common_pb2.LoraShape(rank=8, alpha=16, target_modules=TYPES),
            compute_coupling=coupling,
            max_seq_len=128,
        ),
        compute_duration=duration_pb2.Duration(seconds=3, nanos=500_000_000),
        layers=layers,
        training_cost=layer_card_pb2.TrainingCost(
            fixed_seconds=0.01,
            per_adapter_seconds=0.001,
            predicted_full_step_seconds=0.01 + num_layers * 0.006,
            measured_full_step_seconds=0.01 + num_layers * 0.0062,
            predicted_partial_step_seconds=0.04,
            measured_partial_step_seconds=0.041,
            validation_layers=range(num_layers // 2, num_layers),
            step_time_relative_error=0.025,
            peak_memory_relative_error=0.04,
            batch_size=8,
            seq_len=128,
        ),
        serving_cost=layer_card_pb2.ServingCost(peft_base_ms_per_token=1.5),
        probe_loss=2.3456,
        probe_examples=64,
        probe_tokens=5120,
    )
    if coupling:
        rho = [
            math.exp(-abs(i - j) / 2) * (-1 if i != j and (i + j) % 3 == 0 else 1)
            for i in range(num_layers)
            for j in range(num_layers)
        ]
        card.coupling.CopyFrom(layer_card_pb2.CouplingMatrix(size=num_layers, values=rho))
    return card


def rendered(renderable) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with console
    console.print(renderable)
    text = console.export_text()
    console.file.close()
    return text


def test_table_has_one_row_per_layer_and_a_caption():
    card = synthetic_card()
    table = card_table(card)
    assert table.row_count == L
    text = rendered(table)
    assert "layerCards/synthetic" in text and "LlamaForCausalLM" in text
    assert "q_proj, v_proj, o_proj" in text and "2.5%" in text  # module types, step-time validation error
    assert "█" in text
    assert "measured" in text  # the performance column appears when any layer has it


def test_share_bar_scales_to_the_largest():
    assert share_bar(1.0, 1.0) == "█" * 8
    assert share_bar(0.5, 1.0) == "█" * 4
    assert share_bar(0.0, 1.0) == "" and share_bar(1.0, 0.0) == ""


def test_summary_names_the_top_layers_costs_and_vllm():
    summary = card_summary(synthetic_card())
    assert summary.splitlines()[0].startswith("top layers by predicted gain: 4 ")
    assert "step time error 2.5%" in summary
    assert "vLLM" in summary and "not measured yet" in summary
    assert "split-half Res² is 71%" in summary
    assert "coupling: layers" in summary


def test_summary_and_markdown_show_each_serving_pools_measured_ranks():
    card = synthetic_card()
    lean = card.serving_cost.vllm_pools.add(pool="lean", lora_target_modules=["o_proj"], max_lora_rank=8)
    lean.ranks.add(rank=8, overhead_fraction=0.13, samples=3, basis="median of 3 probes")
    card.serving_cost.vllm_pools.add(pool="full", max_lora_rank=8)
    summary = card_summary(card)
    assert "pool lean (wrapping o_proj, max rank 8): rank 8 +13.0% (3 probes)" in summary
    assert "pool full (wrapping every module, max rank 8): not measured yet" in summary
    assert "  - pool lean (wrapping o_proj, max rank 8): rank 8 +13.0%" in card_markdown(card)


def test_markdown_has_every_layer_modules_costs_and_coupling():
    markdown = card_markdown(synthetic_card())
    for i in range(L):
        assert f"\n| {i} | " in markdown
    assert "## Modules" in markdown and "`o_proj`" in markdown
    assert "## Training cost" in markdown and "## Coupling" in markdown
    coupling = markdown.split("## Coupling", 1)[1]
    assert coupling.count("\n| ") == L + 2  # header, alignment and one row per layer
    assert "## Coupling" not in card_markdown(synthetic_card(coupling=False))


def test_json_round_trips():
    card = synthetic_card()
    text = card_json(card)
    assert '"resnorm_sq_split_half"' in text  # the proto's field names, not lowerCamelCase
    assert json_format.Parse(text, layer_card_pb2.LayerCard()) == card
    assert card_json(card) == text


def test_coupling_rows_rejects_a_malformed_matrix():
    card = synthetic_card()
    assert len(coupling_rows(card)) == L
    del card.coupling.values[-1]
    assert coupling_rows(card) == []


def test_figure_is_png_and_svg_and_reproducible(tmp_path):
    pytest.importorskip("matplotlib")
    from layercard_client.cardplot import step_seconds_from, write_figure

    card = synthetic_card()
    paths = write_figure(card, tmp_path / "card.v1")
    assert [p.name for p in paths] == ["card.v1.png", "card.v1.svg"]
    png, svg = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ET.fromstring(svg.read_bytes()).tag.endswith("svg")
    first = svg.read_bytes()
    write_figure(card, tmp_path / "card.v1")
    assert svg.read_bytes() == first
    steps = step_seconds_from(card)
    assert steps[0] == pytest.approx(0.01 + L * 0.006) and steps[-1] == pytest.approx(0.01 + L * 0.002 + 0.004)


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    from layercard_client import cardplot
    from layercard_client.errors import ClientConfigError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra looks like
    with pytest.raises(ClientConfigError, match=r"pip install 'layercard-client\[render\]'"):
        cardplot.write_figure(synthetic_card(), "/nonexistent/never")
