"""Runs a real LayercardServer on port 0 in a background thread with its own event loop.

Tests then talk to it over a real socket with ordinary (sync) gRPC channels, as other services would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

from layercard_service.config import ServiceConfig
from layercard_service.server import LayercardServer, Servicers


class ServerThread:
    def __init__(self, config: ServiceConfig | None = None, servicers: Servicers | None = None) -> None:
        config = config or ServiceConfig(port=0, log_format="text")
        if config.data_dir == ServiceConfig.data_dir:  # never the working tree's state: a fresh folder per server
            config = dataclasses.replace(config, data_dir=Path(tempfile.mkdtemp(prefix="layercard-")))
        self.config = config
        self.server = LayercardServer(self.config, servicers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="layercard-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.run(self.server.start())
        return self

    def run(self, coro, timeout: float = 60):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            self.run(self.server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
