"""Built-in tasks: deterministic disjoint splits, the prompt-blind floor, exact-match, the registry."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import pytest
from support.bpe import small_bpe
from transformers import PreTrainedTokenizerFast

from layercard_service.data.task_base import exact_match, prompt_blind_floor
from layercard_service.data.task_facts import FactsTask
from layercard_service.data.task_families import CipherTask, LexiconTask, ReverseTask
from layercard_service.data.tasks import get_task, list_tasks, load_dataset
from layercard_service.errors import InvalidArgument, NotFound

# Small instances: their completion spaces are tiny, so brute force and Monte Carlo are cheap.
SMALL = [
    CipherTask(alphabet_size=4, length=2, n_train=40, n_validation=6),
    ReverseTask(length=2, digits="0123", n_train=30, n_validation=5),
    LexiconTask(n_keys=6, held_out_per_key=1, n_train=50, n_validation=6),
    FactsTask(n_facts=6, n_train=40, n_validation=6),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE that knows some " x" pieces and not others, so completions differ in token count."""
    return small_bpe([" e t a o 0 1 apple river stone", " cloud horse bread chair"] * 30, vocab_size=300)


def test_registry_has_at_least_three_tasks() -> None:
    names = [t.task_name for t in list_tasks()]
    assert len(names) >= 3 and names == sorted(names)
    assert all(n.startswith("builtin:") for n in names)
    assert all(t.description for t in list_tasks())
    assert get_task("builtin:cipher") is get_task("cipher")


def test_unknown_task_is_not_found() -> None:
    with pytest.raises(NotFound, match="known tasks: builtin:"):
        get_task("builtin:nope")
    with pytest.raises(NotFound):
        load_dataset("builtin:nope")


def test_load_dataset_builtin_and_jsonl(tmp_path) -> None:
    ds = load_dataset("builtin:reverse")
    assert ds.task is get_task("reverse") and len(ds.train) == 2000 and len(ds.validation) == 200
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi"}\n')
    assert load_dataset(f"file:{path}").train[0].completion == "hi"
    with pytest.raises(InvalidArgument):
        load_dataset("  ")


@pytest.mark.parametrize("task", list_tasks(), ids=lambda t: t.name)
def test_default_splits_are_deterministic_disjoint_and_in_support(task) -> None:
    fresh = type(task)()  # a new instance recomputes the splits from the seed
    assert fresh.splits == task.splits
    assert len(task.train) == task.n_train and len(task.validation) == task.n_validation
    val_prompts = {e.prompt for e in task.validation}
    assert len(val_prompts) == len(task.validation)
    assert not val_prompts & {e.prompt for e in task.train}
    support = task.completion_distribution()
    assert math.isclose(sum(support.values()), 1.0)
    assert all(e.completion in support for e in (*task.train, *task.validation))
    assert type(task)(seed=1).splits != task.splits


def test_cipher_key_is_a_derangement_and_seeded() -> None:
    task = CipherTask()
    assert sorted(task.key) == sorted(task.key.values()) == sorted(task.alphabet)
    assert all(a != b for a, b in task.key.items())
    assert CipherTask(seed=3).key != task.key


def test_lexicon_validation_asks_known_keys_in_unseen_phrasings() -> None:
    task = get_task("lexicon")
    assert isinstance(task, LexiconTask)
    train_keys = {e.completion for e in task.train}
    assert {e.completion for e in task.validation} <= train_keys
    assert set(task.table).isdisjoint(task.table.values())  # no key is also a meaning
    counts = Counter(e.completion for e in task.validation)
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced over keys


def test_facts_is_a_chat_table_asked_in_held_out_phrasings() -> None:
    task = get_task("builtin:facts")
    assert isinstance(task, FactsTask) and len(task.table) == task.n_facts == len(task.validation)
    assert len(set(task.table.values())) == task.n_facts  # distinct answers: the floor's uniform law
    assert set(task.table).isdisjoint(task.table.values())
    for example in (*task.train, *task.validation):
        assert example.is_chat and [m.role for m in example.messages] == ["user", "assistant"]
        assert example.completion == example.messages[-1].content and " " not in example.completion  # one word
    # Validation asks every fact once, each in a phrasing that training never used for that fact (but used for
    # others), so it measures the memorized table rather than one memorized string.
    asked: dict[str, set[str]] = defaultdict(set)
    for example in task.train:
        asked[example.completion].add(example.prompt)
    for i, (country, capital) in enumerate(task.table.items()):
        held_out = task.questions[task.held_out(i)]
        assert task.validation[i].prompt == held_out.format(c=country) and task.validation[i].completion == capital
        assert asked[capital] == {q.format(c=country) for q in task.questions if q != held_out}
    assert {task.held_out(i) for i in range(task.n_facts)} == set(range(len(task.questions)))
    counts = Counter(e.completion for e in task.train)
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced rounds over the kept cells
    assert FactsTask(seed=1).table != task.table and FactsTask().table == task.table


def test_facts_exact_match_is_on_the_answer_word() -> None:
    example = get_task("builtin:facts").validation[0]
    assert exact_match(f" {example.completion}\n", example.completion)
    assert not exact_match(f"The capital is {example.completion}.", example.completion)


def _floor_by_token_tree(distribution: dict[str, float], tokenizer) -> float:
    """Brute force: the loss of the optimal prompt-blind *token* predictor, built from a prefix tree.

    For every token prefix, P(next | prefix) is the distribution's mass below that branch; the expected
    per-example loss is the sum over tokens of -log P(next | prefix), averaged over completions.
    """
    eos = tokenizer.eos_token_id
    seqs = {c: [*tokenizer(c, add_special_tokens=False)["input_ids"], eos] for c in distribution}
    mass: dict[tuple[int, ...], float] = defaultdict(float)
    for c, seq in seqs.items():
        for i in range(len(seq) + 1):
            mass[tuple(seq[:i])] += distribution[c]
    loss = tokens = 0.0
    for c, seq in seqs.items():
        p = distribution[c]
        for i in range(len(seq)):
            loss -= p * math.log(mass[tuple(seq[: i + 1])] / mass[tuple(seq[:i])])
        tokens += p * len(seq)
    return loss / tokens


@pytest.mark.parametrize("task", SMALL, ids=lambda t: t.name)
def test_floor_matches_brute_force_and_monte_carlo(task, tokenizer) -> None:
    stats = task.floor(tokenizer)
    dist = task.completion_distribution()
    assert stats.floor_nats_per_token == pytest.approx(_floor_by_token_tree(dist, tokenizer), rel=1e-9)
    assert stats.chance_exact_match == pytest.approx(max(dist.values()))

    # Monte Carlo over the generator itself: does completion_distribution describe what sample() draws?
    rng = random.Random(0)
    draws = [task.sample(rng).completion for _ in range(20_000)]
    counts = Counter(draws)
    assert set(counts) <= set(dist)
    n_tokens = {c: len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in counts}
    entropy = -sum(k / len(draws) * math.log(k / len(draws)) for k in counts.values())
    mean_tokens = sum(n_tokens[c] for c in draws) / len(draws)
    assert entropy / mean_tokens == pytest.approx(stats.floor_nats_per_token, rel=0.02)


def test_floor_uses_real_token_counts(tokenizer) -> None:
    dist = {" e": 0.5, " zq": 0.5}  # " e" is one learned token, " zq" is not
    stats = prompt_blind_floor(dist, tokenizer)
    n_e = len(tokenizer(" e", add_special_tokens=False)["input_ids"]) + 1
    n_zq = len(tokenizer(" zq", add_special_tokens=False)["input_ids"]) + 1
    assert n_e < n_zq
    assert stats.mean_completion_tokens == pytest.approx((n_e + n_zq) / 2)
    assert stats.floor_nats_per_token == pytest.approx(math.log(2) / stats.mean_completion_tokens)
    with pytest.raises(InvalidArgument):
        prompt_blind_floor({"a": 0.5}, tokenizer)


def test_default_task_reference_figures(tokenizer) -> None:
    # Uniform completions: entropy is log(support) and chance exact-match is 1/support.
    for task in list_tasks():
        stats = task.floor(tokenizer)
        assert stats.entropy_nats == pytest.approx(math.log(stats.support))
        assert stats.chance_exact_match == pytest.approx(1 / stats.support)
        assert stats.floor_nats_per_token > 0.5  # far above what a model that learned the content reaches


def test_exact_match_strips_whitespace_only() -> None:
    assert exact_match(" o n h", "o n h")
    assert exact_match("o n h\n", " o n h ")
    assert not exact_match(" o n", " o n h")
    assert not exact_match(" O n h", " o n h")
    assert not exact_match("onh", " o n h")


def test_task_parameters_are_validated() -> None:
    with pytest.raises(InvalidArgument):
        CipherTask(n_train=0)
    with pytest.raises(InvalidArgument):
        LexiconTask(n_keys=1)
    with pytest.raises(InvalidArgument):
        _ = CipherTask(alphabet_size=99).alphabet
    with pytest.raises(InvalidArgument):
        FactsTask(n_facts=4, n_validation=5)
    with pytest.raises(InvalidArgument):
        FactsTask(questions=("What is the capital of {c}?",))
