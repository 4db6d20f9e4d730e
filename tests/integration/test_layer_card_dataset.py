"""A card records its dataset (source, fingerprint, examples used and total), over a real socket."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.tasks import get_task

SMALL = dict(probe_size=16, max_seq_len=48)  # a card in seconds on two cores
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def jsonl(words) -> bytes:
    return ("\n".join(json.dumps({"prompt": f"say {w}:", "completion": f" {w[::-1]}"}) for w in words) + "\n").encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "words.jsonl").write_bytes(jsonl(WORDS * 3))
    config = ServiceConfig(
        port=0, log_format="text", data_dir=tmp_path_factory.mktemp("state"), model_roots=(), dataset_roots=(data,)
    )
    with ServerThread(config) as running:
        with grpc.insecure_channel(running.address) as channel:
            running.stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
            running.data = data
            yield running


def compute(server, dataset: common_pb2.DatasetSource) -> layer_card_pb2.LayerCard:
    request = layer_card_pb2.ComputeLayerCardRequest(model="builtin:tiny", dataset=dataset, **SMALL)
    return list(server.stub.ComputeLayerCard(request, timeout=600))[-1].card


def test_card_carries_a_builtin_dataset_and_get_and_list_show_it(server):
    card = compute(server, common_pb2.DatasetSource(builtin="builtin:cipher"))
    d = card.dataset
    assert (d.source, d.split) == ("builtin:cipher", "train")
    assert d.examples_used == card.probe_examples and 2 <= d.examples_used <= SMALL["probe_size"]
    assert d.examples_total == len(get_task("cipher").train)
    assert len(d.fingerprint) == 64 and int(d.fingerprint, 16) >= 0
    assert card.settings.dataset.builtin == "builtin:cipher"
    got = server.stub.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=card.name), timeout=30)
    assert got.dataset == d
    listed = server.stub.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(page_size=1000), timeout=30)
    assert [c.dataset for c in listed.layer_cards if c.name == card.name] == [d]

    validation = compute(server, common_pb2.DatasetSource(builtin="builtin:cipher", split="validation"))
    assert validation.dataset.split == "validation" and validation.dataset.fingerprint != d.fingerprint
    assert validation.dataset.examples_total == len(get_task("cipher").validation)


def test_same_data_same_fingerprint_different_data_another(server):
    path = str(server.data / "words.jsonl")
    by_path = compute(server, common_pb2.DatasetSource(path=path))
    assert (by_path.dataset.source, by_path.dataset.split) == (path, "")
    assert (by_path.dataset.examples_total, by_path.dataset.examples_used) == (30, by_path.probe_examples)

    same = jsonl(WORDS * 3).replace(b'": "', b'":  "')  # other bytes, the same examples
    inline = compute(server, common_pb2.DatasetSource(inline_jsonl=same))
    assert inline.dataset.fingerprint == by_path.dataset.fingerprint
    # Same weights, data and settings: the stored card, which records the source it was computed from.
    assert inline.from_store and inline.name == by_path.name and inline.dataset.source == path

    other = jsonl(WORDS[::-1] * 2)
    different = compute(server, common_pb2.DatasetSource(inline_jsonl=other))
    assert different.dataset.fingerprint != by_path.dataset.fingerprint and different.name != by_path.name
    assert different.dataset.source == "inline:sha256:" + hashlib.sha256(other).hexdigest()
    assert different.dataset.examples_total == 20
    source = different.settings.dataset
    assert source.WhichOneof("source") == "inline_jsonl" and source.inline_jsonl == b""  # never echoed
    assert source.inline_jsonl_size_bytes == len(other)
