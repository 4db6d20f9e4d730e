"""The built-in model served by a real vLLM (CPU) through its OpenAI-compatible API."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_models_lists_the_builtin(vllm_server):
    ids = [m["id"] for m in _get(vllm_server.url + "/v1/models")["data"]]
    assert vllm_server.settings.served_model_name in ids


def test_completion(vllm_server):
    out = _post(
        vllm_server.url + "/v1/completions",
        {
            "model": vllm_server.settings.served_model_name,
            "prompt": "Return the number of items in",
            "max_tokens": 16,
            "temperature": 0.0,
            "ignore_eos": True,  # a greedy tiny model may stop at once; we test the engine, not the prose
        },
    )
    text = out["choices"][0]["text"]
    assert text.strip(), out
    assert out["usage"]["prompt_tokens"] > 0
    assert out["usage"]["completion_tokens"] == 16


def test_server_process_is_supervised(vllm_server):
    assert vllm_server.running()
    assert vllm_server.startup_seconds is not None and vllm_server.startup_seconds > 0
    assert (vllm_server.rss_bytes() or 0) > 100 * 2**20
