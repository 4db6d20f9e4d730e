"""Structured logs: one JSON object per line (for log shippers) or plain text (for people at a terminal).

Both show a record's ``extra`` fields (the incident id an INTERNAL reply names, the RPC method, the job id):
JSON as keys, text as ``key=value`` pairs after the message.
"""

from __future__ import annotations

import json
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

__all__ = ["TextFormatter", "configure_logging"]

# What every LogRecord carries; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _text(value: object) -> str:
    """A value as it reads in ``key=value``: bare when unambiguous, else JSON-quoted."""
    if isinstance(value, str) and value and not any(c.isspace() or c in '="' for c in value):
        return value
    return json.dumps(value, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, the traceback (if any) below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = [
            f"{key}={_text(value)}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
        ]
        return " ".join([line, *extras])


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: the fleet's polling of /v1/models would drown the service's own lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
