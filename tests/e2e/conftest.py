"""Two real vLLM servers (CPU) with the built-in model, shared by the whole e2e session: a fleet of two.

Starting vLLM costs about a minute and 3 GB each, so there are exactly two, started side by side; most tests
use the first alone (``vllm_server``), the fleet tests use both. If one cannot start the fixture fails with
vLLM's log tail: an e2e run never skips silently.

Every test under tests/e2e is marked ``e2e`` here, so ``-m "not e2e"`` (make test-unit, make test-integration)
leaves them all out, whatever a module declares.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layercard_service.models.builtin import builtin_model_path
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings

E2E_DIR = Path(__file__).parent
VLLM_FIXTURES = ("vllm_pair", "vllm_server")  # tests/conftest.py refuses them to a test not marked e2e

SERVED_NAME = "builtin-tiny"
MAX_LORA_RANK = 8


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory):
    log_dir = Path(os.environ.get("LAYERCARD_E2E_LOG_DIR") or tmp_path_factory.mktemp("vllm"))
    servers = [
        VllmProcess(
            VllmServerSettings(
                model=builtin_model_path("tiny"),
                served_model_name=SERVED_NAME,
                port=0,
                max_loras=4,
                max_lora_rank=MAX_LORA_RANK,
                max_model_len=512,
                log_path=log_dir / f"vllm-{i}.log",
                startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
            )
        )
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()  # raises VllmStartupError/Timeout with the log tail
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def vllm_server(vllm_pair):
    return vllm_pair[0]
