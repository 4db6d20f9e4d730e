"""Adapter versions: what tuning publishes and serving loads; the canonical home of ``AdapterVersion``.

A version row exists exactly when its tuning job succeeded: publication runs inside the job's final
transition (``JobStore.transition(result=callable)``), which hands the callable its open session; the
functions here take that session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from layercard_service.persistence.database import Database, Session

__all__ = ["AdapterVersion", "AdapterVersions", "insert_version", "next_version"]


@dataclass(frozen=True)
class AdapterVersion:
    adapter_id: str
    version: int
    path: str
    job_id: str
    create_time: float
    metadata: dict[str, Any]


class AdapterVersions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def versions(self, adapter_id: str) -> list[AdapterVersion]:
        rows = self.db.execute("SELECT * FROM adapter_versions WHERE adapter_id = ? ORDER BY version", (adapter_id,))
        return [AdapterVersion(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def adapter_ids(self, offset: int, limit: int) -> list[str]:
        """Adapters with at least one version, by id."""
        rows = self.db.execute(
            "SELECT DISTINCT adapter_id FROM adapter_versions ORDER BY adapter_id LIMIT ? OFFSET ?", (limit, offset)
        )
        return [r[0] for r in rows]

    def has_adapter(self, adapter_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM adapter_versions WHERE adapter_id = ? LIMIT 1", (adapter_id,))
        return row.fetchone() is not None


def next_version(tx: Session, adapter_id: str) -> int:
    """Inside a write transaction: the version number the next publication of ``adapter_id`` gets."""
    row = tx.execute("SELECT MAX(version) FROM adapter_versions WHERE adapter_id = ?", (adapter_id,)).fetchone()
    return (row[0] or 0) + 1


def insert_version(tx: Session, version: AdapterVersion) -> None:
    """Inside a write transaction. ``tx`` is any session (a DB-API connection reads the same, as tests use)."""
    tx.execute(
        "INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?)",
        (
            version.adapter_id,
            version.version,
            version.path,
            version.job_id,
            version.create_time,
            json.dumps(version.metadata),
        ),
    )
