"""List pages bounded in bytes at the edge: the pager sizes each record as the message the response carries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from google.protobuf.message import Message

__all__ = ["ProtoPage"]

R = TypeVar("R")
M = TypeVar("M", bound=Message)


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


class ProtoPage(Generic[R, M]):
    """Converts each record once: ``size_of`` is the pager's measure (store.paginate), ``messages`` the page."""

    def __init__(self, convert: Callable[[R], M]) -> None:
        self._convert = convert
        self._done: dict[int, tuple[R, M]] = {}  # by id(); the record is kept so that its id stays its own

    def _message(self, record: R) -> M:
        known = self._done.get(id(record))
        if known is None:
            known = self._done[id(record)] = (record, self._convert(record))
        return known[1]

    def size_of(self, record: R) -> int:
        """Bytes the record adds to the response: an entry of a repeated field 1..15 (tag, length, body)."""
        body = self._message(record).ByteSize()
        return 1 + _varint_bytes(body) + body

    def messages(self, records: Iterable[R]) -> list[M]:
        return [self._message(r) for r in records]
