"""Data parallelism for the tuning worker: the ranks of a ``torchrun`` launch train one job together.

The contract: N processes give the adapter one process gives with the same global batch, within float tolerance.
- Sampling is unchanged: every rank draws the same global batch (the loop's seeded permutation) and trains on its
  contiguous shard of it (``shard``); a global batch smaller than the world is refused.
- The loss is the global batch's mean over label tokens, not a mean of per-rank means: each rank scales its shard's
  mean by (its label tokens / the batch's), so the summed gradients (``reduce_grads``: one flat all-reduce of the
  LoRA gradients, the only trainable parameters) are exactly one process's. Clipping and AdamW then run on identical
  gradients on every rank, so the weights stay identical without a broadcast.
- Evaluation is sharded and reduced: each rank scores every N-th validation example, and the sums (loss, tokens,
  exact-match hits, examples) are all-reduced, so every rank holds the same figures and takes the same
  early-stopping decision.
- Decisions are collective: a stop (cancel) seen by any rank stops all of them at the same step (``any``).
- Dropout draws its masks per rank (seed + rank), so masks differ between shards as they would within one batch;
  with dropout the run matches one process statistically, not bit for bit. Checkpoints keep every rank's RNG state.
- Only rank 0 reports (events, checkpoints, the artifact). A rank that fails reports its own error (named by rank)
  and exits nonzero, so torchrun stops the others; a failed collective (a peer died) is ``PeerLost``, which nobody
  reports (the peer did, or the runner will).

On CPU the backend is gloo; with CUDA it is ``cpu:gloo,cuda:nccl`` (the gradients go through NCCL, the few scalars
and objects through gloo) and each rank uses ``cuda:<LOCAL_RANK>``. Torch is imported where it is used: the worker
imports this module before it knows whether it has anything to train.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from layercard_service.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    import torch

    from layercard_service.trainer.evaluate import EvalResult

__all__ = ["SINGLE", "DataParallel", "PeerLost", "shard_loss"]

log = logging.getLogger(__name__)

T = TypeVar("T")
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank waits this long for a peer that neither answers nor dies
_RANK_SEED_STRIDE = 1_000_000_007


class PeerLost(BaseException):
    """A collective failed: another rank died or left. Not this rank's failure, so no rank reports it: each exits
    nonzero, torchrun ends the pod, and the runner decides (WORKER_DIED with the log's tail, or a new pod that
    resumes from the checkpoint after an eviction). A BaseException: no ``except Exception`` fails the job."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the run; ``SINGLE`` (world size 1) makes every method the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise InvalidArgument(f"bad data-parallel ranks: rank {self.rank} of {self.world_size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DataParallel:
        """torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain start is ``SINGLE``."""
        try:
            return cls(
                int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0))
            )
        except ValueError as exc:
            raise InvalidArgument(f"bad torchrun environment: {exc}") from exc

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the process group --------------------------------------------------------------------------------
    def start(self) -> None:
        """Joins the process group (torchrun's ``MASTER_ADDR``/``MASTER_PORT``); one GPU per rank when CUDA is here."""
        if not self.enabled:
            return
        import torch
        from torch import distributed

        if distributed.is_initialized():
            return
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        distributed.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=COLLECTIVE_TIMEOUT)

    def stop(self, clean: bool = False) -> None:
        """Leaves the process group. ``clean`` (this rank finished its work): first wait for every peer to finish
        too, so no rank tears its connections down while a peer is still in the last collective (gloo aborts the
        peer's process then). A rank that failed leaves at once: its peers may be blocked on it."""
        if not self.enabled:
            return
        from torch import distributed

        if distributed.is_initialized():
            if clean:
                try:
                    distributed.barrier()
                except RuntimeError as exc:  # a peer already gone (it failed): nothing left to wait for
                    log.warning("leaving the process group without the peers: %s", exc)
            distributed.destroy_process_group()

    def device(self) -> str:
        """The device this rank trains on: ``""`` (the loader's choice) when alone, else its own GPU or the CPU."""
        if not self.enabled:
            return ""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def seed(self, seed: int) -> int:
        """This rank's RNG seed for dropout masks: rank 0 keeps the job's seed, so one process is unchanged."""
        return (seed + self.rank * _RANK_SEED_STRIDE) % (2**63)

    # --- data ---------------------------------------------------------------------------------------------
    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.world_size:
            raise InvalidArgument.field(
                "hyperparameters.batch_size",
                f"{batch_size} is smaller than the {self.world_size} processes of the data-parallel run",
            )

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's contiguous part of the global batch (sizes differ by at most one)."""
        n, w = len(batch), self.world_size
        return list(batch[self.rank * n // w : (self.rank + 1) * n // w])

    # --- collectives --------------------------------------------------------------------------------------
    def _collective(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except RuntimeError as exc:  # torch's DistBackendError and gloo's closed connections are RuntimeErrors
            raise PeerLost(
                f"rank {self.rank} of {self.world_size}: another rank of the data-parallel run is gone ({what}: "
                f"{type(exc).__name__}: {str(exc)[:300]})"
            ) from exc

    def sum(self, values: Sequence[float], what: str = "sum") -> list[float]:
        """Element-wise sums over the ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch
        from torch import distributed

        tensor = torch.tensor(list(values), dtype=torch.float64)
        self._collective(what, lambda: distributed.all_reduce(tensor))
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (one rank's cancel stops them all at the same step)."""
        if not self.enabled:
            return flag
        import torch
        from torch import distributed

        tensor = torch.tensor([int(flag)], dtype=torch.int64)
        self._collective("stop flag", lambda: distributed.all_reduce(tensor, op=distributed.ReduceOp.MAX))
        return bool(tensor.item())

    def agree(self, value: int, what: str) -> None:
        """Every rank holds the same ``value`` (e.g. the step it resumed from), else FAILED_PRECONDITION."""
        if not self.enabled:
            return
        import torch
        from torch import distributed

        tensor = torch.tensor([value, -value], dtype=torch.int64)
        self._collective(what, lambda: distributed.all_reduce(tensor, op=distributed.ReduceOp.MAX))
        if tensor[0].item() != -tensor[1].item():
            raise FailedPrecondition(
                f"the ranks of the data-parallel run disagree on the {what}: from {-tensor[1].item()} to "
                f"{tensor[0].item()}",
                reason="DATA_PARALLEL_MISMATCH",
            )

    def reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sums the gradients over the ranks, one flat all-reduce per dtype (a missing gradient counts as zeros)."""
        if not self.enabled:
            return
        import torch
        from torch import distributed

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        groups: dict[torch.dtype, list[int]] = {}
        for i, grad in enumerate(grads):
            groups.setdefault(grad.dtype, []).append(i)
        for members in groups.values():
            flat = torch.cat([grads[i].reshape(-1) for i in members])  # [sum of numel]
            self._collective("gradients", lambda flat=flat: distributed.all_reduce(flat))
            offset = 0
            for i in members:
                params[i].grad = flat[offset : offset + grads[i].numel()].view_as(grads[i])
                offset += grads[i].numel()

    def broadcast(self, value: T | None) -> T | None:
        """Rank 0's ``value`` on every rank (followers pass anything)."""
        if not self.enabled:
            return value
        from torch import distributed

        box = [value]
        self._collective("broadcast", lambda: distributed.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        if not self.enabled:
            return [value]
        from torch import distributed

        box: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._collective("gather", lambda: distributed.gather_object(value, box, dst=0))
        return box

    # --- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, run: Callable[[Sequence[T]], EvalResult], examples: Sequence[T]) -> EvalResult:
        """``run`` on this rank's share of ``examples`` (every N-th), its sums reduced over the ranks."""
        if not self.enabled:
            return run(examples)
        from layercard_service.trainer.evaluate import EvalResult

        share = examples[self.rank :: self.world_size]
        local = run(share) if share else None
        sums = [0.0] * 5  # loss sum, completion tokens, examples, exact-match hits, examples matched
        if local is not None:
            sums[:3] = [local.loss * local.completion_tokens, local.completion_tokens, local.examples]
            if local.exact_match is not None:
                sums[3:] = [local.exact_match * local.examples, local.examples]
        loss_sum, tokens, count, hits, matched = self.sum(sums, "evaluation")
        return EvalResult(
            loss=loss_sum / tokens,
            completion_tokens=int(tokens),
            exact_match=round(hits) / matched if matched else None,
            examples=int(count),
        )


def shard_loss(
    dp: DataParallel, loss: torch.Tensor, labels: torch.Tensor, tokens: int
) -> tuple[torch.Tensor | None, float, int]:
    """(what this rank backpropagates, the global batch's mean loss, the global batch's tokens).

    ``loss`` is the model's mean over this shard's label tokens (``labels`` [B, T], position t predicting t+1).
    Scaled by this shard's share of the batch's label tokens, the ranks' summed gradients are the global mean's.
    None: the shard has no label token, it contributes zero gradients."""
    if not dp.enabled:
        return loss, float(loss.detach()), tokens
    from layercard_service.data.encode import IGNORE_INDEX

    local = int((labels[:, 1:] != IGNORE_INDEX).sum())
    loss_sum, count, total_tokens = dp.sum([float(loss.detach()) * local if local else 0.0, local, tokens], "loss")
    mean = loss_sum / count if count else math.nan
    return (loss * (local / count) if local else None), mean, int(total_tokens)


SINGLE = DataParallel()
