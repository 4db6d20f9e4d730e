"""Training and serving cost of any layer set, calibrated per block (METHOD.md, "Cost").

Training: every step runs the forward through all L blocks, but backward only runs down to the lowest adapted
block and only blocks from there up keep activations. Per block we measure forward and backward time and saved
bytes in three regimes on hook-free steps: adapted (every block adapted), gradient pass-through (an adapter on
block 0 alone) and below the lowest adapted block (no adapter, no graph). Then
    time(S)   = fixed + Σ_{ℓ < min S} fwd_nograd_ℓ + Σ_{ℓ ≥ min S} (fwd+bwd adapted_ℓ if ℓ ∈ S else pass_ℓ)
    memory(S) = static + Σ_{ℓ ≥ min S} (act_adapted_ℓ if ℓ ∈ S else act_pass_ℓ)
and one more measured step on a partial set validates the prediction.
Serving (unmerged peft): the added latency per generated token, measured with adapters on every layer and
divided by the number of layers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layercard_service.card_engine.probe import ADAPTER, ModuleKey
from layercard_service.card_engine.profile import BlockProfile, StepProfiler
from layercard_service.data.encode import IGNORE_INDEX

__all__ = ["CostModel", "measure_forward_nograd", "measure_step", "measure_peft_serving"]


@dataclass
class CostModel:
    forward_seconds: list[float]  # per block, adapted
    forward_pass_seconds: list[float]  # no adapter, but building the graph for a gradient to pass through
    forward_nograd_seconds: list[float]  # below the lowest adapted block: no adapter and no graph
    backward_adapted_seconds: list[float]
    backward_pass_seconds: list[float]  # gradient pass-through only; block 0's equals its adapted figure
    saved_adapted_bytes: list[int]
    saved_pass_bytes: list[int]
    fixed_seconds: float  # embedding, head, loss
    static_bytes: int  # weights, plus what the head and loss keep for backward
    adapter_bytes_per_layer: list[int]  # adapter parameters' bytes, x4 with gradient and Adam's two moments

    def step_seconds(self, layers: Sequence[int]) -> float:
        chosen = set(layers)
        low = min(chosen) if chosen else len(self.forward_seconds)
        total = self.fixed_seconds + sum(self.forward_nograd_seconds[:low])
        for i in range(low, len(self.forward_seconds)):
            if i in chosen:
                total += self.forward_seconds[i] + self.backward_adapted_seconds[i]
            else:
                total += self.forward_pass_seconds[i] + self.backward_pass_seconds[i]
        return total

    def peak_bytes(self, layers: Sequence[int]) -> int:
        if not layers:
            return self.static_bytes
        chosen, low = set(layers), min(layers)
        activations = sum(
            self.saved_adapted_bytes[i] if i in chosen else self.saved_pass_bytes[i]
            for i in range(low, len(self.forward_seconds))
        )
        return self.static_bytes + activations + sum(self.adapter_bytes_per_layer[i] for i in chosen)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        .logits[:, :-1]
        .float()
    )
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _enable_only(lora: dict[ModuleKey, nn.Module], layers: set[int]) -> None:
    """Leaves LoRA active on ``layers`` only: the others run their plain base layer, as if never wrapped."""
    for (index, _), layer in lora.items():
        layer.enable_adapters(index in layers)
        if index in layers:
            layer.lora_A[ADAPTER].weight.requires_grad_(False)  # enable_adapters re-enables A's gradient


def measure_step(
    peft_model: nn.Module,
    blocks: nn.ModuleList,
    lora: dict[ModuleKey, nn.Module],
    batch: dict[str, torch.Tensor],
    layers: set[int],
) -> BlockProfile:
    """One real forward+backward with adapters on ``layers`` only, profiled per block."""
    _enable_only(lora, layers)
    try:
        with StepProfiler(blocks, peft_model.base_model.model) as profiler:
            profiler.profile_step(lambda: _loss(peft_model, batch))
    finally:
        _enable_only(lora, {index for index, _ in lora})
        peft_model.zero_grad(set_to_none=True)
    return profiler.profile.per_step()


@torch.no_grad()
def measure_forward_nograd(
    peft_model: nn.Module, blocks: nn.ModuleList, lora: dict[ModuleKey, nn.Module], batch: dict[str, torch.Tensor]
) -> list[float]:
    """Per-block forward time with no adapter and no autograd graph: blocks below a placement's lowest layer."""
    _enable_only(lora, set())
    try:
        with StepProfiler(blocks, peft_model.base_model.model) as profiler:
            profiler.profile_step(lambda: _loss(peft_model, batch), backward=False)
    finally:
        _enable_only(lora, {index for index, _ in lora})
    return profiler.profile.forward_seconds


@torch.no_grad()
def measure_peft_serving(
    peft_model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 6, repeats: int = 3
) -> tuple[float, float]:
    """(base ms per token, adapted ms per token) of batch-1 decoding with a KV cache, adapters unmerged.

    Decode steps are timed directly (prefill once, then one forward per token), without ``generate()``'s
    per-token bookkeeping, which would dwarf a small model's matmuls. Runs alternate base and adapted.
    """

    def decode_ms() -> float:
        out = peft_model(input_ids=input_ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = peft_model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) * 1000.0 / new_tokens

    base, adapted = [], []
    decode_ms()  # warm-up: the first call pays for allocations and lazy initialisation
    for _ in range(repeats):
        with peft_model.disable_adapter():
            base.append(decode_ms())
        adapted.append(decode_ms())
    return statistics.median(base), statistics.median(adapted)
