"""Where models and datasets may come from: built-ins, inline bytes, or paths under configured roots.

A path outside every root is PERMISSION_DENIED (the service must not read arbitrary files on its host);
symlinks are resolved before the check, so a link inside a root cannot point outside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercard_service.data.jsonl import Example, parse_jsonl
from layercard_service.data.tasks import get_task, load_dataset
from layercard_service.errors import InvalidArgument, NotFound, PermissionDenied
from layercard_service.models.builtin import builtin_model_path, is_builtin

__all__ = ["DatasetRequest", "ResolvedDataset", "resolve_model_path", "resolve_dataset", "under_roots"]


def under_roots(raw: str, roots: Sequence[Path], what: str, field: str) -> Path:
    if not roots:
        raise PermissionDenied(
            f"{field}: {what} paths are disabled on this server (no {what} roots configured)",
            reason=f"NO_{what.upper()}_ROOTS",
            metadata={"field": field},
        )
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidArgument.field(field, f"must be an absolute path or a built-in name, got {raw!r}")
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    raise PermissionDenied(
        f"{field}: {raw!r} is outside the server's {what} roots",
        reason="PATH_OUTSIDE_ROOTS",
        metadata={"field": field, "path": raw},
    )


def resolve_model_path(model: str, roots: Sequence[Path]) -> Path:
    """``builtin:tiny`` or an absolute directory under a model root, with a config.json in it."""
    if not model:
        raise InvalidArgument.field("model", "is required: 'builtin:tiny' or a model directory")
    if is_builtin(model):
        return builtin_model_path(model)
    path = under_roots(model, roots, "model", "model")
    if not (path / "config.json").is_file():
        raise NotFound(
            f"model {model!r} not found: no config.json in {path}", reason="MODEL_NOT_FOUND", metadata={"model": model}
        )
    return path


@dataclass(frozen=True)
class DatasetRequest:
    """The contract's DatasetSource as the core sees it: exactly one of the three sources."""

    builtin: str = ""
    inline_jsonl: bytes | None = None  # None: not given; b"": given and empty (an error)
    path: str = ""
    split: str = ""
    # A stored job's inline dataset: its bytes live in the artifact store under this hash (tune/datasets.py),
    # and inline_jsonl is None until the worker reads them back.
    inline_sha256: str = ""
    inline_size_bytes: int = 0


@dataclass(frozen=True)
class ResolvedDataset:
    examples: tuple[Example, ...]
    validation: tuple[Example, ...]
    fingerprint: str  # sha256 of the content, so a card changes when the data does
    description: str


def _content_hash(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.prompt.encode())
        digest.update(b"\x00")
        digest.update(ex.completion.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def resolve_dataset(request: DatasetRequest, roots: Sequence[Path], field: str = "dataset") -> ResolvedDataset:
    if request.split not in ("", "train", "validation"):
        raise InvalidArgument.field(f"{field}.split", f"must be 'train' or 'validation', got {request.split!r}")
    if request.builtin:
        name = request.builtin if request.builtin.startswith("builtin:") else f"builtin:{request.builtin}"
        task = get_task(name)
        train, validation = task.train, task.validation
        examples = validation if request.split == "validation" else train
        return ResolvedDataset(examples, validation, _content_hash(examples), name)
    if request.inline_jsonl is not None:
        examples = tuple(parse_jsonl(request.inline_jsonl))
        return ResolvedDataset(examples, (), _content_hash(examples), "inline JSONL")
    if request.path:
        path = under_roots(request.path, roots, "dataset", f"{field}.path")
        if not path.is_file():
            raise NotFound(
                f"{field}.path: no file at {request.path!r}",
                reason="DATASET_NOT_FOUND",
                metadata={"path": request.path},
            )
        examples = load_dataset(str(path)).train
        return ResolvedDataset(examples, (), _content_hash(examples), str(path))
    raise InvalidArgument.field(field, "is required: set builtin, inline_jsonl or path")
