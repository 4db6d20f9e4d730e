"""Per-block cost of a training step, measured with hooks: forward time, backward time, activation bytes.

Timing: a forward pre-hook and hook around each block; in backward, a gradient hook on the block's output
fires when its backward starts and one on its input when it ends. The lowest block whose input needs no
gradient (the embedding is frozen) ends when ``backward()`` returns.

Memory: autograd's saved-tensor hooks see every tensor kept for backward; each storage is counted once, in the
block that saved it first, and frozen weights (which backward also keeps, but which exist anyway) are skipped.
That is the activation memory METHOD.md's cost model is about, and it is measurable on any device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from layercard_service.card_engine.tokens import block_input

__all__ = ["BlockProfile", "StepProfiler", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BlockProfile:
    """Sums over the profiled steps; divide by ``steps`` for per-step figures."""

    num_blocks: int
    steps: int = 0
    step_seconds: float = 0.0
    forward_seconds: list[float] = field(default_factory=list)
    backward_seconds: list[float] = field(default_factory=list)
    saved_bytes: list[int] = field(default_factory=list)
    outside_saved_bytes: int = 0  # saved outside any block: the head, the loss

    def __post_init__(self) -> None:
        self.forward_seconds = self.forward_seconds or [0.0] * self.num_blocks
        self.backward_seconds = self.backward_seconds or [0.0] * self.num_blocks
        self.saved_bytes = self.saved_bytes or [0] * self.num_blocks

    def per_step(self) -> BlockProfile:
        n = max(self.steps, 1)
        return BlockProfile(
            self.num_blocks,
            1,
            self.step_seconds / n,
            [t / n for t in self.forward_seconds],
            [t / n for t in self.backward_seconds],
            [b // n for b in self.saved_bytes],
            self.outside_saved_bytes // n,
        )

    @property
    def fixed_seconds(self) -> float:
        """Step time spent outside the blocks (embedding, head, loss), per profiled step."""
        return (self.step_seconds - sum(self.forward_seconds) - sum(self.backward_seconds)) / max(self.steps, 1)


class StepProfiler:
    """Hooks a model's blocks; ``profile_step(fn)`` runs one forward+backward and adds its costs."""

    def __init__(
        self, blocks: nn.ModuleList, frozen: nn.Module, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.blocks = blocks
        self.clock = clock  # wall time; the process's CPU time where another process's time slices must not count
        self.device = next(blocks.parameters()).device
        self.profile = BlockProfile(len(blocks))
        self._weights = {p.untyped_storage().data_ptr() for p in frozen.parameters()}
        self._handles: list = []
        self._current: int | None = None
        self._enabled = False
        self._seen: set[int] = set()
        self._bwd_start: dict[int, float] = {}
        self._bwd_end: dict[int, float] = {}

    # --- hooks -----------------------------------------------------------------------------------------
    def _pre(self, index: int):
        def hook(module, args, kwargs):
            if not self._enabled:
                return
            hidden = block_input(args, kwargs)
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: self._mark(self._bwd_end, index))
            sync(self.device)
            self._current = index
            self._t0 = self.clock()

        return hook

    def _post(self, index: int):
        def hook(module, args, kwargs, output):
            if not self._enabled:
                return
            sync(self.device)
            self.profile.forward_seconds[index] += self.clock() - self._t0
            self._current = None
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda grad: self._mark(self._bwd_start, index))

        return hook

    def _mark(self, table: dict[int, float], index: int) -> None:
        sync(self.device)
        table.setdefault(index, self.clock())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._enabled:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in self._weights and ptr not in self._seen:
                self._seen.add(ptr)
                nbytes = tensor.untyped_storage().nbytes()
                if self._current is None:
                    self.profile.outside_saved_bytes += nbytes
                else:
                    self.profile.saved_bytes[self._current] += nbytes
        return tensor

    # --- use -------------------------------------------------------------------------------------------
    def __enter__(self) -> StepProfiler:
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def _saved_tensor_accounting(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    def profile_step(self, forward: Callable[[], torch.Tensor], backward: bool = True) -> torch.Tensor:
        """Runs ``forward()`` (returns the loss) and its backward, recording this step's per-block costs."""
        self._seen.clear()
        self._bwd_start.clear()
        self._bwd_end.clear()
        self._enabled = True
        try:
            sync(self.device)
            start = self.clock()
            with self._saved_tensor_accounting():
                loss = forward()
            if backward:
                loss.backward()
            sync(self.device)
            end = self.clock()
        finally:
            self._enabled = False
            self._current = None
        self.profile.step_seconds += end - start
        self.profile.steps += 1
        for index, began in self._bwd_start.items():
            self.profile.backward_seconds[index] += self._bwd_end.get(index, end) - began
        return loss.detach()
