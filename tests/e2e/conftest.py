"""One real vLLM server (CPU) with the built-in model, shared by the whole e2e session.

Starting vLLM costs about a minute and 3 GB, so there is exactly one. If it cannot start the fixture fails
with vLLM's log tail: an e2e run never skips silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layercard_service.models.builtin import builtin_model_path
from layercard_service.serve.vllm_process import VllmProcess, VllmServerSettings

SERVED_NAME = "builtin-tiny"


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    log_dir = Path(os.environ.get("LAYERCARD_E2E_LOG_DIR") or tmp_path_factory.mktemp("vllm"))
    settings = VllmServerSettings(
        model=builtin_model_path("tiny"),
        served_model_name=SERVED_NAME,
        port=0,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=512,
        log_path=log_dir / "vllm.log",
        startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "420")),
    )
    with VllmProcess(settings) as server:  # raises VllmStartupError/Timeout with the log tail
        yield server
