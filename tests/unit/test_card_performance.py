"""The card's performance column: single-layer LoRA runs on the probe's first half, scored on the second."""

from __future__ import annotations

import json

import pytest
import torch

from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.engine import compute_card, make_probe_batches
from layercard_service.card_engine.performance import layer_gains, rate_gains, split_batches
from layercard_service.card_engine.probe import ADAPTER, attach_lora, lora_modules
from layercard_service.data.tasks import get_task
from layercard_service.domain.card_codec import card_from_dict, card_to_dict
from layercard_service.domain.cards import CardSettings, performance_checkpoints
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model

SETTINGS = CardSettings(probe_size=64, batch_size=16, max_seq_len=64)


@pytest.fixture
def attached():
    model, tokenizer = load_model(builtin_model_path("tiny"))
    layout = detect_layout(model)
    batches = make_probe_batches(tokenizer, get_task("builtin:cipher").train[:200], SETTINGS, torch.device("cpu"))
    peft = attach_lora(model, layout, layout.module_types, SETTINGS.rank, SETTINGS.lora_alpha, SETTINGS.seed)
    yield peft, lora_modules(peft, layout), batches, layout.num_layers
    peft.unload()


def test_split_keeps_a_held_out_half():
    train, held_out = split_batches([{"i": i} for i in range(5)])
    assert [b["i"] for b in train] == [0, 1] and [b["i"] for b in held_out] == [2, 3, 4]
    train, held_out = split_batches([{"i": 0}, {"i": 1}])
    assert len(train) == 1 and len(held_out) == 1


def test_each_layer_learns_alone_and_the_adapter_is_put_back(attached):
    peft, lora, batches, num_layers = attached
    before = {
        key: (layer.lora_A[ADAPTER].weight.clone(), layer.lora_B[ADAPTER].weight.clone()) for key, layer in lora.items()
    }
    flags = {name: p.requires_grad for name, p in peft.named_parameters()}
    seen = []
    gains = layer_gains(
        peft, lora, batches, num_layers, steps=8, learning_rate=1e-2, on_layer=lambda d, t: seen.append(d)
    )
    assert len(gains) == num_layers and seen == list(range(1, num_layers + 1))
    # Each layer's pilot curve: the held-out gain at steps 2, 4, 6 and 8 (performance_checkpoints(8)).
    assert performance_checkpoints(8) == [2, 4, 6, 8]
    assert all(len(curve) == 4 and all(isinstance(g, float) and g == g for g in curve) for curve in gains)
    # Eight steps at this rate move the held-out loss by far more than float noise on some layer.
    assert max(curve[-1] for curve in gains) > 0.05
    for key, layer in lora.items():  # the card's state is back: the same A, B = 0, the same trainable flags
        assert torch.equal(layer.lora_A[ADAPTER].weight, before[key][0])
        assert torch.equal(layer.lora_B[ADAPTER].weight, before[key][1])
        assert layer.lora_B[ADAPTER].weight.grad is None
    assert {name: p.requires_grad for name, p in peft.named_parameters()} == flags


def test_all_layer_pilots_run_per_learning_rate_and_put_the_adapter_back(attached):
    peft, lora, batches, _ = attached
    flags = {name: p.requires_grad for name, p in peft.named_parameters()}
    seen = []
    gains = rate_gains(peft, lora, batches, steps=4, learning_rates=[0.0, 1e-2], on_run=lambda d, t: seen.append(d))
    assert seen == [1, 2] and all(len(curve) == len(performance_checkpoints(4)) for curve in gains)
    assert gains[0] == [0.0] * len(gains[0])  # a zero rate moves nothing: the gain is measured against the start
    assert gains[1][-1] > 0.05  # every layer at 1e-2 for 4 steps learns far beyond float noise
    assert all(not layer.lora_B[ADAPTER].weight.any() for layer in lora.values())
    assert {name: p.requires_grad for name, p in peft.named_parameters()} == flags


def test_cancel_between_layers_stops_the_column(attached):
    peft, lora, batches, num_layers = attached

    def cancel(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        layer_gains(peft, lora, batches, num_layers, steps=1, on_layer=cancel)
    assert all(not layer.lora_B[ADAPTER].weight.any() for layer in lora.values())


def test_card_carries_the_column_only_when_asked():
    model, tokenizer = load_model(builtin_model_path("tiny"))
    examples = get_task("builtin:cipher").train[:200]
    with_column = compute_card(
        model,
        tokenizer,
        examples,
        CardSettings(probe_size=32, max_seq_len=48, compute_performance=True, performance_steps=2),
    )
    assert all(row.measured_gain is not None for row in with_column.layers)
    assert all(row.measured_gain_curve[-1] == row.measured_gain for row in with_column.layers)
    assert all(len(row.measured_gain_curve) == len(performance_checkpoints(2)) for row in with_column.layers)
    assert [p.learning_rate for p in with_column.learning_rate_pilots] == [1e-3, 3e-3]
    assert card_from_dict(json.loads(json.dumps(card_to_dict(with_column)))) == with_column  # stored as it is
    without = compute_card(model, tokenizer, examples, CardSettings(probe_size=32, max_seq_len=48))
    assert all(row.measured_gain is None and not row.measured_gain_curve for row in without.layers)
    assert without.learning_rate_pilots == []
