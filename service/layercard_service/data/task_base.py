"""The shape every built-in task family shares: a seeded generator, fixed splits, a prompt-blind floor.

A built-in task exists to tell *content* from *format* (METHOD.md, "the format trap"). Every family
therefore knows the exact distribution of its completions, from which two reference figures follow:

- the **prompt-blind floor**: the lowest mean completion-token loss that any predictor can reach without
  looking at the prompt; a loss below it can only come from reading the prompt, i.e. from learned content;
- the **chance exact-match**: the best exact-match such a predictor gets (always answering the most likely
  completion).
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from layercard_service.data.jsonl import Example
from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["FloorStats", "TaskFamily", "derive_rng", "exact_match", "prompt_blind_floor"]


def derive_rng(seed: int, purpose: str) -> random.Random:
    """An independent, platform-stable random stream per (seed, purpose), e.g. the secret vs the splits.

    Seeding ``random.Random`` with an int is stable across Python versions and machines; hashing the
    purpose in keeps streams independent, so changing the split sizes never changes a task's secret.
    """
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def exact_match(prediction: str, reference: str) -> bool:
    """The task metric: the decoded completion equals the reference after stripping surrounding space."""
    return prediction.strip() == reference.strip()


@dataclass(frozen=True)
class FloorStats:
    """The prompt-blind reference figures of a task under one tokenizer."""

    floor_nats_per_token: float  # entropy_nats / mean_completion_tokens
    entropy_nats: float  # H(C): entropy of the completion a prompt-blind predictor faces, per example
    mean_completion_tokens: float  # E[number of completion tokens], EOS included
    chance_exact_match: float  # max_c P(c)
    support: int  # number of distinct completions


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts without special tokens; the Rust backend directly when there is one (10x faster)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [len(enc.ids) for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prompt_blind_floor(distribution: Mapping[str, float], tokenizer: Any, *, add_eos: bool = True) -> FloorStats:
    """The best mean completion-token loss (nats/token) of a predictor that never sees the prompt.

    Such a predictor sees only the completion tokens generated so far, so the best it can do is to
    predict the completion C from its marginal distribution P(C). Completions are tokenized on their own
    (``data/encode.py``) and, with the EOS appended, the token sequences form a prefix-free code of the
    distinct completion strings, so the chain rule gives, for the optimal prompt-blind predictor,

        E[sum of token losses of one example] = H(C) = -sum_c P(c) log P(c)        (nats)

    The training and validation loss is a mean over all completion tokens of a data set (a ratio of sums),
    which for a large set tends to the ratio of expectations, so

        floor = H(C) / E[n(C)],   n(c) = len(tokenize(c)) + 1 for the EOS,

    computed here exactly by enumerating the distribution and tokenizing every completion with the real
    tokenizer (BPE may give different completions different token counts). The best exact-match without
    the prompt is max_c P(c).

    A chat task (``builtin:facts``) fits the same formula: there the completion is the final assistant
    content, and the labels of a single-turn chat are its tokens plus the end-of-turn token (the template
    closes the turn with EOS right after the content; ``data/encode.py``), so the prompt-blind predictor faces
    the same C and n(C); the template text around it is context, never scored.
    """
    if not distribution:
        raise InvalidArgument.field("distribution", "must not be empty")
    total = math.fsum(distribution.values())
    if abs(total - 1.0) > 1e-9 or any(p < 0 for p in distribution.values()):
        raise InvalidArgument.field("distribution", f"must be a probability distribution (sums to {total})")
    completions = list(distribution)
    token_counts = _token_counts(tokenizer, completions)
    extra = 1 if add_eos else 0
    entropy = -math.fsum(p * math.log(p) for p in distribution.values() if p > 0)
    mean_tokens = math.fsum(distribution[c] * (n + extra) for c, n in zip(completions, token_counts, strict=True))
    return FloorStats(
        floor_nats_per_token=entropy / mean_tokens,
        entropy_nats=entropy,
        mean_completion_tokens=mean_tokens,
        chance_exact_match=max(distribution.values()),
        support=sum(1 for p in distribution.values() if p > 0),
    )


@dataclass(frozen=True)
class TaskFamily(ABC):
    """A seeded generator of prompt/completion pairs with fixed train and validation splits.

    Subclasses define ``sample`` (one draw from the generator) and ``completion_distribution`` (the exact
    marginal law of ``sample(...).completion``); the base class derives the splits and the floor. The
    splits are drawn with a stream derived from ``seed``: validation first (distinct prompts), then
    training examples whose prompts are never validation prompts, so validation measures generalisation
    to unseen prompts of the same task.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    seed: int = 0
    n_train: int = 2000
    n_validation: int = 200

    def __post_init__(self) -> None:
        for field_name in ("n_train", "n_validation"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument.field(field_name, f"must be a positive integer, got {value!r}")

    @property
    def task_name(self) -> str:
        return f"builtin:{self.name}"

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One example drawn from the generator."""

    @abstractmethod
    def completion_distribution(self) -> dict[str, float]:
        """Exact P(completion) under ``sample``: the law a prompt-blind predictor faces."""

    @cached_property
    def splits(self) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        """(train, validation), deterministic in ``seed`` and the sizes; prompts never cross splits."""
        return self._draw_splits()

    @property
    def train(self) -> tuple[Example, ...]:
        return self.splits[0]

    @property
    def validation(self) -> tuple[Example, ...]:
        return self.splits[1]

    def _draw_splits(self) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        rng = derive_rng(self.seed, "splits")
        budget = 100 * (self.n_train + self.n_validation)  # a prompt space too small must fail, not hang
        validation: list[Example] = []
        val_prompts: set[str] = set()
        while len(validation) < self.n_validation:
            budget -= 1
            if budget < 0:
                raise FailedPrecondition(f"{self.task_name}: too few distinct prompts for the splits")
            ex = self.sample(rng)
            if ex.prompt not in val_prompts:
                val_prompts.add(ex.prompt)
                validation.append(ex)
        train: list[Example] = []
        while len(train) < self.n_train:
            budget -= 1
            if budget < 0:
                raise FailedPrecondition(f"{self.task_name}: too few distinct prompts for the splits")
            ex = self.sample(rng)
            if ex.prompt not in val_prompts:
                train.append(ex)
        return tuple(train), tuple(validation)

    def floor(self, tokenizer: Any, *, add_eos: bool = True) -> FloorStats:
        """The prompt-blind floor and chance exact-match under ``tokenizer`` (see prompt_blind_floor)."""
        return prompt_blind_floor(self.completion_distribution(), tokenizer, add_eos=add_eos)
