"""The LM head only where the loss is (models/head.py): the same loss and LoRA gradients as the model's own full
forward on every family of support/families.py, with padding; the head sees only the labelled positions in
training, evaluation and the card's probe; a family whose logits cannot be replicated falls back, exactly."""

from __future__ import annotations

import pytest
import torch
from support.families import EXPECTED_MODULE_TYPES, FAMILIES, tiny_model

from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.probe import attach_lora as probe_attach_lora
from layercard_service.card_engine.probe import run_probe
from layercard_service.data.jsonl import Example
from layercard_service.domain.jobs import Hyperparameters
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.head import TrainingObjective, completion_loss, head_plan, training_loss
from layercard_service.models.loading import load_model
from layercard_service.trainer.evaluate import mean_completion_loss
from layercard_service.trainer.loop import TrainingLoop
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

VOCAB, PAD = 300, 2
LENGTHS, LABELLED = (12, 7, 10), 4  # right-padded rows; the last 4 tokens of each carry labels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels [3, 12]: padded rows, labels only on each row's last tokens."""
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids), torch.full_like(ids, -100)
    for row, n in enumerate(LENGTHS):
        ids[row, n:], mask[row, n:] = PAD, 0
        labels[row, n - LABELLED : n] = ids[row, n - LABELLED : n]
    return ids, mask, labels


def _adapted(family: str) -> torch.nn.Module:
    model = attach_lora(tiny_model(family, VOCAB), LoraSettings(target_modules=tuple(EXPECTED_MODULE_TYPES[family])))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B = 0 would leave every A gradient zero
    return model.eval()


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _HeadRows:
    """Counts the rows the output head is applied to."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[int] = []
        head = model.get_output_embeddings()
        self.handle = head.register_forward_hook(
            lambda m, args, out: self.rows.append(args[0].numel() // m.in_features)
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_head_only_loss_and_lora_gradients_equal_the_full_forward(family):
    model = _adapted(family)
    ids, mask, labels = _batch()
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # the family's own loss
    expected = _grads(model, reference)

    assert head_plan(model).head_only, head_plan(model).reason
    counter = _HeadRows(model)
    loss = training_loss(model, ids, mask, labels)
    got = _grads(model, loss)
    assert counter.rows == [len(LENGTHS) * LABELLED]  # 12 labelled positions, not 3 x 12

    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert float(grad.abs().max()) > 0, name  # a gradient that is really there
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)
    summed = completion_loss(model, ids, mask, labels, reduction="sum")
    torch.testing.assert_close(summed, reference * len(LENGTHS) * LABELLED, rtol=1e-5, atol=1e-5)


def test_a_family_whose_logits_differ_falls_back_to_the_full_forward_with_the_same_loss():
    model = _adapted("llama")
    own = model.get_base_model().forward

    def scaled(*args, **kwargs):  # a family that rescales its logits in a way the head module cannot know
        out = own(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.get_base_model().forward = scaled
    ids, mask, labels = _batch()
    plan = head_plan(model)
    assert not plan.head_only and "differ" in plan.reason
    expected = torch.nn.functional.cross_entropy(
        (own(input_ids=ids, attention_mask=mask).logits * 2.0)[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(completion_loss(model, ids, mask, labels), expected)


def test_the_objective_module_gives_the_training_loss():
    model = _adapted("qwen2")
    ids, mask, labels = _batch()
    torch.testing.assert_close(TrainingObjective(model)(ids, mask, labels), training_loss(model, ids, mask, labels))


@pytest.fixture(scope="module")
def tiny():
    return load_model(builtin_model_path("tiny"), "cpu")


EXAMPLES = [Example(prompt=f"Say {w}:", completion=f" {w} {w}") for w in ("one", "two", "three", "four")]


def test_training_evaluation_and_the_probe_apply_the_head_to_completion_positions_only(tiny):
    model, tokenizer = tiny
    peft_model = attach_lora(model, LoraSettings(rank=2, layers=(6, 7)))
    try:
        assert head_plan(peft_model).head_only  # its one-time check runs the head too: before counting
        counter = _HeadRows(peft_model)
        _, completion_tokens = mean_completion_loss(peft_model, tokenizer, EXAMPLES)
        assert counter.rows == [completion_tokens]

        counter.rows.clear()
        train_lora(peft_model, tokenizer, EXAMPLES, TrainConfig(steps=1, batch_size=4, warmup_steps=0))
        assert counter.rows == [completion_tokens]  # the whole set is the one batch

        counter.rows.clear()
        hp = Hyperparameters(steps=1, batch_size=4, warmup_steps=0, checkpoint_interval=0)
        TrainingLoop(peft_model, tokenizer, EXAMPLES, (), hp).run(1)  # a tuning job's loop
        assert counter.rows == [completion_tokens]
    finally:
        counter.handle.remove()
        peft_model.unload()


def test_the_card_probe_applies_the_head_to_completion_positions_only(tiny):
    from layercard_service.data.encode import collate, encode_examples

    model, tokenizer = tiny
    layout = detect_layout(model)
    peft_model = probe_attach_lora(model, layout, ("q_proj",), rank=2, alpha=4.0, seed=0)
    try:
        encoded = encode_examples(tokenizer, EXAMPLES)
        batches = [collate(encoded[:2], tokenizer.pad_token_id), collate(encoded[2:], tokenizer.pad_token_id)]
        assert head_plan(peft_model).head_only
        counter = _HeadRows(peft_model)
        result = run_probe(peft_model, layout, batches)
        assert sum(counter.rows) == result.completion_tokens and len(counter.rows) == 2
    finally:
        counter.handle.remove()
        peft_model.unload()
