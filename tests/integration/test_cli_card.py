"""``layercard card get/compute`` with exports, against a real in-process server with a fake card service."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from google.protobuf import duration_pb2, json_format
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc
from layercard_client.cli import main
from layercard_service.server import Servicers

NAME = "layerCards/cli-card"


def small_card() -> layer_card_pb2.LayerCard:
    shares = (0.1, 0.5, 0.3, 0.1)
    layers = [
        layer_card_pb2.LayerStats(
            index=i,
            resnorm_sq=2 * share,
            resnorm_sq_split_half=1.5 * share,
            resnorm_share=share,
            predicted_gain=share,
            activation_energy=1.0 + i,
            modules=[layer_card_pb2.ModuleStats(module_type="q_proj", activation_energy=1.0 + i)],
            forward_seconds=0.001,
            backward_seconds=0.002,
            activation_bytes=2**20,
            adapter_parameters=1024,
        )
        for i, share in enumerate(shares)
    ]
    return layer_card_pb2.LayerCard(
        name=NAME,
        model="builtin:tiny",
        architecture="LlamaForCausalLM",
        num_layers=len(layers),
        layers=layers,
        training_cost=layer_card_pb2.TrainingCost(fixed_seconds=0.005, measured_full_step_seconds=0.018),
        probe_loss=2.5,
        probe_examples=16,
        probe_tokens=640,
    )


class FakeCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def GetLayerCard(self, request, context):
        return small_card()

    async def ComputeLayerCard(self, request, context):
        for fraction, phase in ((0.2, "probe"), (0.9, "calibrate")):
            progress = common_pb2.Progress(phase=phase, fraction=fraction, eta=duration_pb2.Duration(seconds=75))
            yield layer_card_pb2.ComputeLayerCardResponse(progress=progress)
        yield layer_card_pb2.ComputeLayerCardResponse(card=small_card())


@pytest.fixture(scope="module")
def fake_server():
    with ServerThread(servicers=Servicers(layer_card=FakeCards())) as running:
        yield running


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_card_get_prints_the_table_and_writes_exports(fake_server, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    figure, markdown = tmp_path / "fig", tmp_path / "card.md"
    argv = ("--address", fake_server.address, "card", "get", "cli-card")
    code, out, err = run(capsys, *argv, "--png-svg", str(figure), "--markdown", str(markdown))
    assert code == 0, err
    assert NAME in out and "LlamaForCausalLM" in out and "50.0%" in out
    assert "top layers by predicted gain: 1 " in out
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    svg = (tmp_path / "fig.svg").read_bytes()
    assert ET.fromstring(svg).tag.endswith("svg")
    assert b"coupling not computed" in svg  # matplotlib keeps drawn text as a comment
    text = markdown.read_text(encoding="utf-8")
    assert all(f"\n| {i} | " in text for i in range(4))
    assert f"wrote {markdown}" in err


def test_card_compute_json_stays_machine_output_and_writes_json_out(fake_server, capsys, tmp_path):
    saved = tmp_path / "card.json"
    argv = ("--address", fake_server.address, "--json", "card", "compute", "--model", "builtin:tiny")
    code, out, err = run(capsys, *argv, "--dataset", "builtin:cipher", "--json-out", str(saved))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [next(iter(line)) for line in lines] == ["progress", "progress", "card"]
    assert err == ""
    assert json_format.Parse(saved.read_text(encoding="utf-8"), layer_card_pb2.LayerCard()) == small_card()


def test_card_compute_readable_logs_phases(fake_server, capsys):
    argv = ("--address", fake_server.address, "card", "compute", "--model", "builtin:tiny")
    code, out, err = run(capsys, *argv, "--dataset", "builtin:cipher")
    assert code == 0, err
    assert NAME in out
    assert "probe: " in err and "calibrate: " in err  # each finished phase leaves a timed line


def test_unwritable_export_is_a_usage_error(fake_server, capsys, tmp_path):
    argv = ("--address", fake_server.address, "card", "get", "cli-card", "--markdown", str(tmp_path / "no" / "x.md"))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "cannot write" in err
