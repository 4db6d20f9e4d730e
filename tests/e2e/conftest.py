"""Two real vLLM servers (CPU) with the built-in model, shared by the whole e2e session: a fleet of two.

Starting vLLM costs about a minute and 3 GB each, so there are exactly two, started side by side; most tests
use the first alone (``vllm_server``), the fleet tests use both. A third, ``vllm_lean``, wraps only o_proj: the
lean serving pool of tests/e2e/test_pools.py, started when that module first asks for it. If one cannot start
the fixture fails with vLLM's log tail: an e2e run never skips silently.

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
VLLM_FIXTURES = ("vllm_pair", "vllm_server", "vllm_lean")  # tests/conftest.py refuses them to a test not marked e2e

SERVED_NAME = "builtin-tiny"
MAX_LORA_RANK = 8


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _builtin_server(log_dir: Path, name: str, modules: tuple[str, ...] = ()) -> VllmProcess:
    return VllmProcess(
        VllmServerSettings(
            model=builtin_model_path("tiny"),
            served_model_name=SERVED_NAME,
            port=0,
            max_loras=4,
            max_lora_rank=MAX_LORA_RANK,
            lora_target_modules=modules,
            max_model_len=512,
            log_path=log_dir / f"{name}.log",
            startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
        )
    )


def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("LAYERCARD_E2E_LOG_DIR") or tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory):
    log_dir = _log_dir(tmp_path_factory)
    servers = [_builtin_server(log_dir, f"vllm-{i}") for i in range(2)]
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


@pytest.fixture(scope="session")
def vllm_lean(tmp_path_factory: pytest.TempPathFactory):
    """A vLLM server like the pair's but started with ``--lora-target-modules o_proj``."""
    server = _builtin_server(_log_dir(tmp_path_factory), "vllm-lean", modules=("o_proj",))
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()
