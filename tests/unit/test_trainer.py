"""The training core on a tiny random Llama: loss falls, placement is honoured, backward stops early."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from support.bpe import small_bpe
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layercard_service.data.encode import EncodeConfig, collate, encode_examples
from layercard_service.data.jsonl import Example
from layercard_service.data.task_families import CipherTask
from layercard_service.errors import InvalidArgument
from layercard_service.trainer.evaluate import evaluate, exact_match_rate, mean_completion_loss
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

TASK = CipherTask(alphabet_size=4, length=2, n_train=64, n_validation=8)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return small_bpe([e.prompt + e.completion for e in TASK.train] * 5, vocab_size=300)


def _model(tokenizer, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _blocks(peft_model) -> torch.nn.ModuleList:
    return peft_model.get_base_model().model.layers


def test_a_few_steps_reduce_training_loss(tokenizer) -> None:
    model = attach_lora(_model(tokenizer), LoraSettings(rank=4))
    seen: list[int] = []
    config = TrainConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=3)
    result = train_lora(model, tokenizer, TASK.train, config, on_step=lambda m: seen.append(m.step))
    assert seen == list(range(1, 31)) and len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.3
    assert all(s.seconds > 0 and s.tokens > 0 for s in result.steps)
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_runs_are_reproducible(tokenizer) -> None:
    losses = []
    for _ in range(2):
        model = attach_lora(_model(tokenizer), LoraSettings(rank=4))
        torch.manual_seed(123)  # must not matter: the trainer seeds itself
        losses.append(train_lora(model, tokenizer, TASK.train, TrainConfig(steps=4, batch_size=8, seed=5)).losses)
    assert losses[0] == losses[1]


def test_only_chosen_layers_get_lora_weights(tokenizer) -> None:
    model = attach_lora(_model(tokenizer), LoraSettings(rank=4, layers=(2, 3), target_modules=("q_proj", "o_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split("layers.")[1].split(".")[0] for n in trainable} == {"2", "3"}
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "o_proj"}  # ...q_proj.lora_A.default.weight
    assert list(model.peft_config["default"].layers_to_transform) == [2, 3]


# Blocks whose inputs need no grad fire their hooks for the output gradient only, and torch warns about it.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_stops_at_the_lowest_adapted_layer(tokenizer) -> None:
    model = attach_lora(_model(tokenizer), LoraSettings(rank=4, layers=(2, 3)))
    fired: list[int] = []
    for i, block in enumerate(_blocks(model)):
        block.register_full_backward_hook(lambda mod, gin, gout, i=i: fired.append(i))
    train_lora(model, tokenizer, TASK.train, TrainConfig(steps=2, batch_size=8))
    assert set(fired) == {2, 3}  # blocks 0 and 1 never take part in backward
    assert model.get_input_embeddings().weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_full_layer_placement_reaches_block_zero(tokenizer) -> None:
    model = attach_lora(_model(tokenizer), LoraSettings(rank=4))
    fired: list[int] = []
    for i, block in enumerate(_blocks(model)):
        block.register_full_backward_hook(lambda mod, gin, gout, i=i: fired.append(i))
    train_lora(model, tokenizer, TASK.train, TrainConfig(steps=1, batch_size=8))
    assert set(fired) == {0, 1, 2, 3}


def test_learning_rate_schedule_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(steps=100, warmup_steps=10)
    factors = [config.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] < 0.001
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: LoraSettings(rank=0),
        lambda: LoraSettings(alpha=0),
        lambda: LoraSettings(dropout=1.0),
        lambda: LoraSettings(layers=()),
        lambda: LoraSettings(layers=(1, 1)),
        lambda: LoraSettings(layers=(-1,)),
        lambda: LoraSettings(target_modules=()),
        lambda: TrainConfig(steps=0),
        lambda: TrainConfig(batch_size=True),
        lambda: TrainConfig(learning_rate=0),
        lambda: TrainConfig(warmup_steps=-1),
    ],
)
def test_configs_are_validated(build) -> None:
    with pytest.raises(InvalidArgument):
        build()


def test_placement_out_of_range_and_unknown_module(tokenizer) -> None:
    with pytest.raises(InvalidArgument, match="has 4 layers"):
        attach_lora(_model(tokenizer), LoraSettings(layers=(4,)))
    with pytest.raises(InvalidArgument):
        attach_lora(_model(tokenizer), LoraSettings(target_modules=("nope_proj",)))


def test_too_few_examples_for_a_batch(tokenizer) -> None:
    model = attach_lora(_model(tokenizer), LoraSettings(rank=4))
    with pytest.raises(InvalidArgument, match="fewer than the batch size"):
        train_lora(model, tokenizer, TASK.train[:3], TrainConfig(batch_size=8))


def test_evaluation_loss_is_a_token_weighted_mean(tokenizer) -> None:
    model = _model(tokenizer)
    examples = [Example("cipher: e =", " t a"), Example("x", " e t a o e t")]
    loss, tokens = mean_completion_loss(model, tokenizer, examples, batch_size=1)
    batch = collate(encode_examples(tokenizer, examples), tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss  # transformers: mean over every non-masked label of the batch
    assert tokens == sum(1 for e in encode_examples(tokenizer, examples) for t in e.labels if t != -100)
    assert loss == pytest.approx(float(reference), rel=1e-5)


def test_exact_match_decodes_greedily(tokenizer) -> None:
    model = _model(tokenizer)
    em, predictions = exact_match_rate(model, tokenizer, TASK.validation, batch_size=3)
    assert len(predictions) == len(TASK.validation) and 0.0 <= em <= 1.0
    result = evaluate(model, tokenizer, TASK.validation, encode=EncodeConfig(max_length=32))
    assert result.exact_match == em and result.examples == len(TASK.validation)
