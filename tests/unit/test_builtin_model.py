"""The built-in base model `builtin:tiny`: it resolves, loads in transformers, and really learned English."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layercard_service.errors import NotFound
from layercard_service.models.builtin import BUILTIN_MODELS, builtin_model_path, is_builtin


@pytest.fixture(scope="module")
def tiny_dir():
    return builtin_model_path("tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_names_resolve_to_the_committed_folder(tiny_dir):
    assert builtin_model_path("builtin:tiny") == tiny_dir == BUILTIN_MODELS["tiny"].shipped
    assert is_builtin("builtin:tiny") and not is_builtin("/models/llama")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_dir / name).is_file(), name


@pytest.mark.parametrize("name", ["huge", "builtin:huge", ""])
def test_unknown_builtin_is_not_found(name):
    with pytest.raises(NotFound) as err:
        builtin_model_path(name)
    assert err.value.reason == "BUILTIN_MODEL_NOT_FOUND"


def test_architecture(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers >= 8
    assert cfg.hidden_size // cfg.num_attention_heads == 64 == cfg.head_dim
    assert cfg.vocab_size == len(tiny_tokenizer)
    assert next(tiny_model.parameters()).dtype == torch.float32
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
    )


def test_tokenizer_round_trips_english(tiny_tokenizer):
    text = "Return a new list containing all items from the iterable in ascending order.\n  Déjà vu: ok!"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id  # prompts start with <s>, as in pretraining
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2.5  # BPE merges learned from English, not bytes


def test_report_shows_real_pretraining(tiny_dir, tiny_model):
    report = json.loads((tiny_dir / "pretrain_report.json").read_text())
    assert report["heldout_loss"] <= report["unigram_loss"] - 1.5
    assert report["params"] == sum(p.numel() for p in tiny_model.parameters())


def test_model_prefers_real_text_to_shuffled(tiny_model, tiny_tokenizer):
    # An independent check of the report: loss on an English sentence is far below the same tokens shuffled.
    ids = tiny_tokenizer(
        "If the object is not callable, a TypeError is raised when the function is called.", return_tensors="pt"
    )["input_ids"]
    shuffled = torch.cat(
        [ids[:, :1], ids[:, 1:][:, torch.randperm(ids.size(1) - 1, generator=torch.Generator().manual_seed(0))]], 1
    )
    with torch.no_grad():
        real = tiny_model(input_ids=ids, labels=ids).loss.item()
        fake = tiny_model(input_ids=shuffled, labels=shuffled).loss.item()
    assert real < fake - 1.0
