"""The shared List pager: pages bounded in count and in bytes, tokens that continue exactly where a page stopped."""

from __future__ import annotations

import pytest

from layercard_service.errors import InvalidArgument
from layercard_service.persistence import store
from layercard_service.persistence.store import paginate

RECORDS = [(f"r{i:03d}", size) for i, size in enumerate([300, 10, 10, 900, 10, 10, 10, 2000, 10, 450] * 20)]


def _fetch(offset: int, limit: int) -> list[tuple[str, int]]:
    return RECORDS[offset : offset + limit]


def _size(record: tuple[str, int]) -> int:
    return record[1]


def _all_pages(page_size: int, max_bytes: int) -> list[list[tuple[str, int]]]:
    pages, token = [], ""
    while True:
        page, token = paginate(_fetch, page_size, token, size_of=_size, max_bytes=max_bytes)
        pages.append(page)
        if not token:
            return pages


@pytest.mark.parametrize("page_size", [1, 3, 50, 1000])
@pytest.mark.parametrize("max_bytes", [1000, 1500, 100_000])
def test_pages_stay_under_the_bound_and_together_list_every_record_once(page_size, max_bytes):
    pages = _all_pages(page_size, max_bytes)
    assert [r for page in pages for r in page] == RECORDS  # none skipped, none repeated, in order
    budget = max_bytes - store.PAGE_TOKEN_RESERVE
    for page in pages:
        assert 1 <= len(page) <= page_size
        assert sum(map(_size, page)) <= budget or len(page) == 1  # only a lone record may be larger


def test_a_record_larger_than_the_bound_gets_a_page_of_its_own():
    page, token = paginate(_fetch, 10, "7", size_of=_size, max_bytes=1000)  # RECORDS[7] is 2000 bytes
    assert page == [RECORDS[7]] and token == "8"


def test_the_default_bound_is_well_under_grpcs_default_client_limit():
    assert store.MAX_LIST_RESPONSE_BYTES <= 1024 * 1024 < 4 * 1024 * 1024
    sized = [("x", 400_000)] * 5
    page, token = paginate(lambda o, n: sized[o : o + n], 50, "", size_of=_size)
    assert len(page) == 2 and token == "2"


def test_without_a_size_pages_are_bounded_by_count_only():
    page, token = paginate(_fetch, 5, "", max_bytes=10)
    assert page == RECORDS[:5] and token == "5"
    assert paginate(_fetch, 5, str(len(RECORDS) - 2)) == (RECORDS[-2:], "")


def test_bounded_pages_read_the_store_in_chunks():
    limits: list[int] = []

    def fetch(offset: int, limit: int):
        limits.append(limit)
        return _fetch(offset, limit)

    page, token = paginate(fetch, 1000, "", size_of=lambda r: 1, max_bytes=10_000)
    assert page == RECORDS and token == ""
    assert max(limits) == store.FETCH_CHUNK + 1  # never 1001 large records read for one page


@pytest.mark.parametrize(("page_size", "token", "field"), [(-1, "", "page_size"), (5, "x", "page_token")])
def test_bad_paging_input_names_the_field(page_size, token, field):
    with pytest.raises(InvalidArgument) as info:
        paginate(_fetch, page_size, token, size_of=_size)
    assert info.value.violations[0].field == field
