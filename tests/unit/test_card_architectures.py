"""Cards for other architectures: every family of support/families.py (tiny random configs), GPT-2's Conv1D,
Phi-3's fused projections, OPT's flattened [B·T, d] module inputs, and clear errors for what cannot be probed."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.lora import LoraLayer
from support.families import EXPECTED_MODULE_TYPES, FAMILIES, card_failures, tiny_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Phi3Config,
    Phi3ForCausalLM,
)

from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.engine import compute_card, make_probe_batches
from layercard_service.card_engine.tokens import real_token_rows
from layercard_service.data.jsonl import Example
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings
from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.models.builtin import builtin_model_path
from layercard_service.trainer.lora import LoraSettings, attach_lora, num_layers

SETTINGS = CardSettings(probe_size=32, batch_size=8, max_seq_len=48, compute_coupling=True)
SMALL = CardSettings(probe_size=16, batch_size=4, max_seq_len=32, compute_coupling=True)


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


def _finite_non_negative(*values: float) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


def test_the_family_list_covers_the_issue(tokenizer, examples):
    required = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "gpt_neox", "opt", "phi3", "falcon"}
    assert required <= set(FAMILIES)
    # What bench/real_model counts: OPT works, and a failure is reported rather than raised.
    assert card_failures(tokenizer, examples, SMALL, ["opt"]) == {}
    assert "InvalidArgument" in card_failures(tokenizer, examples[:1], SMALL, ["llama"])["llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_card_for_every_family(family, tokenizer, examples):
    model = tiny_model(family, len(tokenizer))
    layout = detect_layout(model)
    expected = EXPECTED_MODULE_TYPES[family]
    assert set(layout.module_types) == expected
    card = compute_card(model, tokenizer, examples, SMALL, family)
    assert card.num_layers == layout.num_layers == len(card.layers) == 2
    assert [row.index for row in card.layers] == [0, 1]
    assert set(card.module_types) == expected
    for row in card.layers:
        assert {m.module_type for m in row.modules} == expected
        assert _finite_non_negative(
            row.resnorm_sq, row.activation_energy, row.effective_rank, row.residual_mean_square,
            row.forward_seconds, row.backward_seconds, row.activation_bytes, row.peft_serving_overhead_ms_per_token,
        )  # fmt: skip
        assert row.activation_energy > 0 and row.residual_mean_square > 0 and row.adapter_parameters > 0
        assert all(_finite_non_negative(m.resnorm_sq, m.activation_energy) for m in row.modules)
    assert card.probe_tokens > 0 and math.isfinite(card.probe_loss)
    assert _finite_non_negative(card.training_cost.measured_full_step_seconds, card.training_cost.base_memory_bytes)
    assert len(card.coupling) == 2 and all(math.isfinite(v) for line in card.coupling for v in line)
    # The model comes back unwrapped: no LoRA layer is left in it.
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wraps_the_modules_the_card_names(family, tokenizer):
    """Training places adapters where the card points: peft wraps every named type, on the chosen layer only."""
    model = tiny_model(family, len(tokenizer))
    layout = detect_layout(model)
    assert num_layers(model) == layout.num_layers  # what the trainer checks ``lora.layers`` against
    peft_model = attach_lora(model, LoraSettings(rank=4, target_modules=layout.module_types, layers=(1,)))
    blocks = peft_model.base_model.model.get_submodule(layout.blocks_path)
    wrapped = [
        {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, LoraLayer)} for block in blocks
    ]
    assert wrapped == [set(), set(layout.module_types)]
    per_block = sum(isinstance(m, LoraLayer) for m in blocks[1].modules())  # GPT-2 has two c_proj
    # On every layer, the card's names reach nothing outside the blocks (an embedding or head of the same name).
    model = tiny_model(family, len(tokenizer))
    peft_model = attach_lora(model, LoraSettings(rank=4, target_modules=layout.module_types))
    blocks = peft_model.base_model.model.get_submodule(layout.blocks_path)
    in_blocks = sum(isinstance(m, LoraLayer) for m in blocks.modules())
    assert in_blocks == sum(isinstance(m, LoraLayer) for m in peft_model.modules()) == 2 * per_block


def test_flattened_token_inputs_keep_padding_out(tokenizer):
    """OPT's fc1 sees [B·T, d]: its activation energy is over real tokens only, as a hook on the base model sees."""
    model = tiny_model("opt", len(tokenizer))
    examples = [Example("cipher: " + "a b " * (i % 5), f" {'xyz'[i % 3]} c") for i in range(16)]  # ragged: padding
    batches = make_probe_batches(tokenizer, examples, SMALL, torch.device("cpu"))
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)  # there is padding to keep out
    fc1 = model.get_submodule("model.decoder.layers.1.fc1")
    seen: list[torch.Tensor] = []
    handle = fc1.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    energies = []
    for x, batch in zip(seen, batches):
        assert x.dim() == 2  # the layout under test: flattened tokens
        mask = batch["attention_mask"].reshape(-1).bool()
        energies.append(x[mask].pow(2).sum(-1))
    reference = float(torch.cat(energies).mean())
    card = compute_card(model, tokenizer, examples, SMALL, "opt")
    fc1_card = next(m for m in card.layers[1].modules if m.module_type == "fc1")
    assert fc1_card.activation_energy == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(
    "layout",
    [
        lambda x: x,  # [B, T, d]
        lambda x: x.reshape(-1, x.shape[-1]),  # [B·T, d] (OPT)
        lambda x: x.reshape(1, -1, x.shape[-1]),  # [1, B·T, d]
        lambda x: x.unsqueeze(0),  # [1, B, T, d]
    ],
    ids=["btd", "flat", "one-flat", "leading-one"],
)
def test_real_token_rows_of_every_layout(layout):
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(real_token_rows(layout(x), mask, "m"), x[mask])


def test_real_token_rows_with_several_rows_per_token():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)  # [B, T, k=2, d]
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(real_token_rows(x, mask, "m"), x[mask].reshape(-1, 4))


def test_real_token_rows_refuses_a_subset_of_tokens():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(FailedPrecondition, match=re.escape("model.layers.0.mlp sees inputs of shape [5, 4]")) as info:
        real_token_rows(torch.zeros(5, 4), mask, "model.layers.0.mlp")
    assert info.value.reason == "UNSUPPORTED_ARCHITECTURE"


class _FirstTokenBlock(nn.Module):
    """Like a routed expert: its linear sees some of the tokens, not all of them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + nn.functional.pad(self.proj(hidden[:, :1]), (0, 0, 0, hidden.shape[1] - 1))


class _KeywordBlock(nn.Module):
    """Called as ``block(x=...)``: neither positional hidden states nor ``hidden_states=``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class _DeadBranchBlock(nn.Module):
    """Computes a linear it then ignores: that module is off the loss's path and gets no gradient."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.unused = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.unused(hidden)
        return hidden + self.proj(hidden)


class _OddLM(nn.Module):
    """A causal LM by its interface (input_ids -> .logits; no real KV cache) with blocks no transformers model has."""

    def __init__(self, vocab: int, blocks: nn.Module | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.stack = blocks
        self.head = nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.embed(input_ids)
        for block in self.stack or ():
            hidden = block(x=hidden) if isinstance(block, _KeywordBlock) else block(hidden)
        return SimpleNamespace(logits=self.head(hidden), past_key_values=None)


def test_a_module_off_the_loss_path_gets_a_zero_figure(tokenizer, examples):
    model = _OddLM(len(tokenizer), nn.ModuleList([_DeadBranchBlock(16), _DeadBranchBlock(16)]))
    card = compute_card(model.eval().requires_grad_(False), tokenizer, examples, SMALL, "odd")
    for row in card.layers:
        by_type = {m.module_type: m for m in row.modules}
        assert by_type["unused"].resnorm_sq == 0 and by_type["proj"].resnorm_sq > 0
        assert by_type["unused"].activation_energy > 0  # it still saw the tokens


@pytest.mark.parametrize(
    "model_type, fields, message",
    [
        ("mamba", {}, "wrapping its linear modules with peft's LoRA failed (ValueError"),
        (
            "recurrent_gemma",
            {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "lru_width": 64},
            "batch-1 decoding with a KV cache (the serving cost) failed (AttributeError",
        ),
    ],
    ids=["peft-refuses-its-modules", "no-kv-cache"],
)
def test_a_transformers_family_the_card_cannot_run_is_failed_precondition(
    model_type, fields, message, tokenizer, examples
):
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, **fields
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    with pytest.raises(FailedPrecondition, match=re.escape(message)) as info:
        compute_card(model, tokenizer, examples, SMALL, model_type)
    assert info.value.reason == "UNSUPPORTED_ARCHITECTURE" and info.value.metadata["architecture"]
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(
    "blocks, message",
    [
        (None, "no list of transformer blocks found (looked for model.layers"),
        (nn.ModuleList([nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU())]), "blocks (stack) have no linear"),
        (nn.ModuleList([_FirstTokenBlock(16), _FirstTokenBlock(16)]), "stack.0.proj sees inputs of shape [4, 1, 16]"),
        (nn.ModuleList([_KeywordBlock(16), _KeywordBlock(16)]), "block stack.0 is called without a hidden-states"),
    ],
    ids=["no-blocks", "no-linear-modules", "subset-of-tokens", "unknown-block-call"],
)
def test_unsupported_model_is_failed_precondition(blocks, message, tokenizer, examples):
    model = _OddLM(len(tokenizer), blocks).eval().requires_grad_(False)
    with pytest.raises(FailedPrecondition, match=re.escape(message)) as info:
        compute_card(model, tokenizer, examples, SMALL, "odd")
    assert info.value.reason == "UNSUPPORTED_ARCHITECTURE"
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # unwrapped after the failure too
