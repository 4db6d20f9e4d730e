"""The resumable training loop of a tuning job: AdamW on the adapter, a stateless LR schedule, periodic
evaluation with early stopping, checkpoints that resume identically, and measured cost.

Resuming identically needs four things in the checkpoint: adapter weights, optimizer moments, the RNG state
(dropout masks) and the batch position. Batches come from a fresh permutation per epoch seeded by
(seed, epoch), so the position is just (epoch, batch index) and no generator state has to be saved.

Measured peak memory uses the card cost model's basis (``card_engine/cost.py``), so it compares with the plan's
prediction on any device: frozen weight bytes + the bytes autograd saves for backward (counted with
saved-tensor hooks, largest step) + 4x the adapter's bytes (weights, gradients, Adam's two moments).
Measured step time is the median wall time of a step (forward, backward, optimizer) after warm-up.

Data-parallel (``dist``, trainer/distributed.py): every rank draws the same global batch and trains on its shard;
the loss is the global batch's token mean and the gradients are summed over the ranks, so N processes step as one.
Steps take the loss with the LM head at the labelled positions only (``models/head.py``) and, where that is
exact, start from the frozen prefix's cached output (``prefix_cache.py``, built at the start of each run and
counted in its training time); batches and padding are the same either way.

Early stopping ends training with the current weights (those of the last evaluation), not the best ones. An
evaluation counts as an improvement only when its loss falls below the best by more than
max(early_stopping_min_delta, early_stopping_min_delta_rel * |best|) (defaults 1e-4 and 1e-3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from layercard_service.data.encode import EncodeConfig, EncodedExample, collate, encode_examples
from layercard_service.data.jsonl import Example
from layercard_service.domain.jobs import EvalSummary, Hyperparameters
from layercard_service.errors import InvalidArgument
from layercard_service.models.head import training_loss
from layercard_service.trainer.checkpoint import load_latest, restore_rng, rng_state, save_checkpoint
from layercard_service.trainer.distributed import SINGLE, DataParallel, shard_loss
from layercard_service.trainer.evaluate import evaluate
from layercard_service.trainer.prefix_cache import (
    PrefixCache,
    PrefixCacheReport,
    PrefixCacheSettings,
    build_prefix_cache,
)
from layercard_service.trainer.schedule import lr_factor

__all__ = ["LoopHooks", "LoopState", "Outcome", "StepReport", "TrainingLoop", "WARMUP_STEPS_IGNORED"]

WARMUP_STEPS_IGNORED = 2  # first steps pay for allocations and lazy init: not in the measured step time
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based
    total_steps: int
    loss: float
    learning_rate: float
    seconds: float
    tokens: int
    tokens_per_second: float
    eta_seconds: float


@dataclass
class LoopState:
    """Everything besides tensors that a checkpoint carries."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    step_seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    peak_saved_bytes: int = 0
    best_loss: float | None = None
    evals_without_improvement: int = 0
    base_eval: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None


@dataclass(frozen=True)
class Outcome:
    reason: str  # finished | early_stopped | stopped
    state: LoopState

    @property
    def measured_step_seconds(self) -> float:
        """Median step time after warm-up (all steps when too few)."""
        times = self.state.step_seconds
        steady = times[WARMUP_STEPS_IGNORED:] or times
        return statistics.median(steady) if steady else 0.0


@dataclass
class LoopHooks:
    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[StepReport], None] = lambda report: None
    on_eval: Callable[[EvalSummary], None] = lambda summary: None
    on_checkpoint: Callable[[int, Path], None] = lambda step, path: None
    # Files (name -> text) written into the checkpoint of a step before it is complete: atomic with it, where
    # writing them after on_checkpoint could be cut short by a kill.
    checkpoint_files: Callable[[int, Path], dict[str, str]] = lambda step, path: {}
    on_resume: Callable[[int], None] = lambda step: None
    on_prefix_cache: Callable[[PrefixCacheReport], None] = lambda report: None


class _SavedBytes:
    """Counts the distinct storages autograd saves for backward, frozen and trainable weights excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.total = 0

    def reset(self) -> None:
        self._seen.clear()
        self.total = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._weights and ptr not in self._seen:
            self._seen.add(ptr)
            self.total += storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


class TrainingLoop:
    """One job's training on an adapter-wrapped model (from ``trainer.attach_lora``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        train: Sequence[Example],
        validation: Sequence[Example],
        hp: Hyperparameters,
        checkpoint_root: Path | None = None,
        dist: DataParallel = SINGLE,
        prefix_cache: PrefixCacheSettings | None = None,
    ) -> None:
        if len(train) < hp.batch_size:
            raise InvalidArgument(
                f"training_data: has {len(train)} examples, fewer than the batch size {hp.batch_size}",
                reason="INVALID_DATASET",
            )
        dist.check_batch(hp.batch_size)
        self.model, self.tokenizer, self.hp, self.dist = model, tokenizer, hp, dist
        self.encode = EncodeConfig(max_length=hp.max_seq_len)
        self.train = encode_examples(tokenizer, train, self.encode)
        self.validation = tuple(validation)
        self.checkpoint_root = checkpoint_root
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidArgument.field("placement", "the adapter has no trainable parameters")
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, weight_decay=0.0)
        self.state = LoopState()
        self.batches_per_epoch = len(self.train) // hp.batch_size  # the ragged tail is dropped
        settings = prefix_cache or PrefixCacheSettings()
        self.prefix_settings = dataclasses.replace(settings, enabled=settings.enabled and hp.prefix_cache)
        self.prefix_cache: PrefixCache | None = None
        self.prefix_report: PrefixCacheReport | None = None  # set by the first run()

    # --- cost basis -------------------------------------------------------------------------------------
    @property
    def adapter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def measured_peak_memory_bytes(self) -> int:
        frozen = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        report = self.prefix_report
        cached = report.bytes if report is not None and report.enabled and not report.on_disk else 0
        return frozen + self.state.peak_saved_bytes + 4 * self.adapter_bytes + cached

    # --- resume -----------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Loads the newest checkpoint, if any; returns its step (0: starting fresh). Every rank loads it."""
        step = self._load()
        self.dist.agree(step, "checkpoint step to resume from")
        return step

    def _load(self) -> int:
        if self.checkpoint_root is None:
            return 0
        loaded = load_latest(self.checkpoint_root)
        if loaded is None:
            return 0
        missing = set(self.named) - set(loaded.adapter)
        if missing:
            raise InvalidArgument(
                f"checkpoint {loaded.path} does not match the adapter ({len(missing)} tensors missing)",
                reason="RESUME_FAILED",
            )
        with torch.no_grad():
            for name, param in self.named.items():
                param.copy_(loaded.adapter[name])
        self.optimizer.load_state_dict(loaded.optimizer)
        restore_rng(loaded.rng, self.dist.rank, self.dist.world_size)
        known = {f for f in LoopState.__dataclass_fields__}
        self.state = LoopState(**{k: v for k, v in loaded.state.items() if k in known})
        return self.state.step

    def checkpoint(self, extra_files: Callable[[int, Path], dict[str, str]] | None = None) -> Path:
        """Saves this step's checkpoint; ``extra_files(step, final_path)`` are saved within it."""
        assert self.checkpoint_root is not None
        ranks_rng = self.dist.gather(rng_state())  # rank 0 writes the checkpoint, every rank's RNG in it
        if not self.dist.is_main:
            return self.checkpoint_root / f"step-{self.state.step}"
        adapter = {n: p.detach().cpu().clone() for n, p in self.named.items()}
        step, root = self.state.step, self.checkpoint_root
        extras = extra_files(step, root / f"step-{step}") if extra_files else None
        return save_checkpoint(root, step, adapter, self.optimizer.state_dict(), asdict(self.state), ranks_rng, extras)

    # --- evaluation -------------------------------------------------------------------------------------
    def evaluate(self) -> EvalSummary | None:
        if not self.validation:
            return None
        # Data-parallel: each rank scores its share, the sums are reduced (every rank gets the same figures).
        result = self.dist.evaluate(
            lambda share: evaluate(self.model, self.tokenizer, share, encode=self.encode), self.validation
        )
        self.model.train()
        return EvalSummary(self.state.step, result.loss, result.exact_match or 0.0, result.examples)

    def base_eval(self) -> EvalSummary | None:
        """The validation figures before training (adapters off), computed once and kept in checkpoints."""
        if self.state.base_eval is None and self.validation:
            with self.model.disable_adapter():
                summary = self.evaluate()
            self.state.base_eval = asdict(summary)
        return EvalSummary(**self.state.base_eval) if self.state.base_eval else None

    def _improved(self, summary: EvalSummary) -> bool:
        """Records an evaluation; True when its loss beats the best by more than the minimum delta."""
        self.state.last_eval = asdict(summary)
        best, hp = self.state.best_loss, self.hp
        margin = max(hp.early_stopping_min_delta, hp.early_stopping_min_delta_rel * abs(best or 0.0))
        if best is None or summary.loss < best - margin:
            self.state.best_loss, self.state.evals_without_improvement = summary.loss, 0
            return True
        self.state.evals_without_improvement += 1
        return False

    # --- training ---------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[list[EncodedExample]]:
        while True:
            seed = (self.hp.seed * 1_000_003 + self.state.epoch) % (2**63)
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
            while self.state.batch_index < self.batches_per_epoch:
                start = self.state.batch_index * self.hp.batch_size
                yield [self.train[i] for i in order[start : start + self.hp.batch_size]]
            self.state.epoch, self.state.batch_index = self.state.epoch + 1, 0

    def run(self, total_steps: int, hooks: LoopHooks | None = None) -> Outcome:
        hooks = hooks or LoopHooks()
        if self.state.step == 0:
            torch.manual_seed(self.dist.seed(self.hp.seed))  # dropout masks; a resumed run restored the RNG instead
        counter = _SavedBytes(self.model)
        batches = self._batches()
        self.model.train()
        if self.prefix_report is None:  # once per loop: the cache holds the frozen prefix's fixed output
            self.prefix_cache, self.prefix_report = build_prefix_cache(
                self.model, self.train, self.pad_id, self.hp.batch_size, self.prefix_settings, total_steps
            )
            self.state.train_seconds += self.prefix_report.build_seconds  # a cost of this run's training
            hooks.on_prefix_cache(self.prefix_report)
        while self.state.step < total_steps:
            if self.dist.any(hooks.should_stop()):  # rank 0 polls the service; all ranks stop at the same step
                return Outcome("stopped", self.state)
            report = self._step(next(batches), counter, total_steps)
            hooks.on_step(report)
            step, hp = self.state.step, self.hp
            last = step == total_steps
            if hp.eval_interval and step % hp.eval_interval == 0 and not last:
                summary = self.evaluate()
                if summary is not None:
                    hooks.on_eval(summary)
                    improved = self._improved(summary)
                    patience = hp.early_stopping_patience
                    if patience and not improved and self.state.evals_without_improvement >= patience:
                        return Outcome("early_stopped", self.state)
            checkpointing = self.checkpoint_root is not None and hp.checkpoint_interval > 0
            if checkpointing and step % hp.checkpoint_interval == 0 and not last:
                hooks.on_checkpoint(step, self.checkpoint(hooks.checkpoint_files))
        return Outcome("finished", self.state)

    def final_eval(self, hooks: LoopHooks | None = None) -> EvalSummary | None:
        """The end-of-training evaluation (reused when the last periodic one was at this very step)."""
        last = self.state.last_eval
        if last is not None and last["step"] == self.state.step:
            return EvalSummary(**last)
        summary = self.evaluate()
        if summary is not None:
            self.state.last_eval = asdict(summary)
            if hooks is not None:
                hooks.on_eval(summary)
        return summary

    def _step(self, examples: list[EncodedExample], counter: _SavedBytes, total_steps: int) -> StepReport:
        state, hp = self.state, self.hp
        lr = hp.learning_rate * lr_factor(hp.schedule, state.step, total_steps, hp.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        examples = self.dist.shard(examples)  # this rank's part of the global batch
        device = self.params[0].device
        batch = {k: v.to(device) for k, v in collate(examples, self.pad_id).items()}  # each [B, T]
        counter.reset()
        cache = self.prefix_cache
        feed = cache.feeding(examples, batch["input_ids"].shape[1]) if cache else contextlib.nullcontext()
        with counter.hooks(), feed:
            loss_tensor = training_loss(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        tokens = int(batch["attention_mask"].sum())  # every real token the step processed, prompt included
        loss, value, tokens = shard_loss(self.dist, loss_tensor, batch["labels"], tokens)  # the global batch's
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        self.dist.reduce_grads(self.params)  # summed over ranks: the global batch's gradient
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        if self.params[0].device.type == "cuda":
            torch.cuda.synchronize(self.params[0].device)  # kernels run asynchronously: time them finished
        seconds = time.perf_counter() - started
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {state.step + 1}")
        state.step += 1
        state.batch_index += 1
        state.step_seconds.append(seconds)
        state.tokens += tokens
        state.train_seconds += seconds
        state.peak_saved_bytes = max(state.peak_saved_bytes, counter.total)
        recent = state.step_seconds[-20:]
        eta = (total_steps - state.step) * (sum(recent) / len(recent))
        return StepReport(
            state.step, total_steps, value, lr, seconds, tokens, tokens / seconds if seconds > 0 else 0.0, eta
        )
