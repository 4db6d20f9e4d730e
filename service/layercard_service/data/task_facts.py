"""``builtin:facts``: a made-up fact table, asked as chats, for instruct models.

The other built-in tasks are prompt/completion text for a base model; an instruct model is tuned and served in
its chat template, so this task is made of chats (``Example.messages``: a user question, the assistant's
answer), which training, evaluation and the card's probe render in the model's own template.

Content: ``n_facts`` invented countries, each with an invented capital (``"What is the capital of Veltria?"``
-> ``"Morvane"``). The names are pronounceable nonsense drawn from the seed, so no pretrained model knows the
answers (the base model scores exact match 0), and each answer is one word, which a short LoRA run on a small
instruct model learns.

Splits: the task is memorization of a table, so there is nothing to generalise to but the wording: validation
asks *every fact of the table*, each in a phrasing never trained on for that fact (a rotating held-out
phrasing, so every phrasing is trained with other countries). Asking about facts absent from training would
measure nothing (no model can know an invented capital), and asking the very training questions would reward
rote recall of one string; a held-out phrasing checks that the adapter learned the fact itself.

Measured by hand on ``builtin:smollm2-135m`` (CPU, one thread, float32, max length 128): the base model scores
exact match 0/24 on validation (loss 10.98 nats/token; it answers "The capital of ..."); 40 steps of rank-8 LoRA on
every linear module of all 30 blocks, batch 16, lr 3e-3 (157 s of training) reach 24/24 on the held-out
phrasings, loss 0.002 against the floor's 0.89. A cheaper placement (blocks 18-29, lr 1e-3) got 4/24 in 40 steps.

Floor: every fact is asked equally often and capitals are distinct, so answers are uniform over ``n_facts``
words: the prompt-blind floor is log(n_facts) over the answer's tokens plus the end-of-turn token (the chat
templates close an assistant turn with EOS right after its content), and chance exact match is 1/n_facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

from layercard_service.data.jsonl import ChatMessage, Example
from layercard_service.data.task_base import TaskFamily, derive_rng
from layercard_service.errors import InvalidArgument

__all__ = ["FACT_QUESTIONS", "FactsTask"]

# Ways of asking one fact. Every one names the country once; the answer is the capital alone.
FACT_QUESTIONS: tuple[str, ...] = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
    "What city is the capital of {c}?",
    "Tell me the capital of {c}.",
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_COUNTRY_ENDINGS = ("ria", "nia", "land", "stan", "via", "dor")
_CITY_ENDINGS = ("ne", "rk", "th", "sk", "ra", "nd")


def _word(rng: random.Random, syllables: int, endings: tuple[str, ...]) -> str:
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(endings)).title()


@dataclass(frozen=True)
class FactsTask(TaskFamily):
    """Invented countries and their invented capitals, asked in several phrasings; see the module docstring."""

    name = "facts"
    description = "Recall a made-up fact table, as chats: 'What is the capital of Veltria?' -> 'Morvane'."

    n_facts: int = 24
    n_train: int = 960  # 10 rounds over the (fact, phrasing) cells kept for training
    n_validation: int = 24  # every fact once, in its held-out phrasing
    questions: tuple[str, ...] = field(default=FACT_QUESTIONS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.n_facts <= 200:
            raise InvalidArgument.field("n_facts", f"must be in [2, 200], got {self.n_facts}")
        if len(self.questions) < 2:
            raise InvalidArgument.field("questions", "needs at least two phrasings (one is held out per fact)")
        if self.n_validation > self.n_facts:
            raise InvalidArgument.field("n_validation", f"at most one question per fact: at most {self.n_facts}")

    @cached_property
    def table(self) -> dict[str, str]:
        """country -> capital; all names distinct, seeded."""
        rng = derive_rng(self.seed, "facts-table")
        names: list[str] = []
        while len(names) < 2 * self.n_facts:
            endings = _COUNTRY_ENDINGS if len(names) < self.n_facts else _CITY_ENDINGS
            name = _word(rng, rng.choice((1, 2)), endings)
            if name not in names:
                names.append(name)
        return dict(zip(names[: self.n_facts], names[self.n_facts :], strict=True))

    def _example(self, country: str, question: str) -> Example:
        return Example.chat(
            (ChatMessage("user", question.format(c=country)), ChatMessage("assistant", self.table[country]))
        )

    def held_out(self, fact_index: int) -> int:
        """The phrasing reserved for validation for the fact at ``fact_index`` (rotating over phrasings)."""
        return fact_index % len(self.questions)

    def sample(self, rng: random.Random) -> Example:
        return self._example(rng.choice(list(self.table)), rng.choice(self.questions))

    def completion_distribution(self) -> dict[str, float]:
        return {capital: 1.0 / self.n_facts for capital in self.table.values()}

    def _draw_splits(self) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        """Validation: the first ``n_validation`` facts in their held-out phrasing; training: balanced rounds
        over the other (fact, phrasing) cells, each round in a seeded order, cut at ``n_train``."""
        rng = derive_rng(self.seed, "splits")
        countries = list(self.table)
        validation = [self._example(c, self.questions[self.held_out(i)]) for i, c in enumerate(countries)]
        kept = [(c, q) for i, c in enumerate(countries) for j, q in enumerate(self.questions) if j != self.held_out(i)]
        train: list[Example] = []
        while len(train) < self.n_train:
            round_ = kept[:]
            rng.shuffle(round_)
            train += [self._example(c, q) for c, q in round_]
        return tuple(train[: self.n_train]), tuple(validation[: self.n_validation])
