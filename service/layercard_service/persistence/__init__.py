"""The persistence layer: the only code that talks to the database (and the only importer of sqlite3).

``open_database(path)`` gives a migrated ``Database``; the repositories (``cards``, ``jobs``,
``adapter_versions``, ``deployments``) take one and hold the SQL for their tables.
"""

from __future__ import annotations

from pathlib import Path

from layercard_service.persistence.database import Database, Rows, Session
from layercard_service.persistence.disk_full import DISK_FULL, disk_full_error, is_disk_full, storage_errors
from layercard_service.persistence.schema import SCHEMA_TOO_NEW, SCHEMA_VERSION
from layercard_service.persistence.sqlite import SqliteDatabase

__all__ = [
    "DISK_FULL",
    "SCHEMA_TOO_NEW",
    "SCHEMA_VERSION",
    "Database",
    "Rows",
    "Session",
    "as_database",
    "disk_full_error",
    "is_disk_full",
    "open_database",
    "storage_errors",
]


def open_database(path: Path) -> Database:
    """Opens (creating if need be) the database at ``path`` and brings its schema to the current version."""
    return SqliteDatabase(path)


def as_database(target: Database | Path | str) -> tuple[Database, bool]:
    """A repository's argument: a shared Database (not its to close), or a path it opens (and closes) itself."""
    if isinstance(target, Database):
        return target, False
    return open_database(Path(target)), True
