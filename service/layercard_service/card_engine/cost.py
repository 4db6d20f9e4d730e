"""Training and serving cost of any layer set, per block (METHOD.md, "Cost").

Training: every step runs the forward through all L blocks, but backward only runs down to the lowest adapted
block and only blocks from there up keep activations. Per block there are three regimes: adapted, gradient
pass-through (no adapter, but inside the backward graph) and below the lowest adapted block (no adapter, no graph):
    time(S)   = fixed + Σ_{ℓ < min S} fwd_nograd_ℓ + Σ_{ℓ ≥ min S} (fwd+bwd adapted_ℓ if ℓ ∈ S else pass_ℓ)
    memory(S) = static + Σ_{ℓ ≥ min S} (act_adapted_ℓ if ℓ ∈ S else act_pass_ℓ) + adapters
The time figures are fitted to whole training steps (``calibration.py``, run on ``TrainerSteps``); the memory
figures are the bytes autograd saves for backward, counted per block in those same steps.
Serving (unmerged peft): the added latency per generated token, measured with adapters on every layer and
divided by the number of layers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layercard_service.card_engine.probe import ADAPTER, ModuleKey
from layercard_service.card_engine.profile import StepProfiler, sync
from layercard_service.data.encode import IGNORE_INDEX
from layercard_service.models.head import completion_loss, head_plan
from layercard_service.trainer.loop import MAX_GRAD_NORM

__all__ = ["CostModel", "StepSample", "TrainerSteps", "measure_forward_nograd", "measure_peft_serving"]


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
    """The trainer's objective where it is head-only (the head at labelled positions), so the steps the calibration
    times cost what a job's steps cost; else the completion cross-entropy from the model's full logits (a model
    that only returns logits has no loss of its own to fall back on)."""
    if head_plan(model).head_only:
        return completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _enable_only(lora: dict[ModuleKey, nn.Module], layers: set[int]) -> None:
    """Leaves LoRA active on ``layers`` only: the others run their plain base layer, as if never wrapped."""
    for (index, _), layer in lora.items():
        layer.enable_adapters(index in layers)
        if index in layers:
            layer.lora_A[ADAPTER].weight.requires_grad_(False)  # enable_adapters re-enables A's gradient


@torch.no_grad()
def measure_forward_nograd(
    peft_model: nn.Module,
    blocks: nn.ModuleList,
    lora: dict[ModuleKey, nn.Module],
    batch: dict[str, torch.Tensor],
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Per-block forward time with no adapter and no autograd graph: blocks below a placement's lowest layer."""
    head_plan(peft_model)  # its one-time check runs a forward of its own: before the profiler's hooks go on
    _enable_only(lora, set())
    try:
        with StepProfiler(blocks, peft_model.base_model.model, clock) as profiler:
            profiler.profile_step(lambda: _loss(peft_model, batch), backward=False)
    finally:
        _enable_only(lora, {index for index, _ in lora})
    return profiler.profile.forward_seconds


@dataclass(frozen=True)
class StepSample:
    """One measured training step: wall seconds and the bytes autograd saved for backward."""

    seconds: float  # wall time
    saved_bytes: list[int]  # per block
    outside_saved_bytes: int  # embedding, head, loss
    cpu_seconds: float = 0.0  # CPU time of the thread that ran it


class TrainerSteps:
    """Hook-free training steps of the card's model in the trainer's shape (trainer/loop.py ``_step``): a forward
    whose saved tensors are counted, ``zero_grad``, backward, gradient clipping and an AdamW step, on adapters
    whose A and B both train, on the layers of the placement only.

    Within ``with``: AdamW runs at learning rate 0 (its state built beforehand, so no step pays for allocating
    it) and the adapter's weights are restored on exit, so the card's state (the fixed A, B = 0) is untouched.
    The saved-bytes count is attributed to blocks by forward hooks that only set an index: no timing, no sync.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        blocks: nn.ModuleList,
        lora: dict[ModuleKey, nn.Module],
        batch: dict[str, torch.Tensor],
    ) -> None:
        self.model, self.blocks, self.lora, self.batch = peft_model, blocks, lora, batch
        self.num_layers = len(blocks)
        self.device = batch["input_ids"].device
        # On a CPU with one intra-op thread, the calling thread's CPU time is the step's own work (backward runs
        # on it too): the time slices a busy machine gives other processes do not count, so the figures hold
        # still. Elsewhere (threads spinning on each other, a GPU's asynchronous kernels) only wall time will do.
        self.clock = "cpu" if self.device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
        self._params: dict[int, list[torch.Tensor]] = {}
        for (index, _), layer in lora.items():
            self._params.setdefault(index, []).extend((layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight))
        self._weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
        self._current: int | None = None
        self._seen: set[int] = set()
        self._saved = [0] * self.num_layers
        self._outside = 0

    def __enter__(self) -> TrainerSteps:
        every = [p for params in self._params.values() for p in params]
        self._snapshot = [p.detach().clone() for p in every]
        self.optimizer = torch.optim.AdamW(every, lr=0.0, weight_decay=0.0)
        for p in every:  # AdamW builds its moments on a parameter's first step: do it here, outside the timing
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self

    def __exit__(self, *exc) -> None:
        every = [p for params in self._params.values() for p in params]
        with torch.no_grad():
            for p, original in zip(every, self._snapshot):
                p.copy_(original)
        self.optimizer.zero_grad(set_to_none=True)
        _enable_only(self.lora, {index for index, _ in self.lora})  # the card's state: every layer, A frozen

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._weights and ptr not in self._seen:
            self._seen.add(ptr)
            if self._current is None:
                self._outside += storage.nbytes()
            else:
                self._saved[self._current] += storage.nbytes()
        return tensor

    def _enter_block(self, index: int):
        def hook(module, args):
            self._current = index

        return hook

    def _leave_block(self, module, args, output) -> None:
        self._current = None

    def step(self, layers: frozenset[int]) -> StepSample:
        for (index, _), layer in self.lora.items():
            layer.enable_adapters(index in layers)  # A and B train on the placement, as in the trainer
        params = [p for index in sorted(layers) for p in self._params.get(index, ())]
        self._seen.clear()
        self._saved, self._outside, self._current = [0] * self.num_layers, 0, None
        handles = [b.register_forward_pre_hook(self._enter_block(i)) for i, b in enumerate(self.blocks)]
        handles += [b.register_forward_hook(self._leave_block) for b in self.blocks]
        try:
            sync(self.device)
            start, cpu_start = time.perf_counter(), time.thread_time()
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                loss = _loss(self.model, self.batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            self.optimizer.step()
            sync(self.device)
            seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
        finally:
            for handle in handles:
                handle.remove()
            self._current = None
        return StepSample(seconds, list(self._saved), self._outside, cpu_seconds)

    def forward_nograd(self) -> list[float]:
        clock = time.thread_time if self.clock == "cpu" else time.perf_counter
        return measure_forward_nograd(self.model, self.blocks, self.lora, self.batch, clock)


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
