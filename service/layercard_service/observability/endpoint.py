"""Prometheus metrics: a registry passed in (never the global one, so tests stay independent) and its endpoint."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Info, start_http_server
from prometheus_client.process_collector import ProcessCollector

__all__ = ["MetricsEndpoint", "new_registry"]


def new_registry(version: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    Info("layercard_build", "Version of the running layercard service.", registry=registry).info(
        {"version": version, "python": platform.python_version()}
    )
    return registry


@dataclass
class MetricsEndpoint:
    """Serves ``/metrics`` for ``registry`` on its own HTTP port (0 picks a free one)."""

    registry: CollectorRegistry
    host: str
    port: int

    def start(self) -> int:
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)
