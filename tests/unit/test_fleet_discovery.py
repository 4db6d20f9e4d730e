"""The fleet's members: health observed per replica, static URLs and DNS discovery.

All at the VllmApi seam: in-memory fake vLLM servers (support/fakes.py), real stores, the serving side
assembled by support/fleet.py (the ``env`` fixture).
"""

from __future__ import annotations

import pytest
from support.fleet import URLS, run_async

from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.serving.fleet import DnsDiscovery


@run_async
async def test_observe_marks_down_and_hanging_replicas_unhealthy(env):
    env.replicas[0].down = True
    env.replicas[1].hang = True
    seen = await env.fleet.observe(timeout=0.2)
    assert [(o.healthy, o.base_model) for o in seen.values()] == [(False, None), (False, None)]
    assert "down" in seen[URLS[0]].error and "no answer" in seen[URLS[1]].error


@run_async
async def test_a_replica_answering_garbage_is_unhealthy_and_the_others_are_observed(env):
    env.replicas[0].models_error = ValueError("Expecting value: line 1 column 1 (char 0)")
    seen = await env.fleet.observe()
    assert [o.healthy for o in seen.values()] == [False, True]


@run_async
async def test_dns_discovery_resolves_every_address():
    assert await DnsDiscovery("localhost:8000").urls() == ["http://127.0.0.1:8000"]
    assert await DnsDiscovery("localhost:9000", scheme="https").urls() == ["https://127.0.0.1:9000"]


@pytest.mark.parametrize("target", ["localhost", "localhost:http", ":8000", ""])
def test_dns_discovery_needs_host_and_port(target):
    with pytest.raises(ValueError):
        DnsDiscovery(target)


@run_async
async def test_static_urls_and_a_dns_name_together_make_the_fleet():
    from layercard_service.core import _discovery

    config = ServiceConfig(vllm_urls=("http://10.1.2.3:8000",), vllm_dns="localhost:8000")
    assert sorted(await _discovery(config.serving_pools()[0]).urls()) == [
        "http://10.1.2.3:8000",
        "http://127.0.0.1:8000",
    ]


def test_config_rejects_a_dns_target_without_a_host():
    with pytest.raises(ConfigError):
        ServiceConfig(vllm_dns=":8000")
