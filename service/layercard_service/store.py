"""State and artifacts: SQLite (WAL) for records, a filesystem tree with atomic writes for payloads.

One ``Store`` per process. SQLite calls are short and serialised by a lock; callers on the event loop run them
in a thread when they may block (large payloads).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from layercard_service.errors import InvalidArgument, ResourceExhausted

__all__ = ["MAX_LIST_RESPONSE_BYTES", "CardRecord", "Store", "atomic_write", "decode_page_token", "paginate"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layer_cards (
    card_id     TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    model       TEXT NOT NULL,
    create_time REAL NOT NULL,
    payload     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS layer_cards_by_time ON layer_cards (create_time DESC, card_id);
CREATE TABLE IF NOT EXISTS file_hashes (
    path   TEXT PRIMARY KEY,
    size   INTEGER NOT NULL,
    mtime  REAL NOT NULL,
    sha256 TEXT NOT NULL
);
"""


# A full disk (kept apart from __all__ above, which the paging work edits too).
__all__ += ["DISK_FULL", "disk_full_error", "is_disk_full", "storage_errors"]
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


@dataclass(frozen=True)
class CardRecord:
    card_id: str
    fingerprint: str
    model: str
    create_time: float
    payload: dict


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.artifacts = self.root / "artifacts"
        self._lock = threading.Lock()
        with storage_errors(self.root):
            self.artifacts.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- layer cards ---------------------------------------------------------------------------------
    def put_card(self, record: CardRecord) -> None:
        with self._lock, storage_errors(self.root):
            self._db.execute(
                "INSERT OR REPLACE INTO layer_cards VALUES (?, ?, ?, ?, ?)",
                (record.card_id, record.fingerprint, record.model, record.create_time, json.dumps(record.payload)),
            )

    def get_card(self, card_id: str) -> CardRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM layer_cards WHERE card_id = ?", (card_id,)).fetchone()
        return _card(row)

    def find_card(self, fingerprint: str) -> CardRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM layer_cards WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return _card(row)

    def list_cards(self, model: str, offset: int, limit: int) -> list[CardRecord]:
        query = "SELECT * FROM layer_cards"
        args: list[object] = []
        if model:
            query += " WHERE model = ?"
            args.append(model)
        query += " ORDER BY create_time DESC, card_id LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit, offset)).fetchall()
        return [_card(row) for row in rows]

    # --- file hash cache (fingerprints of large weight files are costly) --------------------------------
    def cached_hash(self, path: Path, size: int, mtime: float) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime = ?", (str(path), size, mtime)
            ).fetchone()
        return row[0] if row else None

    def remember_hash(self, path: Path, size: int, mtime: float, sha256: str) -> None:
        with self._lock, storage_errors(self.root):
            self._db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (str(path), size, mtime, sha256))


def _card(row) -> CardRecord | None:
    if row is None:
        return None
    return CardRecord(row[0], row[1], row[2], row[3], json.loads(row[4]))


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
