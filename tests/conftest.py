"""Fixtures shared by every test folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/support is importable as `support`

from support.server_thread import ServerThread

VLLM_FIXTURES = ("vllm_pair", "vllm_server", "vllm_lean")  # tests/e2e/conftest.py's: each starts real vLLM servers


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Only an e2e test may start vLLM: unit and integration runs (-m "not e2e") must never pay for it."""
    wanted = [name for name in VLLM_FIXTURES if name in getattr(item, "fixturenames", ())]
    if wanted and item.get_closest_marker("e2e") is None:
        pytest.fail(f"{item.nodeid} asks for {wanted} but is not marked e2e (only tests/e2e may start vLLM)")


@pytest.fixture
def server():
    """A real layercard server on a free port, no auth, stopped after the test."""
    with ServerThread() as running:
        yield running


@pytest.fixture(scope="session")
def smollm2_path():
    """The real pretrained model's directory (make setup materializes it); a missing import fails the test."""
    from layercard_service.models.builtin import builtin_model_path

    return builtin_model_path("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's in-process training, as a worker on a busy machine has: oversubscribed
    threads stall every step, and the data-parallel ranks each run one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
