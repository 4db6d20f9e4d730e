"""Fixtures of the unit tests: the serving side over fake vLLM servers (support/fleet.py)."""

from __future__ import annotations

import pytest
from support.fleet import make_env


@pytest.fixture
def env(tmp_path):
    built = make_env(tmp_path)
    yield built
    built.jobs.close()
    built.store.close()
