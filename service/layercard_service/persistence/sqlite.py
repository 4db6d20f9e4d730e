"""The SQLite backend: ``<data-dir>/state.db`` in WAL mode, one connection per process behind one lock.

Connection policy: the service opens one ``SqliteDatabase`` and every repository shares it (cards, jobs,
adapter versions, deployments), from the event loop's ``to_thread`` calls, the runner threads and the metrics
scrape thread. Each call holds the lock for one statement or one transaction, and reads rows in full before
letting go. SQLite takes one writer at a time anyway, and these statements are short, so a pool of
connections would buy little and add a way to deadlock (a thread inside a transaction waiting on a second
connection for the write lock it holds). Other processes (the tuning workers today) open their own
connection: WAL lets their readers run beside a writer, and ``busy_timeout`` makes a second writer wait for
the lock instead of failing with "database is locked".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layercard_service.persistence.database import Database, Params, Rows, Session
from layercard_service.persistence.disk_full import storage_errors
from layercard_service.persistence.schema import migrate

__all__ = ["BUSY_TIMEOUT_MS", "SqliteDatabase"]

BUSY_TIMEOUT_MS = 30_000


class SqliteDatabase(Database):
    def __init__(self, path: Path, *, migrate_schema: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()  # reentrant: a statement run inside this thread's transaction joins it
        self._tx_owner: int | None = None
        with storage_errors(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
            try:
                self._connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                self._connection.execute("PRAGMA journal_mode=WAL")  # persistent: readers beside one writer
                self._connection.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
                self._connection.execute("PRAGMA foreign_keys=ON")
            except BaseException:
                self._connection.close()
                raise
        if migrate_schema:
            try:
                migrate(self)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def execute(self, sql: str, params: Params = ()) -> Rows:
        with self._lock, storage_errors(self.path.parent):
            return self._run(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """BEGIN IMMEDIATE takes the write lock up front, so a read-then-write inside cannot race another writer.

        A failed COMMIT (a full disk fails there, when WAL frames are written) is rolled back too: SQLite may
        leave the transaction open, and the connection would refuse every later BEGIN.
        """
        with self._lock, storage_errors(self.path.parent):
            if self._tx_owner is not None:
                raise RuntimeError("a transaction is already open on this thread: use its session")
            self._connection.execute("BEGIN IMMEDIATE")
            self._tx_owner = threading.get_ident()
            session = _Transaction(self)
            try:
                yield session
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:  # SQLite rolls back by itself after some errors (SQLITE_FULL)
                    with contextlib.suppress(sqlite3.Error):
                        self._connection.execute("ROLLBACK")
                raise
            finally:
                session.closed = True
                self._tx_owner = None

    def has_table(self, table: str) -> bool:
        row = self.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        return row is not None

    def columns(self, session: Session, table: str) -> set[str]:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        return {row[1] for row in session.execute(f"PRAGMA table_info({table})")}

    def _run(self, sql: str, params: Params) -> Rows:
        cursor = self._connection.execute(sql, tuple(params))
        try:
            return Rows(cursor.fetchall(), cursor.rowcount, cursor.lastrowid)
        finally:
            cursor.close()


class _Transaction:
    """The session a transaction yields: valid inside its ``with`` block, on the thread that opened it."""

    def __init__(self, db: SqliteDatabase) -> None:
        self._db, self._thread, self.closed = db, threading.get_ident(), False

    @property
    def in_transaction(self) -> bool:
        return not self.closed

    def execute(self, sql: str, params: Params = ()) -> Rows:
        if self.closed or threading.get_ident() != self._thread:
            raise RuntimeError("this transaction is closed, or belongs to another thread")
        return self._db._run(sql, params)
