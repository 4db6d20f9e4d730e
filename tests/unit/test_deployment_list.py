"""ListAdapters: pages, desired against observed, bounded in bytes.

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import pytest
from support.fleet import MODEL, run_async

from layercard_service.api import adapter as adapter_api
from layercard_service.api.paging import ProtoPage
from layercard_service.errors import InvalidArgument
from layercard_service.persistence import store as paging


@run_async
async def test_list_pages_and_shows_desired_against_observed(env):
    env.publish("alpha")
    env.publish("echo")
    env.publish("echo")
    await env.manager.deploy("adapters/echo", version=2)
    first, token = await env.manager.list(page_size=1, page_token="")
    second, end = await env.manager.list(page_size=1, page_token=token)
    assert [a.adapter_id for a in first + second] == ["alpha", "echo"] and token and end == ""
    assert first[0].deployment is None
    echo = second[0]
    assert [v.version for v in echo.versions] == [1, 2] and echo.base_model == MODEL
    assert echo.deployment.version == 2 and echo.deployment.state == "READY"
    assert [r.observed_adapters for r in echo.deployment.replicas] == [("echo@v2",), ("echo@v2",)]
    with pytest.raises(InvalidArgument):
        await env.manager.list(page_size=1, page_token="garbage")


@run_async
async def test_list_pages_are_bounded_in_bytes_by_the_messages_the_api_sends(env, monkeypatch):
    for adapter_id in ("alpha", "beta", "gamma", "delta", "echo"):
        for _ in range(3):
            env.publish(adapter_id)
    page = ProtoPage(adapter_api.adapter_to_proto)
    one = page.size_of((await env.manager.list(page_size=1, page_token=""))[0][0])
    monkeypatch.setattr(paging, "MAX_LIST_RESPONSE_BYTES", 2 * one + paging.PAGE_TOKEN_RESERVE)  # two per page
    listed, token, pages = [], "", 0
    while True:
        page = ProtoPage(adapter_api.adapter_to_proto)
        views, token = await env.manager.list(page_size=50, page_token=token, size_of=page.size_of)
        assert 1 <= len(views) <= 2
        listed += [v.adapter_id for v in views]
        pages += 1
        if not token:
            break
    assert listed == ["alpha", "beta", "delta", "echo", "gamma"] and pages == 3
