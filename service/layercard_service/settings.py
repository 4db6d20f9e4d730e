"""What every settings dataclass is made of: ``ConfigError`` and ``setting``, a field with its help text.

A neutral module, so config.py (the service's settings) and the settings a part of the service owns (the
Kubernetes runner's, runners/kubernetes/settings.py) both build on it without importing each other. The help text lives
on the field, the one place ``layercard-server --help`` and the docs read it from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any

__all__ = ["ConfigError", "setting", "setting_help", "setting_parser"]


class ConfigError(ValueError):
    """A setting is malformed; the server refuses to start rather than guess."""


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            parse: Callable[[str], Any] | None = None) -> Any:  # fmt: skip
    """A dataclass field that is a setting: its default (or ``factory``), its help text, and, where the text of
    a flag or environment variable is not read by the field's type alone, the ``parse`` that turns it into the
    field's value (raising ConfigError)."""
    if not help:
        raise ValueError("every setting needs its help text")
    metadata = {"help": help, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def setting_help(f: Field[Any]) -> str:
    return f.metadata.get("help", "")


def setting_parser(f: Field[Any]) -> Callable[[str], Any] | None:
    return f.metadata.get("parse")
