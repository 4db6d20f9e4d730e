"""The card's dataset in every CLI view (get, list, JSON, Markdown, figure, demo), and whole ids in a pipe."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from support.server_thread import ServerThread

from layercard.v1 import layer_card_pb2, layer_card_pb2_grpc
from layercard_client.cli import main
from layercard_client.cli.demo_view import card_figures
from layercard_service.server import Servicers

FINGERPRINT = "0123456789abcdef" * 4
NEW = "layerCards/0123456789abcdef01234567"
OLD = "layerCards/fedcba9876543210fedcba98"
LONG_MODEL = "/srv/models/a-team-with-a-long-name/llama-3.2-1b-instruct-finetuned-v7"


def card(name: str, with_dataset: bool) -> layer_card_pb2.LayerCard:
    message = layer_card_pb2.LayerCard(
        name=name,
        model=LONG_MODEL,
        architecture="LlamaForCausalLM",
        num_layers=1,
        layers=[layer_card_pb2.LayerStats(index=0, resnorm_share=1.0, predicted_gain=0.5)],
        probe_loss=2.5,
        probe_examples=16,
        probe_tokens=640,
    )
    if with_dataset:
        message.dataset.CopyFrom(
            layer_card_pb2.CardDataset(
                source="builtin:cipher", split="train", fingerprint=FINGERPRINT, examples_used=16, examples_total=2000
            )
        )
        message.settings.dataset.builtin = "builtin:cipher"
        message.settings.dataset.split = "train"
    return message


class FakeCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def GetLayerCard(self, request, context):
        return card(request.name, request.name == NEW)

    async def ListLayerCards(self, request, context):
        return layer_card_pb2.ListLayerCardsResponse(layer_cards=[card(NEW, True), card(OLD, False)])


@pytest.fixture(scope="module")
def fake_server():
    with ServerThread(servicers=Servicers(layer_card=FakeCards())) as running:
        yield running


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_card_get_shows_the_dataset_in_text_json_markdown_and_figure(fake_server, capsys, tmp_path):
    base = ("--address", fake_server.address, "card", "get", NEW)
    code, out, err = run(capsys, *base, "--markdown", str(tmp_path / "card.md"))
    assert code == 0, err
    assert "dataset builtin:cipher (train): 16 of 2,000 examples, fingerprint 0123456789ab" in out
    markdown = (tmp_path / "card.md").read_text(encoding="utf-8")
    assert f"| dataset | builtin:cipher (train); 16 of 2,000 examples used; fingerprint `{FINGERPRINT}` |" in markdown

    code, out, err = run(capsys, "--address", fake_server.address, "--json", "card", "get", NEW)
    assert code == 0, err
    shown = json.loads(out)["dataset"]
    assert shown == {
        "source": "builtin:cipher",
        "split": "train",
        "fingerprint": FINGERPRINT,
        "examplesUsed": 16,
        "examplesTotal": "2000",
    }

    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, *base, "--png-svg", str(tmp_path / "fig"))
    assert code == 0, err
    svg = (tmp_path / "fig.svg").read_bytes()  # matplotlib keeps drawn text as a comment
    assert b"dataset builtin:cipher (train): 16 of 2,000 examples, fingerprint 0123456789ab" in svg


def test_a_card_without_a_dataset_record_shows_unknown(fake_server, capsys):
    code, out, err = run(capsys, "--address", fake_server.address, "card", "get", OLD)
    assert code == 0, err
    assert "dataset unknown" in out


def test_card_list_in_a_pipe_prints_whole_ids_and_the_dataset(fake_server, capsys):
    code, out, err = run(capsys, "--address", fake_server.address, "card", "list")
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if "layerCards/" in line}  # "│ name │ ..."
    assert set(rows) == {NEW, OLD}  # whole ids, each on one line, though the table is wider than 80 columns
    assert LONG_MODEL in rows[NEW] and "builtin:cipher (train)" in rows[NEW] and "16/2,000" in rows[NEW]
    assert "0123456789ab" in rows[NEW] and "unknown" in rows[OLD]


def test_demo_card_step_shows_the_dataset():
    console = Console(width=200, record=True)
    for part in card_figures(card(NEW, True), 1.0):
        console.print(part)
    assert "dataset  builtin:cipher (train): 16 of 2,000 examples, fingerprint 0123456789ab" in console.export_text()
