"""The registry of built-in tasks (``builtin:<name>``) and the one entry point that resolves a dataset source.

A dataset source is either ``builtin:<name>`` (a generated task with fixed splits, a prompt-blind floor and
an exact-match metric) or a path to a JSONL file (``file:`` prefix optional; see ``data/jsonl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from layercard_service.data.jsonl import Example, JsonlLimits, load_jsonl
from layercard_service.data.task_base import FloorStats, TaskFamily, exact_match, prompt_blind_floor
from layercard_service.data.task_facts import FactsTask
from layercard_service.data.task_families import CipherTask, LexiconTask, ReverseTask
from layercard_service.errors import InvalidArgument, NotFound

__all__ = [
    "BUILTIN_PREFIX",
    "Dataset",
    "FloorStats",
    "TaskFamily",
    "exact_match",
    "get_task",
    "list_tasks",
    "load_dataset",
    "prompt_blind_floor",
]

BUILTIN_PREFIX = "builtin:"

# The default instance of each family (seed 0; 2000 training and 200 validation examples, except the chat
# task builtin:facts, a table of 24 facts). Instances are immutable and their splits are cached on first use,
# so the registry hands out the same objects.
_REGISTRY: dict[str, TaskFamily] = {
    task.name: task for task in (CipherTask(), FactsTask(), LexiconTask(), ReverseTask())
}


def list_tasks() -> list[TaskFamily]:
    """Every built-in task, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_task(name: str) -> TaskFamily:
    """A built-in task by ``name`` or ``builtin:name``; NotFound names the known ones."""
    short = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    try:
        return _REGISTRY[short]
    except KeyError:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(_REGISTRY))
        raise NotFound(
            f"unknown built-in task {name!r}; known tasks: {known}", reason="TASK_NOT_FOUND", metadata={"task": name}
        ) from None


@dataclass(frozen=True)
class Dataset:
    """Examples ready for training: ``task`` is set for built-in tasks (floor, metric, description)."""

    source: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    task: TaskFamily | None = None


def load_dataset(source: str, *, limits: JsonlLimits | None = None) -> Dataset:
    """Resolve ``builtin:<name>`` or a JSONL path. A JSONL file gives only a training split."""
    if not isinstance(source, str) or not source.strip():
        raise InvalidArgument.field("dataset.source", "must be 'builtin:<name>' or a path to a JSONL file")
    if source.startswith(BUILTIN_PREFIX):
        task = get_task(source)
        return Dataset(source=task.task_name, train=task.train, validation=task.validation, task=task)
    path = source[len("file:") :] if source.startswith("file:") else source
    return Dataset(source=source, train=tuple(load_jsonl(path, limits)), validation=())
