"""The error in a dead worker's log, for the job's error message: tracebacks, not progress bars."""

from __future__ import annotations

import re

__all__ = ["LOG_EXCERPT_CHARS", "error_excerpt"]

LOG_EXCERPT_CHARS = 1500  # how much of the log goes into the job's error message
# tqdm's bars ("42%|####  | 21/50 [00:03<00:04, 6.1it/s]"): noise in an error message
_PROGRESS_LINE = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]")


def error_excerpt(text: str, limit: int = LOG_EXCERPT_CHARS) -> str:
    """What a dead worker's log says about its death: the last traceback, else the last ERROR line, else the
    last few lines; progress bars (redrawn with carriage returns) are dropped."""
    lines = []
    for raw in text.split("\n"):
        shown = [part for part in raw.split("\r") if part.strip()]  # a terminal shows the last redraw only
        if shown and not _PROGRESS_LINE.search(shown[-1]):
            lines.append(shown[-1].rstrip())
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        start = end = starts[-1]
        while end + 1 < len(lines) and lines[end + 1].startswith((" ", "\t")):
            end += 1  # the frames; the next unindented line is the exception itself
        if start > 0 and " ERROR " in lines[start - 1]:
            start -= 1  # log.exception's own line says what failed
        chosen = lines[start : end + 2]
    else:
        errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line or line.startswith("Fatal")]
        chosen = errors[-1:] or lines[-5:]
    excerpt = "\n".join(chosen).strip()
    return excerpt if len(excerpt) <= limit else "..." + excerpt[-limit:]
