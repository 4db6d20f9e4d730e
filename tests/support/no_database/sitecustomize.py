"""Loaded by every Python process started with this folder first on PYTHONPATH: no SQLite database opens.

Tests run tuning workers under it to show they never open the service's state.db (root ignores file modes, so a
chmod would prove nothing). Each process notes in ``$LAYERCARD_TEST_GUARD_LOG`` that the guard is active, and
every attempt to connect, before refusing it.
"""

import _sqlite3
import os
import sqlite3
import sqlite3.dbapi2

_LOG = os.environ.get("LAYERCARD_TEST_GUARD_LOG", "")


def _note(line: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {line}\n")


def _refuse(*args, **kwargs):
    _note(f"connect {args!r}")
    raise sqlite3.OperationalError("this process may not open a SQLite database (tests/support/no_database)")


sqlite3.connect = sqlite3.dbapi2.connect = _sqlite3.connect = _refuse
_note("guard active")
