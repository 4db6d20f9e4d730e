"""State and artifacts: records in the database (persistence/), a filesystem tree with atomic writes for payloads.

Also the List calls' paging. Callers on the event loop run store calls in a thread when they may block (large
payloads). The disk-full helpers live in persistence/disk_full.py and are re-exported here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from layercard_service.errors import InvalidArgument
from layercard_service.persistence import as_database
from layercard_service.persistence.cards import CardRecord, CardRepository
from layercard_service.persistence.database import Database
from layercard_service.persistence.disk_full import DISK_FULL, disk_full_error, is_disk_full, storage_errors

__all__ = ["MAX_LIST_RESPONSE_BYTES", "CardRecord", "Store", "atomic_write", "decode_page_token", "paginate"]

# A full disk (kept apart from __all__ above, which the paging work edits too); its home is the persistence layer.
__all__ += ["DISK_FULL", "disk_full_error", "is_disk_full", "storage_errors"]


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` so that readers see the old file or the whole new one, never a part."""
    with storage_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Store:
    """The data dir: the artifact tree, and the layer cards and file hashes in its database.

    ``Store(data_dir)`` opens ``<data_dir>/state.db`` itself (and closes it); the service passes the one
    Database every repository shares (core.py), and closes that itself.
    """

    def __init__(self, data_dir: Path, db: Database | None = None) -> None:
        self.root = Path(data_dir)
        self.artifacts = self.root / "artifacts"
        with storage_errors(self.root):
            self.artifacts.mkdir(parents=True, exist_ok=True)
        self.db, self._owns_db = as_database(db if db is not None else self.root / "state.db")
        self.cards = CardRepository(self.db)

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    # --- layer cards ---------------------------------------------------------------------------------
    def put_card(self, record: CardRecord) -> None:
        self.cards.put_card(record)

    def get_card(self, card_id: str) -> CardRecord | None:
        return self.cards.get_card(card_id)

    def find_card(self, fingerprint: str) -> CardRecord | None:
        return self.cards.find_card(fingerprint)

    def list_cards(self, model: str, offset: int, limit: int) -> list[CardRecord]:
        return self.cards.list_cards(model, offset, limit)

    # --- file hash cache (fingerprints of large weight files are costly) --------------------------------
    def cached_hash(self, path: Path, size: int, mtime: float) -> str | None:
        return self.cards.cached_hash(path, size, mtime)

    def remember_hash(self, path: Path, size: int, mtime: float, sha256: str) -> None:
        self.cards.remember_hash(path, size, mtime, sha256)


def decode_page_token(token: str) -> int:
    """Page tokens are opaque to clients; here they are offsets. A malformed one is the caller's error."""
    if not token:
        return 0
    try:
        offset = int(token)
    except ValueError:
        offset = -1
    if offset < 0:
        raise InvalidArgument.field("page_token", "malformed page token; pass next_page_token unchanged")
    return offset


T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Every List response stays under this many bytes (its items serialized, plus the page token), well under the
# 4 MiB that gRPC clients accept by default, whatever the records hold. Documented in the List requests' proto
# comments and the README.
MAX_LIST_RESPONSE_BYTES = 1024 * 1024
PAGE_TOKEN_RESERVE = 64  # bytes kept for next_page_token and its framing
FETCH_CHUNK = 64  # records read at a time when a page is bounded in bytes: no 1000 large records for one page


def paginate(
    fetch: Callable[[int, int], list[T]],
    page_size: int,
    page_token: str,
    *,
    size_of: Callable[[T], int] | None = None,
    max_bytes: int | None = None,
) -> tuple[list[T], str]:
    """One page of a List call: ``fetch(offset, limit)`` reads the records; returns them and the next token.

    page_size 0 means the default, larger ones are capped; one record more than the page tells if there is more.
    With ``size_of`` (a record's size in the response, framing included: the API layer knows the encoding) the
    page also stops before its records would pass ``max_bytes`` (default MAX_LIST_RESPONSE_BYTES); it always
    holds at least one record, and the token continues at the first record it left out.
    """
    if page_size < 0:
        raise InvalidArgument.field("page_size", f"must be >= 0, got {page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    offset = decode_page_token(page_token)
    if size_of is None:
        records = fetch(offset, size + 1)
        return records[:size], str(offset + size) if len(records) > size else ""
    budget = (max_bytes if max_bytes is not None else MAX_LIST_RESPONSE_BYTES) - PAGE_TOKEN_RESERVE
    page: list[T] = []
    used = 0
    while True:
        want = min(size - len(page), FETCH_CHUNK)
        chunk = fetch(offset + len(page), want + 1)
        for record in chunk[:want]:
            used += size_of(record)
            if page and used > budget:
                return page, str(offset + len(page))
            page.append(record)
        if len(chunk) <= want:  # the store has no more
            return page, ""
        if len(page) == size:  # full, and the extra record says there is more
            return page, str(offset + len(page))
