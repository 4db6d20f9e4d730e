"""Chat requests: a conversation's rules, and the chat template the fleet renders it with.

A chat goes to vLLM's ``/v1/chat/completions``, which renders the messages with the base model's own chat
template. A base model without one (``builtin:tiny``) would be refused there; the service then sends the same
fallback template that training rendered the model's chat data with (``data/chat.py``), so an adapter is
served in the format it was trained in. The vLLM servers must be started with ``--trust-request-chat-template``
for that (``VllmServerSettings`` does it); an instruct model's own template needs no flag.

The service knows the base model by its setting (``--vllm-model``), not from vLLM (which does not report it).
When that model's directory is not on the service's host (vLLM in other pods), no template is sent and vLLM
uses the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layercard_service.data.chat import FALLBACK_CHAT_TEMPLATE, model_chat_template
from layercard_service.errors import InvalidArgument, LayercardError
from layercard_service.models.builtin import builtin_model_path, builtin_name, is_builtin

__all__ = ["MAX_CHAT_CHARS", "MAX_MESSAGES", "ROLES", "BaseModelChatTemplate", "Chat", "ChatMessage", "check_chat"]

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
MAX_CHAT_CHARS = 1_000_000  # all contents together: the same bound as a prompt


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Chat:
    """A conversation for vLLM's chat completions; ``template`` is sent as its ``chat_template`` unless None."""

    messages: tuple[ChatMessage, ...]
    template: str | None = None


def check_chat(messages: Sequence[ChatMessage]) -> None:
    """Raises INVALID_ARGUMENT naming the first bad field (``messages[2].role``) of a conversation.

    The last message must be the user's: the request asks for the assistant's next turn (vLLM's generation
    prompt), and a conversation ending in an assistant turn would be rendered as finished. Roles need not
    alternate (the fallback format takes any order); a model's own template may refuse an order, and vLLM's
    refusal is INVALID_ARGUMENT too."""
    if not messages:
        raise InvalidArgument.field("messages", "must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument.field("messages", f"must be at most {MAX_MESSAGES} messages, got {len(messages)}")
    total = 0
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument.field(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {message.role[:40]!r}"
            )
        if message.role == "system" and i > 0 and messages[i - 1].role != "system":
            raise InvalidArgument.field(f"messages[{i}].role", "system messages come before every other message")
        if not message.content:
            raise InvalidArgument.field(f"messages[{i}].content", "must not be empty")
        total += len(message.content)
        if total > MAX_CHAT_CHARS:
            raise InvalidArgument.field("messages", f"must hold at most {MAX_CHAT_CHARS} characters of content")
    if messages[-1].role != "user":
        raise InvalidArgument.field(
            f"messages[{len(messages) - 1}].role", "the last message must be the user's (the answer is the assistant's)"
        )


class BaseModelChatTemplate:
    """The ``chat_template`` a chat request carries for the fleet's base model: None when the model has its own.

    Looked up on use, not at start: a built-in may be materialized after the service starts. A model that was
    found is remembered; one that is not on this host is looked up again next time (a stat, no reading)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._found: tuple[str | None] | None = None

    def _directory(self) -> Path | None:
        if is_builtin(self.model):
            try:
                return builtin_model_path(builtin_name(self.model))
            except LayercardError:  # an unknown or not yet materialized built-in: vLLM's host may have it
                return None
        path = Path(self.model)
        return path if path.is_absolute() and (path / "config.json").is_file() else None

    def __call__(self) -> str | None:
        if self._found is None:
            directory = self._directory()
            if directory is None:
                return None
            own = model_chat_template(directory)
            self._found = (None if own is not None else FALLBACK_CHAT_TEMPLATE,)
        return self._found[0]
