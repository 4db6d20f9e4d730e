"""The client package stays light: importing it (and running the CLI's parser) loads no torch and no service code.

Runs in a fresh interpreter, since this test process itself has the service (and perhaps torch) loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "layercard_service")

PROBE = """
import contextlib, io, json, sys
import layercard_client, layercard_client.client, layercard_client.aio, layercard_client.cli
with contextlib.redirect_stdout(io.StringIO()):
    code = layercard_client.cli.main(["--help"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps({{"help_exit": code, "heavy": heavy}}))
"""


def test_client_imports_no_torch_and_no_service(tmp_path):
    done = subprocess.run(
        [sys.executable, "-I", "-c", PROBE.format(heavy=set(HEAVY))],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["help_exit"] == 0
    assert result["heavy"] == [], f"the client pulled in {result['heavy']}"
