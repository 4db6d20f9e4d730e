"""Fixtures shared by every test folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/support is importable as `support`

from support.server_thread import ServerThread


@pytest.fixture
def server():
    """A real layercard server on a free port, no auth, stopped after the test."""
    with ServerThread() as running:
        yield running
