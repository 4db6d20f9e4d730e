"""Layer cards and the file hash cache (fingerprints of large weight files are costly to recompute)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from layercard_service.persistence.database import Database

__all__ = ["CardRecord", "CardRepository"]


@dataclass(frozen=True)
class CardRecord:
    card_id: str
    fingerprint: str
    model: str
    create_time: float
    payload: dict


class CardRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- layer cards ---------------------------------------------------------------------------------
    def put_card(self, record: CardRecord) -> None:
        payload = json.dumps(record.payload)  # serialised before the lock: cards can be large
        self.db.execute(
            "INSERT OR REPLACE INTO layer_cards VALUES (?, ?, ?, ?, ?)",
            (record.card_id, record.fingerprint, record.model, record.create_time, payload),
        )

    def get_card(self, card_id: str) -> CardRecord | None:
        return _card(self.db.execute("SELECT * FROM layer_cards WHERE card_id = ?", (card_id,)).fetchone())

    def find_card(self, fingerprint: str) -> CardRecord | None:
        return _card(self.db.execute("SELECT * FROM layer_cards WHERE fingerprint = ?", (fingerprint,)).fetchone())

    def list_cards(self, model: str, offset: int, limit: int) -> list[CardRecord]:
        query = "SELECT * FROM layer_cards"
        args: list[object] = []
        if model:
            query += " WHERE model = ?"
            args.append(model)
        query += " ORDER BY create_time DESC, card_id LIMIT ? OFFSET ?"
        return [_card(row) for row in self.db.execute(query, (*args, limit, offset))]

    # --- file hash cache ------------------------------------------------------------------------------
    def cached_hash(self, path: Path, size: int, mtime: float) -> str | None:
        row = self.db.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime = ?", (str(path), size, mtime)
        ).fetchone()
        return row[0] if row else None

    def remember_hash(self, path: Path, size: int, mtime: float, sha256: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (str(path), size, mtime, sha256))


def _card(row) -> CardRecord | None:
    if row is None:
        return None
    return CardRecord(row[0], row[1], row[2], row[3], json.loads(row[4]))
