"""Cards for other architectures: GPT-2 (Conv1D c_attn/c_proj/c_fc) and Phi-3 (fused qkv_proj, gate_up_proj)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.engine import compute_card
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.models.builtin import builtin_model_path

SETTINGS = CardSettings(probe_size=32, batch_size=8, max_seq_len=48, compute_coupling=True)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(builtin_model_path("tiny"))


@pytest.fixture(scope="module")
def examples():
    return get_task("builtin:cipher").train[:64]


def small_gpt2(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=4, n_head=2)
    return GPT2LMHeadModel(config).eval()


def small_phi3(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
    )
    return Phi3ForCausalLM(config).eval()


@pytest.mark.parametrize(
    "build, expected_types",
    [(small_gpt2, {"c_attn", "c_proj", "c_fc"}), (small_phi3, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})],
    ids=["gpt2", "phi3"],
)
def test_card_for_other_architectures(build, expected_types, tokenizer, examples):
    model = build(len(tokenizer))
    for param in model.parameters():
        param.requires_grad_(False)
    layout = detect_layout(model)
    assert set(layout.module_types) == expected_types
    card = compute_card(model, tokenizer, examples, SETTINGS, "test")
    assert card.num_layers == 4 and len(card.layers) == 4
    assert all(row.resnorm_sq > 0 and row.activation_energy > 0 for row in card.layers)
    assert {m.module_type for m in card.layers[0].modules} == expected_types
    assert len(card.coupling) == 4
    # Per-layer adapter size counts every targeted module with its own shape (GPT-2 has two c_proj).
    assert card.layers[0].adapter_parameters == layout.adapter_parameters(layout.module_types, SETTINGS.rank)


def test_target_modules_can_be_overridden(tokenizer, examples):
    model = small_gpt2(len(tokenizer))
    settings = CardSettings(probe_size=32, batch_size=8, max_seq_len=48, target_modules=("c_attn",))
    card = compute_card(model, tokenizer, examples, settings, "test")
    assert card.module_types == ["c_attn"]
    assert [m.module_type for m in card.layers[2].modules] == ["c_attn"]
    with pytest.raises(InvalidArgument, match="unknown module type"):
        compute_card(model, tokenizer, examples, CardSettings(target_modules=("q_proj",)), "test")


def test_unsupported_model_is_a_clear_error():
    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(FailedPrecondition, match="no list of transformer blocks"):
        detect_layout(NoBlocks())
