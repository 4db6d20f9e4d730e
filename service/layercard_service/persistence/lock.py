"""One data dir, one server: an exclusive lock on ``<data-dir>/.lock`` for the server's lifetime.

Two servers on one data dir would each recover the other's jobs (and kill its live workers), so the lock is
taken before anything opens the data dir's state. ``flock`` is held by the open file, so the kernel drops it
when the server exits however it exits, and a second open in the same process is refused like another
process's. Workers never take it: the descriptor is close-on-exec, and they run while the server holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["DataDirInUse", "DataDirLock"]

LOCK_FILE = ".lock"


class DataDirInUse(RuntimeError):
    """Another server holds the data dir's lock."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held (EWOULDBLOCK)
            holder = _read_pid(fd)
            os.close(fd)
            by = f"another layercard server (pid {holder})" if holder else "another layercard server"
            raise DataDirInUse(
                f"the data dir {self.path.parent} is in use by {by}: one data dir serves one server; "
                "stop that server or give this one another --data-dir"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for the message above only: a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Closing the file drops the lock; the file stays (unlinking it would let two servers lock two files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
