"""The process boundaries hold at run time too: the gRPC edge and the server start without torch."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_edge_and_the_server_leaves_torch_out():
    code = (
        "import sys; import layercard_service.api, layercard_service.server; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
