"""Tiny random configs of the causal-LM families the Layer Card is checked on (tests and ``bench/real_model``).

Each is a few-hundred-kilobyte model (hidden 64, 2 blocks) of the family's own transformers class, so a card on
it runs that family's real code paths: where the blocks live, which linear modules they hold, the layout of
each module's input ([B, T, d] or OPT's flattened [B·T, d]), fused projections, MoE blocks. The weights are
random: a card on them checks structure, not figures.

    from support.families import FAMILIES, card_failures, tiny_model
    model = tiny_model("opt", vocab_size=len(tokenizer))
    ok = len(FAMILIES) - len(card_failures(tokenizer, examples, settings))  # bench: card_architectures_ok
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

__all__ = ["EXPECTED_MODULE_TYPES", "FAMILIES", "card_failures", "tiny_config", "tiny_model"]

_HIDDEN, _LAYERS, _HEADS = 64, 2, 4
_LLAMA_LIKE: dict[str, Any] = dict(
    hidden_size=_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=_LAYERS,
    num_attention_heads=_HEADS,
    num_key_value_heads=2,  # grouped-query attention, as the real ones have
    max_position_embeddings=256,
)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")

# family -> (model_type, config fields beyond the vocabulary): each family's own field names.
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", _LLAMA_LIKE),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "qwen3": ("qwen3", {**_LLAMA_LIKE, "head_dim": 16}),
    "mistral": ("mistral", _LLAMA_LIKE),
    "gemma": ("gemma", {**_LLAMA_LIKE, "head_dim": 16}),
    "gemma2": ("gemma2", {**_LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}),
    "gemma3": ("gemma3_text", {**_LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}),
    "gpt2": ("gpt2", dict(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_positions=256)),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            max_position_embeddings=256,
        ),
    ),
    "opt": (
        "opt",
        dict(
            hidden_size=_HIDDEN,
            ffn_dim=128,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            word_embed_proj_dim=_HIDDEN,
            max_position_embeddings=256,
        ),
    ),
    "phi3": ("phi3", _LLAMA_LIKE),
    "falcon": (
        "falcon",
        dict(hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, max_position_embeddings=256),
    ),
    "qwen2_moe": (
        "qwen2_moe",
        {
            **_LLAMA_LIKE,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "mixtral": ("mixtral", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "phimoe": ("phimoe", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmo2": ("olmo2", _LLAMA_LIKE),
    "stablelm": ("stablelm", _LLAMA_LIKE),
    "bloom": ("bloom", dict(hidden_size=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS)),
    "gptj": ("gptj", dict(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, rotary_dim=8, n_positions=256)),
    "phi": (
        "phi",
        dict(
            hidden_size=_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            max_position_embeddings=256,
        ),
    ),
    "starcoder2": ("starcoder2", _LLAMA_LIKE),
}

FAMILIES: tuple[str, ...] = tuple(_CONFIGS)

# The module types the card's layout should name in every block of each family (leaf names, as peft targets).
EXPECTED_MODULE_TYPES: dict[str, frozenset[str]] = {
    "llama": frozenset(_ATTN + _GATED_MLP),
    "qwen2": frozenset(_ATTN + _GATED_MLP),
    "qwen3": frozenset(_ATTN + _GATED_MLP),
    "mistral": frozenset(_ATTN + _GATED_MLP),
    "gemma": frozenset(_ATTN + _GATED_MLP),
    "gemma2": frozenset(_ATTN + _GATED_MLP),
    "gemma3": frozenset(_ATTN + _GATED_MLP),
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc"}),
    "gpt_neox": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "opt": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "falcon": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    # Routed experts are 3-D parameters in transformers 5 (not linear modules): the shared expert and its gate are.
    "qwen2_moe": frozenset((*_ATTN, *_GATED_MLP, "shared_expert_gate")),
    "mixtral": frozenset(_ATTN),
    "phimoe": frozenset(_ATTN),  # its router subclasses nn.Linear but returns (weights, indices): not adapted
    "olmo2": frozenset(_ATTN + _GATED_MLP),
    "stablelm": frozenset(_ATTN + _GATED_MLP),
    "bloom": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    "gptj": frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}),
    "phi": frozenset({"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    "starcoder2": frozenset((*_ATTN, "c_fc", "c_proj")),
}


def tiny_config(family: str, vocab_size: int, bos: int = 0, eos: int = 1, pad: int = 2) -> PretrainedConfig:
    """A tiny random config of ``family`` (one of FAMILIES) with ``vocab_size`` tokens.

    The special-token ids default to builtin:tiny's tokenizer's (the families' own defaults lie outside a small
    vocabulary).
    """
    if family not in _CONFIGS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    model_type, fields = _CONFIGS[family]
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **fields
    )


def tiny_model(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A frozen, eval-mode causal LM of ``family`` with seeded random weights, as ``load_model`` returns one."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size)).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def card_failures(
    tokenizer: Any, examples: Sequence[Any], settings: Any, families: Iterable[str] = FAMILIES
) -> dict[str, str]:
    """Computes a card on each family's tiny model; returns the ones that failed, as "ErrorType: message".

    A card counts only if it names the family's expected module types on every layer.
    """
    from layercard_service.card_engine.engine import compute_card

    failures: dict[str, str] = {}
    for family in families:
        try:
            card = compute_card(tiny_model(family, len(tokenizer)), tokenizer, examples, settings, family)
        except Exception as exc:  # reported, not raised: the caller counts the families that work
            failures[family] = f"{type(exc).__name__}: {exc}"
            continue
        found = [{m.module_type for m in row.modules} for row in card.layers]
        if len(found) != _LAYERS or any(types != EXPECTED_MODULE_TYPES[family] for types in found):
            failures[family] = f"unexpected module types {found}"
    return failures
