"""The frozen-prefix activation cache: the hidden states entering the lowest adapted block, computed once.

When every block below the lowest adapted block ``low`` is frozen and deterministic, the hidden states entering
``low`` are a fixed function of the example. One no-grad pass over the training set (stopped at ``low``) computes
them; every training step then feeds them to ``low`` instead of running blocks 0..low-1 again (Skip2-LoRA's idea).

How a cached step runs, generically: the backbone's own forward is called as always, so it builds the position
ids, rotary embeddings, causal, padding and sliding-window masks exactly as the uncached step; only the blocks
below ``low`` are replaced, for the length of the step, by stubs that return the cached hidden states (in the
output form each block returned in the building pass). The embeddings still run (a lookup: nothing to save).
Padding: rows are cached at their own length and right-padded with zeros; a real token never attends to a pad
(causal mask, right padding), so its hidden states, the loss and the gradients are those of the uncached step up
to float rounding (a row's sums may group differently in batches of another width).

It is off, and ``PrefixCacheReport.reason`` says why, when it cannot be exact: no block below ``low``, a trainable
parameter before ``low``, dropout or router noise in the model (train mode draws random numbers there), a building
pass that drew random numbers anyway, a block whose output holds more than its hidden states, or a check on the
first training batch that shows cached logits differing from the uncached ones.

Where it lives: on the model's device while it fits ``max_memory_bytes``; beyond that in a file in ``spill_dir``
(default: a temporary folder), read back per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layercard_service.card_engine.arch import find_blocks
from layercard_service.card_engine.tokens import block_input
from layercard_service.data.encode import EncodedExample, collate
from layercard_service.models.head import head_plan, labelled_logits, unwrap
from layercard_service.trainer.prefix_pricing import DEFAULT_MAX_MEMORY_BYTES, more_than_one_epoch

__all__ = ["PrefixCache", "PrefixCacheReport", "PrefixCacheSettings", "build_prefix_cache", "lowest_adapted_block"]

# Config fields that only matter for heads the causal LM does not use.
_UNUSED_DROPOUTS = ("classifier_dropout", "summary_first_dropout", "summary_dropout")
_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # other dtypes (bf16, fp16): 5e-2


@dataclass(frozen=True)
class PrefixCacheSettings:
    enabled: bool = True  # a job option; on by default wherever the cache is exact
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES  # beyond this the cache goes to disk
    spill_dir: Path | None = None  # where the on-disk cache goes; None: a temporary folder
    # A run that sees each example at most once would pay for the building pass what it saves: off there
    # (False builds it anyway, e.g. to measure cached steps).
    only_when_it_pays: bool = True


@dataclass(frozen=True)
class PrefixCacheReport:
    """What the job's events say about the cache: whether it ran, what it cost, what a step saves."""

    enabled: bool
    reason: str = ""  # why it is off; empty when on
    cached_blocks: int = 0  # blocks below the lowest adapted one, skipped by every step
    examples: int = 0
    tokens: int = 0
    build_seconds: float = 0.0  # the no-grad pass over the training set
    bytes: int = 0
    on_disk: bool = False
    saved_seconds_per_step: float = 0.0  # the prefix's forward per batch, from the building pass's time

    def to_payload(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def message(self) -> str:
        if not self.enabled:
            return f"prefix cache off: {self.reason}"
        where = "on disk" if self.on_disk else "in memory"
        return (
            f"prefix cache on: blocks 0-{self.cached_blocks - 1} cached for {self.examples} examples in "
            f"{self.build_seconds:.2f} s, {self.bytes / 2**20:.1f} MiB {where}; about "
            f"{self.saved_seconds_per_step:.3f} s saved per step"
        )


def _blocks(model: nn.Module) -> nn.ModuleList:
    return find_blocks(unwrap(model))[1]


def lowest_adapted_block(model: nn.Module) -> int | None:
    """The lowest block holding a trainable parameter (None: none does)."""
    blocks = _blocks(model)
    trainable = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
    return min(trainable) if trainable else None


def _why_not(model: nn.Module, blocks: nn.ModuleList, low: int | None) -> str:
    """Empty when the prefix below ``low`` is frozen and draws no random numbers; else why not."""
    if low is None:
        return "no block holds a trainable parameter"
    if low == 0:
        return "the lowest adapted block is block 0: there is no frozen prefix to cache"
    hf = unwrap(model)
    upper = {id(p) for block in blocks[low:] for p in block.parameters()}
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    head_params = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    embeddings = hf.get_input_embeddings() if callable(getattr(hf, "get_input_embeddings", None)) else None
    embedding_params = {id(p) for p in embeddings.parameters()} if isinstance(embeddings, nn.Module) else set()
    for name, param in hf.named_parameters():
        outside = id(param) not in upper and (id(param) not in head_params or id(param) in embedding_params)
        if param.requires_grad and outside:
            return f"{name} is trainable and acts at or below the lowest adapted block {low}"
    config = getattr(hf, "config", None)
    fields = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    for key, value in sorted(fields.items()):
        random_field = "drop" in key or "jitter" in key  # dropout, resid_pdrop, layerdrop, router jitter
        if random_field and key not in _UNUSED_DROPOUTS and isinstance(value, (int, float)) and value > 0:
            return f"the model's config sets {key}={value}: training draws random numbers in the frozen blocks"
    adapted = {id(m) for block in blocks[low:] for m in block.modules()}
    for name, module in hf.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and id(module) not in adapted:
            return f"{name} is a dropout (p={module.p}) outside the adapted blocks"
    return ""


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_state(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _output_form(output: object) -> tuple[str, int] | str:
    """("tensor", 0) or ("tuple", n) when a block's output is its hidden states (and Nones); else why not."""
    if isinstance(output, torch.Tensor):
        return ("tensor", 0)
    hidden_only = isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor)
    if hidden_only and all(item is None for item in output[1:]):
        return ("tuple", len(output))
    return f"a frozen block returns {type(output).__name__} with more than its hidden states"


class _Stop(Exception):
    """Ends the building pass's forward at the lowest adapted block."""


class PrefixCache:
    """The hidden states entering block ``low`` for every training example ([len_i, H] each)."""

    def __init__(
        self,
        model: nn.Module,
        low: int,
        encoded: Sequence[EncodedExample],
        rows: list[torch.Tensor] | None,
        file: tuple[np.memmap, list[int], int, torch.dtype] | None,
        forms: list[tuple[str, int]],
    ) -> None:
        self.model, self.low, self.forms = model, low, forms
        self._slots = {id(e): i for i, e in enumerate(encoded)}
        self._rows, self._file = rows, file
        self.device = next(model.parameters()).device
        self.dtype = rows[0].dtype if rows else file[3]  # type: ignore[index]

    def _row(self, slot: int, length: int) -> torch.Tensor:
        if self._rows is not None:
            return self._rows[slot]
        mm, offsets, hidden, dtype = self._file  # type: ignore[misc]
        raw = torch.from_numpy(np.array(mm[offsets[slot] : offsets[slot + 1]]))
        return raw.view(dtype).reshape(length, hidden)

    def hidden_for(self, examples: Sequence[EncodedExample], width: int) -> torch.Tensor:
        """[B, width, H]: the batch's cached rows, right-padded with zeros (as ``collate`` pads the tokens)."""
        rows = [self._row(self._slots[id(e)], len(e.input_ids)) for e in examples]
        out = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=self.device)
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row.to(self.device, non_blocking=True)
        return out

    @contextlib.contextmanager
    def feeding(self, examples: Sequence[EncodedExample], width: int) -> Iterator[None]:
        """Within it, a forward of the model on this batch skips blocks 0..low-1 and starts from the cache."""
        hidden = self.hidden_for(examples, width)
        blocks = _blocks(self.model)

        def stub(form: tuple[str, int]):
            def forward(*args: object, **kwargs: object) -> object:
                return hidden if form[0] == "tensor" else (hidden, *([None] * (form[1] - 1)))

            return forward

        for index in range(self.low):
            blocks[index].forward = stub(self.forms[index])  # the instance's forward shadows the class's
        try:
            yield
        finally:
            for index in range(self.low):
                del blocks[index].forward


def build_prefix_cache(
    model: nn.Module,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    batch_size: int,
    settings: PrefixCacheSettings,
    total_steps: int | None = None,
) -> tuple[PrefixCache | None, PrefixCacheReport]:
    """Builds the cache for ``encoded`` (the training set) when it can be exact; else (None, why not).

    ``total_steps``: the run's length, to leave the cache off where it cannot pay (None: build it regardless).
    """
    if not settings.enabled:
        return None, PrefixCacheReport(False, "turned off in the job's hyperparameters (prefix_cache = false)")
    batches = math.ceil(len(encoded) / batch_size)
    pays = total_steps is None or more_than_one_epoch(total_steps, len(encoded), batch_size)
    if settings.only_when_it_pays and not pays:
        return None, PrefixCacheReport(
            False,
            f"the run's {total_steps} steps see each example at most once: building the cache ({batches} "
            "batches of the frozen blocks' forward) would cost what it saves",
        )
    blocks = _blocks(model)
    low = lowest_adapted_block(model)
    reason = _why_not(model, blocks, low)
    if reason:
        return None, PrefixCacheReport(False, reason)
    assert low is not None
    head_plan(model)  # its one-time check runs a forward of its own: before the hooks go on
    device = next(model.parameters()).device
    started = time.perf_counter()
    rng = _rng_state(device)
    captured: dict[str, torch.Tensor] = {}
    forms: list[tuple[str, int] | str] = [""] * low

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = block_input(args, kwargs)
        raise _Stop

    def form_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            forms[index] = _output_form(output)

        return hook

    handles = [blocks[low].register_forward_pre_hook(capture, with_kwargs=True)]
    handles += [blocks[i].register_forward_hook(form_hook(i)) for i in range(low)]
    rows: list[torch.Tensor | None] = [None] * len(encoded)
    spill: tuple[np.memmap, list[int], int, torch.dtype] | None = None
    tokens = sum(len(e.input_ids) for e in encoded)
    total_bytes = 0
    try:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # little padding per batch
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in chosen], pad_id).items()}  # [B, T]
            with torch.no_grad(), contextlib.suppress(_Stop):
                unwrap(model).base_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                )
            hidden = captured.pop("hidden", None)  # [B, T, H]
            if hidden is None:
                return None, PrefixCacheReport(False, f"block {low} was not called with a hidden-states tensor")
            if start == 0:
                total_bytes = tokens * hidden.shape[-1] * hidden.element_size()
                if total_bytes > settings.max_memory_bytes:
                    spill = _open_spill(settings, encoded, hidden)  # over the bound: the whole cache on disk
            for row, index in enumerate(chosen):
                kept = hidden[row, : len(encoded[index].input_ids)]  # [len_i, H]
                if spill is None:
                    rows[index] = kept.clone()
                else:
                    mm, offsets, _, _ = spill
                    mm[offsets[index] : offsets[index + 1]] = (
                        kept.cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
                    )
        if spill is not None:
            spill[0].flush()
        for index in range(low):
            if isinstance(forms[index], str):
                return None, PrefixCacheReport(False, forms[index] or f"block {index} was not called")
    except Exception as exc:  # a model whose prefix cannot run alone: train uncached rather than fail the job
        _set_rng_state(device, rng)
        return None, PrefixCacheReport(False, f"the building pass failed: {type(exc).__name__}: {exc}")
    finally:
        for handle in handles:
            handle.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_seconds = time.perf_counter() - started
    if not all(torch.equal(a, b) for a, b in zip(rng, _rng_state(device), strict=True)):
        _set_rng_state(device, rng)  # the training's dropout masks must not depend on whether the cache was tried
        return None, PrefixCacheReport(False, "the frozen blocks drew random numbers in the building pass")
    cache = PrefixCache(model, low, encoded, None if spill else rows, spill, forms)  # type: ignore[arg-type]
    mismatch = _check(model, cache, encoded[:batch_size], pad_id)
    if mismatch:
        return None, PrefixCacheReport(False, mismatch)
    per_batch = build_seconds / max(1, batches)
    return cache, PrefixCacheReport(
        True,
        cached_blocks=low,
        examples=len(encoded),
        tokens=tokens,
        build_seconds=build_seconds,
        bytes=total_bytes,
        on_disk=spill is not None,
        saved_seconds_per_step=per_batch,
    )


def _open_spill(
    settings: PrefixCacheSettings, encoded: Sequence[EncodedExample], hidden: torch.Tensor
) -> tuple[np.memmap, list[int], int, torch.dtype]:
    """A file sized for every example's rows (raw bytes of ``hidden``'s dtype), and each example's byte offset."""
    width = hidden.shape[-1] * hidden.element_size()
    offsets = [0]
    for e in encoded:
        offsets.append(offsets[-1] + len(e.input_ids) * width)
    folder = Path(tempfile.mkdtemp(prefix="prefix-cache-", dir=settings.spill_dir))
    mm = np.memmap(folder / "hidden.bin", dtype=np.uint8, mode="w+", shape=(max(1, offsets[-1]),))
    weakref.finalize(mm, shutil.rmtree, folder, True)  # the file goes with the cache (or a failed attempt)
    return mm, offsets, int(hidden.shape[-1]), hidden.dtype


@torch.no_grad()
def _check(model: nn.Module, cache: PrefixCache, examples: Sequence[EncodedExample], pad_id: int) -> str:
    """Empty when the cached forward gives the uncached logits on one batch (float rounding aside)."""
    batch = {k: v.to(cache.device) for k, v in collate(examples, pad_id).items()}
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout above the prefix either: the check must not draw the training's random numbers
    try:
        expected, _ = labelled_logits(model, *args)
        with cache.feeding(examples, batch["input_ids"].shape[1]):
            got, _ = labelled_logits(model, *args)
    finally:
        for module, training in modes.items():
            module.training = training
    rtol = _CHECK_RTOL.get(cache.dtype, 5e-2)
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    if not diff <= rtol * (1.0 + float(expected.abs().max() if expected.numel() else 0.0)):
        return f"the cached forward does not reproduce the model's logits (they differ by {diff:.3g})"
    return ""
