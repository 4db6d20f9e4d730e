"""The frozen-prefix activation cache (trainer/prefix_cache.py): losses and adapter gradients equal the uncached
run's on several architectures (rotary and learned positions, GQA, sliding windows, padding), a training loop with
the cache matches one without step for step, the cache spills to disk past its bound, and it is off, saying why,
wherever it could not be exact."""

from __future__ import annotations

import pytest
import torch
from support.families import EXPECTED_MODULE_TYPES, tiny_config
from transformers import AutoModelForCausalLM

from layercard_service.data.encode import EncodedExample, collate
from layercard_service.data.tasks import get_task
from layercard_service.domain.jobs import Hyperparameters
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.head import training_loss
from layercard_service.models.loading import load_model
from layercard_service.trainer.loop import LoopHooks, TrainingLoop
from layercard_service.trainer.lora import LoraSettings, attach_lora
from layercard_service.trainer.prefix_cache import PrefixCacheSettings, build_prefix_cache
from layercard_service.trainer.prefix_pricing import price_cached_step

VOCAB, PAD = 300, 2
LENGTHS = (12, 7, 10, 5, 9, 12, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _examples() -> list[EncodedExample]:
    """Rows of different lengths (so batches pad), labels on each row's last 4 tokens."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        out.append(EncodedExample(tuple(ids), tuple([-100] * (n - 4) + ids[n - 4 :])))
    return out


def _model(family: str, layers: int = 3, no_dropout: bool = True, adapted: tuple[int, ...] = (2,)) -> torch.nn.Module:
    config = tiny_config(family, VOCAB)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):  # per-block attention kinds (sliding, full): one per block
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    if no_dropout:  # GPT-2 and OPT default to dropout 0.1: the cache is for deterministic prefixes
        for key, value in config.to_dict().items():
            if "drop" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    lora = LoraSettings(target_modules=tuple(EXPECTED_MODULE_TYPES[family]), layers=adapted)
    peft_model = attach_lora(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B = 0 would leave every A gradient zero
    return peft_model.train()


def _loss_and_grads(model, batch, cache=None, examples=None):
    model.zero_grad(set_to_none=True)
    if cache is None:
        loss = training_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    else:
        with cache.feeding(examples, batch["input_ids"].shape[1]):
            loss = training_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, expected):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)


# Rotary (llama, qwen2, mistral, phi3, gpt_neox, falcon), GQA (the llama-like ones: 4 heads, 2 KV heads),
# sliding windows and soft-capping (gemma2), learned positions (gpt2).
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt_neox", "falcon", "gpt2"])
def test_cached_loss_and_adapter_gradients_equal_the_uncached_ones(family):
    model = _model(family)
    examples = _examples()
    cache, report = build_prefix_cache(model, examples, PAD, 4, PrefixCacheSettings())
    assert cache is not None, report.reason
    assert report.enabled and report.cached_blocks == 2 and report.examples == len(examples)
    assert report.bytes == sum(LENGTHS) * model.config.hidden_size * 4

    chosen = [examples[5], examples[1], examples[3]]  # another composition than the building pass's batches
    batch = collate(chosen, PAD)
    _assert_same(_loss_and_grads(model, batch, cache, chosen), _loss_and_grads(model, batch))


def test_a_cache_over_its_memory_bound_goes_to_disk_and_gives_the_same_gradients(tmp_path):
    model = _model("qwen2")
    examples = _examples()
    cache, report = build_prefix_cache(
        model, examples, PAD, 4, PrefixCacheSettings(max_memory_bytes=1024, spill_dir=tmp_path)
    )
    assert cache is not None and report.on_disk
    assert [p.stat().st_size for p in tmp_path.glob("*/hidden.bin")] == [report.bytes]
    chosen = examples[:4]
    batch = collate(chosen, PAD)
    _assert_same(_loss_and_grads(model, batch, cache, chosen), _loss_and_grads(model, batch))


@pytest.mark.parametrize(
    ("family", "kwargs", "reason"),
    [
        ("gpt2", {"no_dropout": False}, "attn_pdrop=0.1"),  # dropout in train mode
        ("opt", {}, "drew random numbers"),  # OPT's LayerDrop draws a number per block, even at layerdrop = 0
        ("bloom", {}, "more than its hidden states"),  # its blocks return attention tensors too
        ("llama", {"adapted": (0, 2)}, "block 0"),  # nothing below the lowest adapted block
    ],
)
def test_the_cache_is_off_with_the_reason_where_it_could_not_be_exact(family, kwargs, reason):
    model = _model(family, **kwargs)
    rng = torch.get_rng_state()
    cache, report = build_prefix_cache(model, _examples(), PAD, 4, PrefixCacheSettings())
    assert cache is None and not report.enabled and reason in report.reason
    assert reason in report.message() and report.message().startswith("prefix cache off")
    assert torch.equal(torch.get_rng_state(), rng)  # the training's dropout masks do not depend on the attempt


def test_a_building_pass_that_fails_leaves_it_off_and_the_job_trains_uncached():
    model = _model("llama")
    block = model.get_base_model().model.layers[0]
    own = block.forward

    def broken(*args, **kwargs):  # fails in the building pass only (no grad, train mode)
        if block.training and not torch.is_grad_enabled():
            raise RuntimeError("this block cannot run alone")
        return own(*args, **kwargs)

    block.forward = broken
    cache, report = build_prefix_cache(model, _examples(), PAD, 4, PrefixCacheSettings())
    assert cache is None and "building pass failed: RuntimeError: this block cannot run alone" in report.reason


def test_a_run_that_sees_each_example_once_leaves_it_off_unless_asked():
    model, examples = _model("llama"), _examples()  # 7 examples: 2 batches of 4 an epoch
    cache, report = build_prefix_cache(model, examples, PAD, 4, PrefixCacheSettings(), total_steps=2)
    assert cache is None and "at most once" in report.reason
    cache, report = build_prefix_cache(model, examples, PAD, 4, PrefixCacheSettings(), total_steps=3)
    assert cache is not None and report.enabled
    forced = PrefixCacheSettings(only_when_it_pays=False)
    assert build_prefix_cache(model, examples, PAD, 4, forced, total_steps=1)[1].enabled


def test_a_trainable_parameter_below_the_lowest_adapted_block_turns_it_off():
    model = _model("llama")
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    _, report = build_prefix_cache(model, _examples(), PAD, 4, PrefixCacheSettings())
    assert not report.enabled and "embed_tokens" in report.reason


TASK = get_task("builtin:cipher")


def _loop(prefix_cache: bool) -> TrainingLoop:
    model, tokenizer = load_model(builtin_model_path("tiny"), "cpu")
    torch.manual_seed(0)
    # LoRA dropout draws random numbers in the adapted blocks: the same ones with and without the cache.
    peft_model = attach_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=0.1, layers=(5, 6, 7)))
    hp = Hyperparameters(steps=4, batch_size=8, warmup_steps=0, checkpoint_interval=0, prefix_cache=prefix_cache)
    return TrainingLoop(peft_model, tokenizer, TASK.train[:24], (), hp)


def test_a_training_loop_with_the_cache_matches_the_uncached_loop_step_for_step():
    runs = {}
    for cached in (True, False):
        loop, steps, reports = _loop(cached), [], []
        loop.run(4, LoopHooks(on_step=steps.append, on_prefix_cache=reports.append))
        runs[cached] = (loop, steps, reports)
    (cached, steps, (report,)), (plain, plain_steps, (plain_report,)) = runs[True], runs[False]
    assert report.enabled and report.cached_blocks == 5 and report.examples == 24
    assert not plain_report.enabled and "turned off" in plain_report.reason
    assert [s.tokens for s in steps] == [s.tokens for s in plain_steps]  # the same batches, padded alike
    for got, expected in zip(steps, plain_steps, strict=True):
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    for name, param in plain.named.items():
        torch.testing.assert_close(cached.named[name], param, rtol=1e-4, atol=1e-6, msg=name)
    assert cached.measured_peak_memory_bytes == plain.measured_peak_memory_bytes + report.bytes


def test_the_pricing_takes_the_prefix_forward_off_each_step_and_charges_it_once_per_batch():
    figures = dict(examples=10, batch_size=4, tokens=400, hidden_size=64, bytes_per_value=4)
    cost = price_cached_step((2, 3), [1.0, 2.0, 3.0, 4.0], 20.0, 1000, **figures)
    assert (cost.cached_blocks, cost.step_seconds, cost.build_seconds) == (2, 17.0, 9.0)  # 3 batches x (1 + 2) s
    assert cost.cache_bytes == 400 * 64 * 4 and not cost.on_disk and cost.peak_bytes == 1000 + cost.cache_bytes
    assert cost.total_seconds(5) == 9.0 + 5 * 17.0 and cost.break_even_steps(20.0) == 3.0
    spilled = price_cached_step((2,), [1.0, 2.0, 3.0], 20.0, 1000, **figures, max_memory_bytes=1024)
    assert spilled.on_disk and spilled.peak_bytes == 1000
    assert price_cached_step((0, 3), [1.0] * 4, 20.0, 1000, **figures) is None  # nothing below block 0
    assert price_cached_step((2,), [1.0] * 4, 20.0, 1000, **figures, steps=3) is None  # one epoch (3 batches)
    assert price_cached_step((2,), [1.0] * 4, 20.0, 1000, **figures, steps=4) is not None


def test_on_the_real_model_the_cached_head_only_step_equals_the_models_own_loss(smollm2_path):
    """SmolLM2: tied embeddings, GQA 9/3, a chat template; the cache and the head saving together, against the
    model's own full forward with labels."""
    from layercard_service.data.encode import encode_examples

    model, tokenizer = load_model(smollm2_path, "cpu")
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(rank=2, target_modules=("q_proj", "v_proj"), layers=(29,))).train()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    examples = encode_examples(tokenizer, get_task("builtin:facts").train[:4])
    cache, report = build_prefix_cache(peft_model, examples, tokenizer.pad_token_id, 4, PrefixCacheSettings())
    assert cache is not None and report.cached_blocks == 29, report.reason
    batch = collate(examples, tokenizer.pad_token_id)
    peft_model.zero_grad(set_to_none=True)
    own = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    own.loss.backward()
    expected = own.loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    _assert_same(_loss_and_grads(peft_model, batch, cache, examples), expected)
