"""The persistence interface: a Database hands out transactions; repositories speak SQL through it.

This is the seam a PostgreSQL backend would sit behind (not written yet). What a backend must provide:
- ``execute(sql, params)``: one statement outside any transaction (autocommit), its rows read eagerly.
- ``transaction()``: a write transaction that takes the write lock up front (SQLite: BEGIN IMMEDIATE;
  PostgreSQL would use SERIALIZABLE or row locks), commits on success and rolls back on any failure,
  a failed COMMIT included, leaving the database usable.
- ``columns(tx, table)`` and ``has_table(table)``: the introspection migrations need.
SQL is written with qmark placeholders (``?``); a backend with another paramstyle translates them. The SQL the
repositories hold is SQLite's dialect today (``INSERT OR REPLACE``, ``json_extract``, ``AUTOINCREMENT``); a
second backend would give those few statements a dialect of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Database", "Rows", "Session"]

Params = Sequence[Any]


@dataclass(frozen=True)
class Rows:
    """The result of one statement, read in full (no cursor outlives the lock that guards the connection).

    ``fetchone``/``fetchall`` read like a DB-API cursor's, so code written against a connection reads the same.
    """

    rows: list[tuple] = field(default_factory=list)
    rowcount: int = -1
    lastrowid: int | None = None

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return list(self.rows)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)


class Session(Protocol):
    """Anything that runs a statement: an open transaction, or the database itself (autocommit)."""

    def execute(self, sql: str, params: Params = ()) -> Rows: ...


class Database(ABC):
    """One database, shared by the repositories of a process; safe to call from any thread."""

    path: Path  # where it lives, for messages (and the disk-full mapping: the data dir)

    @abstractmethod
    def execute(self, sql: str, params: Params = ()) -> Rows:
        """One statement, committed on its own; inside this thread's open transaction it joins that one."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Session]:
        """A write transaction: the session it yields is valid only inside the ``with`` block, on this thread."""

    @abstractmethod
    def has_table(self, table: str) -> bool: ...

    @abstractmethod
    def columns(self, session: Session, table: str) -> set[str]: ...

    @abstractmethod
    def close(self) -> None: ...
