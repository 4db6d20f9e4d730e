"""The built-in task families: small problems whose answers must be *read from the prompt*.

Each family hides a secret (drawn from its seed) or an operation that the base model cannot know, uses
text unlike the CPython documentation the base model was pretrained on, and makes its completions
high-entropy for a predictor that ignores the prompt, so the prompt-blind floor sits far above what a
model that learned the content reaches. Letters and digits are written space-separated: byte-level BPE
then gives (almost always) one token per symbol (``" k"``), so position-wise operations are also token-wise
ones. Exceptions (the built-in vocabulary has no ``" 9"``) are harmless: the floor counts real tokens.

Measured on the built-in model (``bench/tasks_check.py``): the base model scores exact-match 0 on every
task, and 600 steps of full-layer rank-8 LoRA (about 2 CPU minutes each) reach exact-match 0.85-1.0 with a
loss at 0.28-0.53 of the prompt-blind floor.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cached_property

from layercard_service.data.jsonl import Example
from layercard_service.data.task_base import TaskFamily, derive_rng
from layercard_service.errors import InvalidArgument

__all__ = ["COMMON_LETTERS", "LEXICON_TEMPLATES", "LEXICON_VALUES", "CipherTask", "LexiconTask", "ReverseTask"]

# Letters by English frequency: the most common ones are the most likely to be single BPE tokens " x".
COMMON_LETTERS = "etaoinsrhldcumfpgwybvk"

# Meanings for the secret lexicon: plain, distinct English nouns (the answer vocabulary).
_LEXICON_WORDS = """
    apple river stone cloud horse bread chair glass tiger candle garden mirror rabbit silver ladder pepper
    forest island spider violin basket castle dragon feather hammer jacket kettle lemon monkey needle orange
    pillow rocket saddle turtle wagon anchor bottle carpet donkey engine finger guitar helmet insect jungle
    magnet napkin oyster parrot ribbon sailor tunnel valley walnut zebra banana cherry desert flower goat
    honey igloo jelly koala lizard meadow nest olive peach quilt robin shell tomato umbrella vase whale
    yacht acorn bridge cactus daisy eagle falcon grape harbor ivory juice kite lantern marble nut owl pearl
    quartz raven shovel thread unicorn velvet window yogurt bucket crayon drum elbow fossil glove hat jar
    kitten lamp mango noodle onion piano raft sock tulip wheel
"""
LEXICON_VALUES: tuple[str, ...] = tuple(_LEXICON_WORDS.split())

# Phrasings of the lexicon question. The key is always followed directly by the answer slot; the
# wording before it varies, so the model must find the key inside different contexts.
LEXICON_TEMPLATES: tuple[str, ...] = (
    "{k} means",
    "In the secret lexicon, {k} means",
    "The meaning of {k} is",
    "Q: what is a {k}? A: a",
    "translate {k} ->",
    "lexicon[{k}] =",
    "We say {k} for",
    "Decoded, {k} reads",
    "The word {k} stands for",
    "{k}, in plain words, is",
    "Entry {k}:",
    "Look up {k}:",
)

_SYLLABLE_ONSETS = "bdfgklmnprstvz"
_SYLLABLE_VOWELS = "aeiou"


def _letters(alphabet_size: int) -> str:
    if not 2 <= alphabet_size <= len(COMMON_LETTERS):
        raise InvalidArgument.field("alphabet_size", f"must be in [2, {len(COMMON_LETTERS)}], got {alphabet_size}")
    return COMMON_LETTERS[:alphabet_size]


def _spaced(symbols: str) -> str:
    return "".join(" " + s for s in symbols)  # " a b c": one " x" token per symbol


@dataclass(frozen=True)
class CipherTask(TaskFamily):
    """Secret substitution cipher on short letter strings.

    Content: a secret derangement of the alphabet (no letter maps to itself, so copying the input scores
    nothing), applied letter by letter. Every input string is equally likely and the cipher is a bijection,
    so completions are uniform over alphabet_size**length strings: the floor is about log(alphabet_size)
    per letter token and chance exact-match is alphabet_size**-length.
    """

    name = "cipher"
    description = "Encrypt letters with a secret substitution cipher: 'cipher: t s r s =' -> ' o i c i'."

    alphabet_size: int = 12
    length: int = 4

    @cached_property
    def alphabet(self) -> str:
        return _letters(self.alphabet_size)

    @cached_property
    def key(self) -> dict[str, str]:
        rng = derive_rng(self.seed, "cipher-key")
        letters = list(self.alphabet)
        while True:  # rejection sampling of a derangement: about e tries on average
            shuffled = letters[:]
            rng.shuffle(shuffled)
            if all(a != b for a, b in zip(letters, shuffled, strict=True)):
                return dict(zip(letters, shuffled, strict=True))

    def _example(self, plain: str) -> Example:
        secret = "".join(self.key[c] for c in plain)
        return Example(f"cipher:{_spaced(plain)} =", _spaced(secret))

    def sample(self, rng: random.Random) -> Example:
        return self._example("".join(rng.choice(self.alphabet) for _ in range(self.length)))

    def completion_distribution(self) -> dict[str, float]:
        p = 1.0 / self.alphabet_size**self.length
        return {self._example("".join(w)).completion: p for w in itertools.product(self.alphabet, repeat=self.length)}


@dataclass(frozen=True)
class ReverseTask(TaskFamily):
    """Reverse a sequence of digits.

    Content: an operation, not a secret: the i-th answer digit is the (length+1-i)-th prompt digit, so the
    model must learn to attend to a position that moves as the answer grows. Digits are uniform and
    independent, so completions are uniform over 10**length strings (chance exact-match 10**-length).
    """

    name = "reverse"
    description = "Reverse a sequence of digits: 'reverse: 3 1 4 5 =' -> ' 5 4 1 3'."

    length: int = 4
    digits: str = "0123456789"

    def _example(self, seq: str) -> Example:
        return Example(f"reverse:{_spaced(seq)} =", _spaced(seq[::-1]))

    def sample(self, rng: random.Random) -> Example:
        return self._example("".join(rng.choice(self.digits) for _ in range(self.length)))

    def completion_distribution(self) -> dict[str, float]:
        p = 1.0 / len(self.digits) ** self.length
        return {_spaced("".join(w)): p for w in itertools.product(self.digits, repeat=self.length)}


@dataclass(frozen=True)
class LexiconTask(TaskFamily):
    """A secret lexicon: made-up words mapped to English nouns, asked in many phrasings.

    Content: ``n_keys`` arbitrary facts (key -> noun) that exist nowhere else. Each key appears in
    ``len(templates)`` phrasings; for every key, ``held_out_per_key`` phrasings are reserved for validation
    (a different set of phrasings for each key, so every phrasing is also seen in training with other
    keys). Validation thus asks known facts in (key, phrasing) combinations never trained on. Keys are drawn
    uniformly and nouns are distinct, so completions are uniform over n_keys nouns: the floor is
    log(n_keys) over the noun's tokens plus EOS, and chance exact-match is 1/n_keys.
    """

    name = "lexicon"
    description = "Recall a secret lexicon of made-up words, asked in many phrasings: 'gilek means' -> ' raven'."

    n_keys: int = 50
    held_out_per_key: int = 4  # 50 keys x 4 held-out phrasings = the 200 validation cells
    templates: tuple[str, ...] = field(default=LEXICON_TEMPLATES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.n_keys <= len(LEXICON_VALUES):
            raise InvalidArgument.field("n_keys", f"must be in [2, {len(LEXICON_VALUES)}], got {self.n_keys}")
        if not 1 <= self.held_out_per_key < len(self.templates):
            raise InvalidArgument.field("held_out_per_key", "must leave at least one phrasing for training")

    @cached_property
    def table(self) -> dict[str, str]:
        """key -> noun. Keys are pronounceable nonsense (consonant-vowel syllables), distinct, seeded."""
        rng = derive_rng(self.seed, "lexicon-table")
        keys: list[str] = []
        while len(keys) < self.n_keys:
            n_syllables = rng.choice((2, 3))
            key = "".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) for _ in range(n_syllables))
            key += rng.choice(_SYLLABLE_ONSETS)
            if key not in keys and key not in LEXICON_VALUES:  # "tiger" may come out; it must not be a key
                keys.append(key)
        values = rng.sample(LEXICON_VALUES, self.n_keys)
        return dict(zip(keys, values, strict=True))

    def _example(self, key: str, template: str) -> Example:
        return Example(template.format(k=key), " " + self.table[key])

    def held_out(self, key_index: int) -> set[int]:
        """Template indices reserved for validation for the key at ``key_index`` (a rotating window)."""
        return {(key_index * self.held_out_per_key + j) % len(self.templates) for j in range(self.held_out_per_key)}

    def sample(self, rng: random.Random) -> Example:
        return self._example(rng.choice(list(self.table)), rng.choice(self.templates))

    def completion_distribution(self) -> dict[str, float]:
        return {" " + v: 1.0 / self.n_keys for v in self.table.values()}

    def _draw_splits(self) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        """Validation: ``n_validation`` (key, phrasing) cells from the held-out ones, keys balanced;
        training: ``n_train`` uniform draws from the remaining cells."""
        rng = derive_rng(self.seed, "splits")
        keys = list(self.table)
        held = [(k, t) for i, k in enumerate(keys) for t in sorted(self.held_out(i))]
        kept = [(k, t) for i, k in enumerate(keys) for t in range(len(self.templates)) if t not in self.held_out(i)]
        if self.n_validation > len(held):
            raise InvalidArgument.field("n_validation", f"at most {len(held)} held-out cells exist")
        # Keep validation balanced over keys: whole rounds of one held-out phrasing per key, in key order.
        by_round = sorted(range(len(held)), key=lambda j: (j % self.held_out_per_key, j))
        validation = [self._example(held[j][0], self.templates[held[j][1]]) for j in by_round[: self.n_validation]]
        train = [self._example(k, self.templates[t]) for k, t in (rng.choice(kept) for _ in range(self.n_train))]
        return tuple(train), tuple(validation)
