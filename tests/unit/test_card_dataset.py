"""A card's dataset record (domain/cards.py CardDataset): resolved with the data, stored, shown, old cards unknown."""

from __future__ import annotations

import hashlib
import json

from layercard_client.cardview import card_markdown, card_summary, card_table, dataset_line
from layercard_service.api.layer_card import card_to_proto
from layercard_service.control.cards import CardService, StoredCard
from layercard_service.data.sources import DatasetRequest, resolve_dataset
from layercard_service.data.tasks import get_task
from layercard_service.domain.card_codec import card_from_dict, card_to_dict
from layercard_service.domain.cards import (
    CardDataset,
    CardSettings,
    LayerCardData,
    LayerCardRow,
    ModuleCard,
    ServingCostCard,
    TrainingCostCard,
)
from layercard_service.persistence.store import CardRecord, Store

DATASET = CardDataset("builtin", "builtin:cipher", "train", "ab" * 32, 32, 2000)
LINES = [{"prompt": f"say {w}:", "completion": f" {w[::-1]}"} for w in ("alpha", "bravo", "charlie", "delta")]


def make_card(dataset: CardDataset | None) -> LayerCardData:
    row = LayerCardRow(
        index=0,
        resnorm_sq=1.0,
        resnorm_sq_split_half=0.5,
        resnorm_share=1.0,
        predicted_gain=0.5,
        activation_energy=2.0,
        effective_rank=3.0,
        condition_number=4.0,
        modules=[ModuleCard("q_proj", 1.0, 0.5, 2.0, 3.0, 4.0, 64)],
        forward_seconds=0.001,
        backward_seconds=0.002,
        activation_bytes=1024,
        adapter_parameters=64,
        adapter_bytes=256,
        peft_serving_overhead_ms_per_token=0.01,
    )
    training = TrainingCostCard(0.1, 0.01, 1000, 0.2, 0.2, 0.1, 0.1, [0], 0.0, 10, 10, 0.0, 16, 32)
    return LayerCardData(
        model="builtin:tiny",
        architecture="LlamaForCausalLM",
        num_layers=1,
        num_parameters=1000,
        module_types=["q_proj"],
        settings=CardSettings(probe_size=32),
        layers=[row],
        training_cost=training,
        serving_cost=ServingCostCard(peft_base_ms_per_token=1.0),
        probe_loss=2.0,
        probe_examples=32,
        probe_tokens=640,
        compute_seconds=1.0,
        dataset=dataset,
    )


def test_codec_round_trips_with_and_without_the_dataset():
    for dataset in (DATASET, None):
        card = make_card(dataset)
        assert card_from_dict(json.loads(json.dumps(card_to_dict(card)))) == card


def test_a_card_stored_before_the_dataset_was_recorded_loads_as_unknown(tmp_path):
    old = card_to_dict(make_card(DATASET))
    del old["dataset"]  # the stored form of every card before this field
    store = Store(tmp_path)
    store.put_card(CardRecord("old0", "f" * 64, "builtin:tiny", 1.0, old))
    stored = CardService(store, None, (), ()).get("layerCards/old0")
    assert stored.card.dataset is None
    message = card_to_proto(stored)
    assert not message.HasField("dataset") and message.settings.dataset.WhichOneof("source") is None
    assert dataset_line(message).startswith("unknown")
    assert "| dataset | unknown" in card_markdown(message)
    assert "dataset unknown" in str(card_table(message).caption)
    assert card_summary(message)  # still renders


def test_the_record_reaches_the_proto_and_the_settings_source():
    inline = CardDataset("inline", "c" * 64, "", "d" * 64, 10, 12, inline_size_bytes=345)
    message = card_to_proto(StoredCard("layerCards/x", "e" * 64, 1.0, make_card(inline), False))
    assert message.dataset.source == "inline:sha256:" + "c" * 64
    assert (message.dataset.examples_used, message.dataset.examples_total) == (10, 12)
    assert message.dataset.fingerprint == "d" * 64 and message.dataset.split == ""
    source = message.settings.dataset
    assert source.WhichOneof("source") == "inline_jsonl" and source.inline_jsonl == b""
    assert (source.inline_jsonl_sha256, source.inline_jsonl_size_bytes) == ("c" * 64, 345)

    builtin = card_to_proto(StoredCard("layerCards/y", "e" * 64, 1.0, make_card(DATASET), False))
    assert builtin.settings.dataset.builtin == "builtin:cipher" and builtin.settings.dataset.split == "train"
    assert dataset_line(builtin) == "builtin:cipher (train): 32 of 2,000 examples, fingerprint " + "ab" * 6
    assert "ab" * 32 in card_markdown(builtin)  # the whole fingerprint in the report


def test_resolved_sources_name_the_data_and_equal_content_has_one_fingerprint(tmp_path):
    raw = ("\n".join(json.dumps(line) for line in LINES) + "\n").encode()
    (tmp_path / "d.jsonl").write_bytes(raw)
    spaced = raw.replace(b'": "', b'":   "')  # other bytes, the same examples
    by_path = resolve_dataset(DatasetRequest(path=str(tmp_path / "d.jsonl")), (tmp_path,))
    inline = resolve_dataset(DatasetRequest(inline_jsonl=spaced), ())
    assert (by_path.kind, by_path.source, by_path.split) == ("path", str(tmp_path / "d.jsonl"), "")
    sha256 = hashlib.sha256(spaced).hexdigest()
    assert (inline.kind, inline.source, inline.size_bytes) == ("inline", sha256, len(spaced))
    assert by_path.fingerprint == inline.fingerprint
    other = resolve_dataset(DatasetRequest(inline_jsonl=raw.replace(b"alpha", b"omega")), ())
    assert other.fingerprint != inline.fingerprint

    train = resolve_dataset(DatasetRequest(builtin="cipher"), ())
    validation = resolve_dataset(DatasetRequest(builtin="builtin:cipher", split="validation"), ())
    assert (train.kind, train.source, train.split) == ("builtin", "builtin:cipher", "train")
    assert validation.split == "validation" and validation.fingerprint != train.fingerprint
    assert len(train.examples) == len(get_task("cipher").train)
