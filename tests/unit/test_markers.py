"""Every e2e test is marked, so `make test-unit` and `make test-integration` (-m "not e2e") never start vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parents[1]


def _collect(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, cwd=TESTS.parent,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if "::" in line]


def test_not_e2e_selects_no_e2e_test():
    every = _collect(str(TESTS / "e2e"))
    assert len(every) > 10  # the e2e tests are there to be left out
    assert _collect("-m", "not e2e", str(TESTS / "e2e")) == []
    assert sorted(_collect("-m", "e2e", str(TESTS / "e2e"))) == sorted(every)


def test_a_test_outside_e2e_that_asks_for_vllm_fails_before_starting_it(tmp_path):
    """The guard in tests/conftest.py (loaded here as a plugin): the fixture is refused at setup, so vLLM never
    starts."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n\n@pytest.fixture\ndef vllm_server():\n    raise AssertionError('started')\n\n"
                     "def test_unmarked(vllm_server):\n    pass\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(probe)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "is not marked e2e" in result.stdout and "started" not in result.stdout
