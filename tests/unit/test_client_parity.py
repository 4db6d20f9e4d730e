"""The sync and async clients mirror each other: the same public methods, with the same parameters (names,
kinds, defaults, annotations) and matching return types, whatever is awaited; the streams likewise."""

from __future__ import annotations

import inspect
import re

import pytest

from layercard_client.aio import AsyncLayercardClient, AsyncResponseStream
from layercard_client.client import LayercardClient, ResponseStream

PAIRS = [(LayercardClient, AsyncLayercardClient), (ResponseStream, AsyncResponseStream)]


def _public(cls: type) -> dict[str, object]:
    return {name: member for name, member in vars(cls).items() if not name.startswith("_") and callable(member)}


def _sync_spelling(annotation: str) -> str:
    """An async return type written as its sync twin: AsyncIterator -> Iterator, AsyncResponseStream -> ..."""
    return re.sub(r"\bAsync(?=[A-Z])", "", annotation.replace("Awaitable[", "").replace("Coroutine[", ""))


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=lambda cls: cls.__name__)
def test_the_same_public_methods(sync, aio):
    assert sorted(_public(sync)) == sorted(_public(aio))
    assert ("__init__" in vars(sync)) == ("__init__" in vars(aio))


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=lambda cls: cls.__name__)
def test_the_same_signatures_ignoring_async(sync, aio):
    names = [*sorted(set(_public(sync)) & set(_public(aio))), "__init__"]
    for name in names:
        if name not in vars(sync):
            continue
        left, right = inspect.signature(getattr(sync, name)), inspect.signature(getattr(aio, name))
        assert list(left.parameters.values()) == list(right.parameters.values()), name
        assert _sync_spelling(str(left.return_annotation)) == _sync_spelling(str(right.return_annotation)), name


def test_context_managers_on_both_sides():
    assert hasattr(LayercardClient, "__enter__") and hasattr(LayercardClient, "__exit__")
    assert hasattr(AsyncLayercardClient, "__aenter__") and hasattr(AsyncLayercardClient, "__aexit__")
