"""JSONL datasets: parse a file of JSON objects, one per line, into examples.

Three line shapes are accepted, and one file must use one shape throughout (a mix almost always means two
datasets were concatenated by mistake, and the loss masking would silently differ between them):

- ``{"prompt": str, "completion": str}``: loss on the completion only.
- ``{"text": str}``: plain text; the whole text is the completion (empty prompt), so every token is trained.
- ``{"messages": [{"role": ..., "content": str}, ...]}``: a chat; the final message must be the assistant's.
  The messages are kept as they are (``Example.messages``) and rendered only when encoded, with the model's
  own chat template (``data/encode.py``), so one file suits any model. Loss is on every assistant turn.

Other keys on a line are ignored (datasets often carry ids or metadata). Every problem is an
:class:`~layercard_service.errors.InvalidArgument` whose message and field violations name the line and the
field (``line 3: field 'completion' must be a string``), so a user can fix the file without guessing. Up to
``JsonlLimits.max_reported_errors`` problems are collected before giving up, so one upload shows many of them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from layercard_service.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound

__all__ = [
    "CHAT_ROLES",
    "ChatMessage",
    "Example",
    "JsonlLimits",
    "load_jsonl",
    "parse_jsonl",
]

CHAT_ROLES = ("system", "user", "assistant")

# Shape name -> the keys that identify it. A line is classified by which of these keys it holds.
_SHAPES: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "messages": ("messages",),
}
_SHAPE_KEYS = {key: shape for shape, keys in _SHAPES.items() for key in keys}


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat; immutable, so an Example stays hashable."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """The form chat templates (and vLLM's chat completions) take."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Example:
    """One training or validation record.

    Without ``messages``, loss is taken on ``completion`` tokens only and the prompt is plain text. With
    ``messages`` (a chat), the messages are what gets encoded, in the model's chat template; ``completion`` is
    the final assistant content (the reference of exact match) and ``prompt`` the final user message's content
    (for display and de-duplication; '' when there is none). Build chats with :meth:`chat`.
    """

    prompt: str
    completion: str
    messages: tuple[ChatMessage, ...] | None = None

    @classmethod
    def chat(cls, messages: Iterable[ChatMessage | Mapping[str, str]]) -> Example:
        """A chat example; the final message must be the assistant's (the answer)."""
        turns = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages)
        if not turns or turns[-1].role != "assistant":
            raise InvalidArgument.field("messages", "a chat must end with an assistant message")
        question = next((m.content for m in reversed(turns[:-1]) if m.role == "user"), "")
        return cls(question, turns[-1].content, turns)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class JsonlLimits:
    """Bounds that keep one bad upload from exhausting memory; validated at construction."""

    max_line_bytes: int = 1 << 20  # 1 MiB of JSON per example, line terminator excluded
    max_examples: int = 1_000_000
    max_reported_errors: int = 10

    def __post_init__(self) -> None:
        for name in ("max_line_bytes", "max_examples", "max_reported_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument.field(f"limits.{name}", f"must be a positive integer, got {value!r}")


class _Problems:
    """Collects field violations; the first one becomes the error message."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.violations: list[FieldViolation] = []
        self.first_message = ""

    def add(self, where: str, description: str, field: str | None = None) -> None:
        """A problem on line ``where`` ("line 3"), optionally in ``field`` ("messages[1].role")."""
        if not self.violations:
            self.first_message = f"{where}: {description}"
        self.violations.append(FieldViolation(f"{where}: {field}" if field else where, description))
        if len(self.violations) >= self.limit:
            self.raise_()

    def raise_(self) -> None:
        message = self.first_message
        if len(self.violations) > 1:
            message += f" (and {len(self.violations) - 1} more problem(s))"
        raise InvalidArgument(message, reason="INVALID_DATASET", violations=self.violations)


def _fatal(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {description}", reason="INVALID_DATASET", violations=[FieldViolation(field, description)]
    )


def _lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without terminator); over-long lines fail without being read whole."""
    number = 0
    while True:
        # +2 leaves room for "\r\n", so a line of exactly max_line_bytes plus its terminator is accepted.
        raw = stream.readline(max_line_bytes + 2)
        if not raw:
            return
        number += 1
        line = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
        if len(line) > max_line_bytes:
            raise _fatal(f"line {number}", f"is longer than the limit of {max_line_bytes} bytes")
        yield number, line


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _string_field(
    obj: dict, key: str, where: str, problems: _Problems, *, allow_empty: bool, prefix: str = ""
) -> str | None:
    """obj[key] as a string, or None after recording why not; ``prefix`` locates obj ("messages[1].")."""
    path = prefix + key
    if key not in obj:
        problems.add(where, f"field '{path}' is missing", path)
        return None
    value = obj[key]
    if not isinstance(value, str):
        problems.add(where, f"field '{path}' must be a string, got {_type_name(value)}", path)
        return None
    if not allow_empty and not value:
        problems.add(where, f"field '{path}' must not be empty", path)
        return None
    return value


def _parse_messages(obj: dict, where: str, problems: _Problems) -> Example | None:
    messages = obj["messages"]
    if not isinstance(messages, list):
        problems.add(where, f"field 'messages' must be an array, got {_type_name(messages)}", "messages")
        return None
    if not messages:
        problems.add(where, "field 'messages' must not be empty", "messages")
        return None
    ok = True
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.add(where, f"field '{path}' must be an object, got {_type_name(message)}", path)
            ok = False
            continue
        role = _string_field(message, "role", where, problems, allow_empty=False, prefix=f"{path}.")
        if role is not None and role not in CHAT_ROLES:
            problems.add(where, f"field '{path}.role' must be one of {list(CHAT_ROLES)}, got {role!r}", f"{path}.role")
            ok = False
        content = _string_field(message, "content", where, problems, allow_empty=True, prefix=f"{path}.")
        ok = ok and role is not None and content is not None
    if not ok:
        return None
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        problems.add(where, "the final message must have role 'assistant'", f"messages[{last}].role")
        return None
    if not messages[last]["content"]:
        problems.add(where, "the final assistant message must not be empty", f"messages[{last}].content")
        return None
    return Example.chat(messages)


def _parse_object(obj: dict, shape: str, where: str, problems: _Problems) -> Example | None:
    if shape == "prompt_completion":
        prompt = _string_field(obj, "prompt", where, problems, allow_empty=True)
        completion = _string_field(obj, "completion", where, problems, allow_empty=False)
        return None if prompt is None or completion is None else Example(prompt, completion)
    if shape == "text":
        text = _string_field(obj, "text", where, problems, allow_empty=False)
        return None if text is None else Example("", text)
    return _parse_messages(obj, where, problems)


def _read(stream: BinaryIO, limits: JsonlLimits) -> list[Example]:
    problems = _Problems(limits.max_reported_errors)
    examples: list[Example] = []
    file_shape: tuple[str, int] | None = None  # (shape, line it was first seen on)
    saw_any_line = False
    for number, raw in _lines(stream, limits.max_line_bytes):
        saw_any_line = True
        where = f"line {number}"
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write it
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(where, f"is not valid UTF-8 (byte {exc.start + 1})")
            continue
        if not text.strip():
            continue  # blank lines are tolerated (a trailing newline, editor artefacts)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(where, f"is not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:  # arrays or objects nested thousands deep: no example looks like that
            problems.add(where, "is nested too deeply to parse")
            continue
        if not isinstance(obj, dict):
            problems.add(where, f"must be a JSON object, got {_type_name(obj)}")
            continue
        shapes = sorted({_SHAPE_KEYS[k] for k in obj if k in _SHAPE_KEYS})
        if not shapes:
            problems.add(
                where, f"must have 'prompt' and 'completion', or 'text', or 'messages'; found keys {sorted(obj)[:8]}"
            )
            continue
        if len(shapes) > 1:
            found = sorted(k for k in obj if k in _SHAPE_KEYS)
            problems.add(where, f"mixes the fields of several shapes: {found}")
            continue
        shape = shapes[0]
        if file_shape is None:
            file_shape = (shape, number)
        elif shape != file_shape[0]:
            problems.add(
                where,
                f"has shape '{shape}' but line {file_shape[1]} has shape '{file_shape[0]}'; a file must use one shape",
            )
            continue
        example = _parse_object(obj, shape, where, problems)
        if example is not None:
            if len(examples) >= limits.max_examples:
                raise _fatal("dataset", f"has more than the limit of {limits.max_examples} examples")
            examples.append(example)
    if problems.violations:
        problems.raise_()
    if not saw_any_line:
        raise _fatal("dataset", "is empty")
    if not examples:
        raise _fatal("dataset", "has no examples (only blank lines)")
    return examples


def parse_jsonl(data: bytes | str, limits: JsonlLimits | None = None) -> list[Example]:
    """Examples from JSONL content held in memory (an upload); see the module docstring for the shapes."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray)):
        raise _fatal("dataset", f"must be bytes or str, got {type(data).__name__}")
    return _read(io.BytesIO(data), limits or JsonlLimits())


def load_jsonl(path: str | os.PathLike[str], limits: JsonlLimits | None = None) -> list[Example]:
    """Examples from a JSONL file, streamed line by line so an over-long line is never read whole."""
    try:
        with open(path, "rb") as stream:
            return _read(stream, limits or JsonlLimits())
    except FileNotFoundError as exc:
        raise NotFound(f"dataset file {os.fspath(path)!r} does not exist", reason="DATASET_NOT_FOUND") from exc
    except IsADirectoryError as exc:
        raise _fatal("dataset.path", f"{os.fspath(path)!r} is a directory, not a JSONL file") from exc
    except OSError as exc:  # unreadable (permissions, I/O): the server's state, not the request's shape
        raise FailedPrecondition(
            f"dataset file {os.fspath(path)!r} cannot be read: {exc.strerror or type(exc).__name__}",
            reason="DATASET_UNREADABLE",
        ) from exc
