"""Where models and datasets may come from: built-ins, inline bytes, or paths under configured roots.

A path outside every root is PERMISSION_DENIED (the service must not read arbitrary files on its host). Symlinks
are resolved before the check, so a link inside a root cannot point outside it: the dataset file itself, and
every entry of a model directory (config.json, weights, tokenizer files: transformers opens them by name, so the
whole directory is checked before anything in it is read). A path the file system cannot take (a NUL byte, a
name over the length limit) is the caller's INVALID_ARGUMENT. Errors name paths, never a file's content.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layercard_service.data.jsonl import Example, parse_jsonl
from layercard_service.data.tasks import get_task, load_dataset
from layercard_service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from layercard_service.models.builtin import builtin_model_path, is_builtin

__all__ = [
    "DatasetRequest",
    "ResolvedDataset",
    "check_tree_within_roots",
    "check_within_roots",
    "read_json_file",
    "resolve_dataset",
    "resolve_model_path",
    "under_roots",
]

NAME_MAX = 255  # bytes in one path component (Linux file systems); longer is ENAMETOOLONG
PATH_MAX = 4095  # bytes in a whole path
MAX_MODEL_ENTRIES = 100_000  # entries of a model directory checked before it is read


def _check_path_text(raw: str, field: str) -> None:
    """What no file system accepts is the caller's error, not an OSError or ValueError deep in pathlib."""
    if "\x00" in raw:
        raise InvalidArgument.field(field, "must not contain a NUL byte")
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX:
        raise InvalidArgument.field(field, f"is {len(encoded)} bytes long, over the limit of {PATH_MAX}")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise InvalidArgument.field(
            field, f"has a path component of {longest} bytes, over the file system's limit of {NAME_MAX}"
        )


def _os_error(exc: OSError, field: str, path: Path) -> InvalidArgument | FailedPrecondition:
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR):
        return InvalidArgument.field(field, f"{path} cannot be opened: {os.strerror(exc.errno)}")
    return FailedPrecondition(
        f"{field}: {path} cannot be read: {exc.strerror or type(exc).__name__}",
        reason="PATH_UNREADABLE",
        metadata={"field": field, "path": str(path)},
    )


def _resolved(path: Path, field: str) -> Path:
    try:
        return path.resolve()
    except OSError as exc:
        raise _os_error(exc, field, path) from exc
    except ValueError as exc:  # an embedded NUL that slipped past the text check
        raise InvalidArgument.field(field, f"is not a usable path: {exc}") from exc


def _outside(path: Path, resolved: Path, what: str, field: str) -> PermissionDenied:
    shown = str(path) if path == resolved else f"{path} (resolves to {resolved})"
    return PermissionDenied(
        f"{field}: {shown} is outside the server's {what} roots",
        reason="PATH_OUTSIDE_ROOTS",
        metadata={"field": field, "path": str(path), "resolved_path": str(resolved)},
    )


def check_within_roots(path: Path, roots: Sequence[Path], field: str, what: str = "model") -> Path:
    """``path`` with every symlink resolved; PERMISSION_DENIED (PATH_OUTSIDE_ROOTS) when that is under no root."""
    resolved = _resolved(path, field)
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    raise _outside(path, resolved, what, field)


def check_tree_within_roots(directory: Path, roots: Sequence[Path], field: str, what: str = "model") -> None:
    """Every symlink under ``directory`` (files and folders, at any depth) must resolve under a root, and every
    entry must be a file or a folder: a FIFO or device would block or feed whatever opens it."""
    seen = 0
    try:
        for top, dirs, files in os.walk(directory, followlinks=False, onerror=_raise):
            for name in (*dirs, *files):
                seen += 1
                if seen > MAX_MODEL_ENTRIES:
                    raise InvalidArgument.field(field, f"{directory} has more than {MAX_MODEL_ENTRIES} entries")
                entry = Path(top) / name
                if entry.is_symlink():
                    check_within_roots(entry, roots, field, what)
                elif not (entry.is_file() or entry.is_dir()):
                    raise InvalidArgument.field(field, f"{entry} is not a regular file or folder")
    except OSError as exc:
        raise _os_error(exc, field, directory) from exc


def _raise(exc: OSError) -> None:
    raise exc


def read_json_file(path: Path, field: str) -> Any:
    """A small JSON file (a model's config.json); errors say where it is broken, never what it holds."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise _os_error(exc, field, path) from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument.field(field, f"{path.name} is not UTF-8 text (byte {exc.start + 1})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # exc.msg is the parser's complaint; str(exc) could quote the text
        raise InvalidArgument.field(field, f"{path.name} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise InvalidArgument.field(field, f"{path.name} is nested too deeply") from exc


def under_roots(raw: str, roots: Sequence[Path], what: str, field: str) -> Path:
    if not roots:
        raise PermissionDenied(
            f"{field}: {what} paths are disabled on this server (no {what} roots configured)",
            reason=f"NO_{what.upper()}_ROOTS",
            metadata={"field": field},
        )
    _check_path_text(raw, field)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidArgument.field(field, f"must be an absolute path or a built-in name, got {raw!r}")
    return check_within_roots(path, roots, field, what)


def resolve_model_path(model: str, roots: Sequence[Path]) -> Path:
    """``builtin:tiny`` or an absolute directory under a model root, with a config.json in it and no symlink out.

    The built-in model's directory is the package's own, so it is trusted as is."""
    if not model:
        raise InvalidArgument.field("model", "is required: 'builtin:tiny' or a model directory")
    if is_builtin(model):
        return builtin_model_path(model)
    path = under_roots(model, roots, "model", "model")
    try:
        found = (path / "config.json").is_file()
    except OSError as exc:
        raise _os_error(exc, "model", path) from exc
    if not found:
        raise NotFound(
            f"model {model!r} not found: no config.json in {path}", reason="MODEL_NOT_FOUND", metadata={"model": model}
        )
    check_tree_within_roots(path, roots, "model")
    return path


@dataclass(frozen=True)
class DatasetRequest:
    """The contract's DatasetSource as the core sees it: exactly one of the three sources."""

    builtin: str = ""
    inline_jsonl: bytes | None = None  # None: not given; b"": given and empty (an error)
    path: str = ""
    split: str = ""
    # A stored job's inline dataset: its bytes live in the artifact store under this hash (persistence/datasets.py),
    # and inline_jsonl is None until the worker reads them back.
    inline_sha256: str = ""
    inline_size_bytes: int = 0


@dataclass(frozen=True)
class ResolvedDataset:
    examples: tuple[Example, ...]
    validation: tuple[Example, ...]
    fingerprint: str  # sha256 of the content, so a card changes when the data does
    description: str
    # Which source the request named and how, for records such as a card's dataset: kind is "builtin", "inline"
    # or "path"; source the task's name, the path as given, or the SHA-256 of the inline bytes.
    kind: str = ""
    source: str = ""
    split: str = ""  # of a built-in task: "train" or "validation"
    size_bytes: int = 0  # of inline bytes


def _content_hash(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        if ex.messages is not None:  # a chat is its messages (its prompt is only the final question)
            digest.update(b"\x02" + json.dumps([m.as_dict() for m in ex.messages]).encode() + b"\x01")
            continue
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
        split = request.split or "train"
        examples = validation if split == "validation" else train
        return ResolvedDataset(examples, validation, _content_hash(examples), name, "builtin", name, split)
    if request.inline_jsonl is not None:
        examples = tuple(parse_jsonl(request.inline_jsonl))
        # A stored job's request carries the hash already; a card's request has only the bytes (in memory, small).
        sha256 = request.inline_sha256 or hashlib.sha256(request.inline_jsonl).hexdigest()
        return ResolvedDataset(
            examples, (), _content_hash(examples), "inline JSONL", "inline", sha256, "", len(request.inline_jsonl)
        )
    if request.path:
        path = under_roots(request.path, roots, "dataset", f"{field}.path")
        try:
            found = path.is_file()  # a FIFO or device is not a file: never opened
        except OSError as exc:
            raise _os_error(exc, f"{field}.path", path) from exc
        if not found:
            raise NotFound(
                f"{field}.path: no file at {request.path!r}",
                reason="DATASET_NOT_FOUND",
                metadata={"path": request.path},
            )
        examples = load_dataset(str(path)).train
        return ResolvedDataset(examples, (), _content_hash(examples), str(path), "path", request.path)
    raise InvalidArgument.field(field, "is required: set builtin, inline_jsonl or path")
