"""A full disk, in one place: SQLite's SQLITE_FULL and the OS's ENOSPC/EDQUOT become ResourceExhausted(DISK_FULL).

Callers above the persistence layer never see raw sqlite or OS errors for a full disk; every other error
passes through unchanged.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layercard_service.errors import ResourceExhausted

__all__ = ["DISK_FULL", "disk_full_error", "is_disk_full", "storage_errors"]

DISK_FULL = "DISK_FULL"  # the ErrorInfo reason, and a failed job's error_code, when the data dir's disk is full
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc``, or an exception it was raised from, says the disk is full.

    SQLite says SQLITE_FULL ("database or disk is full"); the OS says ENOSPC, or EDQUOT for a quota.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ResourceExhausted) and exc.reason == DISK_FULL:
            return True
        if isinstance(exc, sqlite3.OperationalError):
            code = getattr(exc, "sqlite_errorcode", None)
            if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "database or disk is full" in str(exc):
                return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(where: Path) -> ResourceExhausted:
    return ResourceExhausted(
        f"the data dir's disk is full (writing {where}): free space there, then retry",
        reason=DISK_FULL,
        metadata={"path": str(where)},
    )


@contextmanager
def storage_errors(where: Path) -> Iterator[None]:
    """Re-raises a full disk as ResourceExhausted(DISK_FULL): callers above never see raw sqlite or OS errors."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(where) from exc
