"""The gRPC server: wiring of servicers, health, reflection, interceptors, TLS, metrics and graceful shutdown.

``LayercardServer`` is what tests start in-process on port 0; ``main`` is the ``layercard-server`` console script.
Start-up order matters: the data dir's lock comes first (before any store opens), the ports are bound next, and
only then does job recovery change any state, so a server that cannot start leaves the data dir as it was.
Exit codes of ``main``: 0 stopped cleanly, 2 bad settings, 3 the data dir is in use by another server,
4 a port cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from importlib import metadata

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from layercard.internal.v1 import worker_pb2_grpc
from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_service.api.adapter import AdapterServicer
from layercard_service.api.grpc_metrics import GrpcMetricsInterceptor
from layercard_service.api.inference import InferenceServicer
from layercard_service.api.interceptors import AuthInterceptor, ErrorInterceptor
from layercard_service.api.layer_card import LayerCardServicer
from layercard_service.api.placement import PlacementServicer
from layercard_service.api.tuning import TuningServicer
from layercard_service.api.worker import WorkerServicer
from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.core import Core
from layercard_service.logs import configure_logging
from layercard_service.observability.endpoint import MetricsEndpoint, new_registry
from layercard_service.observability.prometheus import PrometheusTelemetry
from layercard_service.persistence.lock import DataDirInUse, DataDirLock
from layercard_service.runners.worker_reports import ServiceEndpoint

__all__ = [
    "EXIT_DATA_DIR_IN_USE",
    "EXIT_PORT_UNAVAILABLE",
    "SERVICE_NAMES",
    "LayercardServer",
    "PortUnavailable",
    "Servicers",
    "main",
]

log = logging.getLogger(__name__)

EXIT_DATA_DIR_IN_USE = 3
EXIT_PORT_UNAVAILABLE = 4


class PortUnavailable(RuntimeError):
    """The gRPC or metrics port cannot be bound (in use, or not ours to bind)."""


# Full names of the five API services, as reflection and health report them.
SERVICE_NAMES: tuple[str, ...] = (
    layer_card_pb2.DESCRIPTOR.services_by_name["LayerCardService"].full_name,
    placement_pb2.DESCRIPTOR.services_by_name["PlacementService"].full_name,
    tuning_pb2.DESCRIPTOR.services_by_name["TuningService"].full_name,
    adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
)


def _version() -> str:
    try:
        return metadata.version("layercard-service")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class Servicers:
    """The servicers; tests swap one for a fake at this seam, the rest are built on the real core."""

    layer_card: layer_card_pb2_grpc.LayerCardServiceServicer | None = None
    placement: placement_pb2_grpc.PlacementServiceServicer | None = None
    tuning: tuning_pb2_grpc.TuningServiceServicer | None = None
    adapter: adapter_pb2_grpc.AdapterServiceServicer | None = None
    inference: inference_pb2_grpc.InferenceServiceServicer | None = None
    worker: worker_pb2_grpc.WorkerServiceServicer | None = None  # internal: the tuning workers' reports

    def complete(self, core: Core) -> Servicers:
        return Servicers(
            layer_card=self.layer_card or LayerCardServicer(core.cards, core.with_fleet_serving),
            placement=self.placement or PlacementServicer(core.planner),
            tuning=self.tuning or TuningServicer(core.tuning),
            adapter=self.adapter or AdapterServicer(core.adapters),
            inference=self.inference or InferenceServicer(core.inference),
            worker=self.worker or WorkerServicer(core.worker_reports),
        )

    def add_to(self, server: grpc.aio.Server) -> None:
        layer_card_pb2_grpc.add_LayerCardServiceServicer_to_server(self.layer_card, server)
        placement_pb2_grpc.add_PlacementServiceServicer_to_server(self.placement, server)
        tuning_pb2_grpc.add_TuningServiceServicer_to_server(self.tuning, server)
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(self.adapter, server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.inference, server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.worker, server)


class LayercardServer:
    """One gRPC server process: start() binds and marks itself SERVING; stop() drains and exits cleanly."""

    def __init__(self, config: ServiceConfig, servicers: Servicers | None = None) -> None:
        self.config = config
        self.data_dir_lock = DataDirLock(config.data_dir).acquire()  # DataDirInUse: before any store opens
        try:
            self.registry = new_registry(_version())
            self.core = Core.from_config(config, PrometheusTelemetry(self.registry))
            self.registry.register(self.core.state_collector())
            self.servicers = (servicers or Servicers()).complete(self.core)
        except BaseException:
            self.data_dir_lock.release()
            raise
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsEndpoint | None = None
        self._stopping: asyncio.Task | None = None

    async def start(self) -> int:
        cfg = self.config
        # Metrics outermost: they see the status the error interceptor set, and calls auth refused.
        interceptors: list[grpc.aio.ServerInterceptor] = [GrpcMetricsInterceptor(self.registry)]
        token = cfg.bearer_token
        if token:
            interceptors.append(AuthInterceptor(token))
        interceptors.append(ErrorInterceptor())
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # port 0 must give a port no other server shares
            ],
        )
        self.servicers.add_to(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        # Not serving until everything below is up; "" is the overall status.
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        try:
            self._bind()
            self.core.set_worker_endpoint(self._worker_endpoint())  # workers report to the port just bound
            # Only now, with the ports ours, may recovery change job states (and start workers).
            await asyncio.to_thread(self.core.start)
            await self.core.start_serving()
        except BaseException:
            await self._abandon_start()
            raise
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={"port": self.port, "metrics_port": self.metrics_port, "tls": cfg.tls_cert_file is not None},
        )
        return self.port

    def _bind(self) -> None:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert_file is not None:
                key, cert = cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes()
                self.port = self._server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc says only "Failed to bind to address"
            raise PortUnavailable(f"cannot bind the gRPC port {address}: in use, or not ours to bind") from exc
        if cfg.metrics_port >= 0:
            self._metrics = MetricsEndpoint(self.registry, cfg.host, cfg.metrics_port)
            try:
                self.metrics_port = self._metrics.start()
            except OSError as exc:
                self._metrics = None
                raise PortUnavailable(f"cannot bind the metrics port {cfg.host}:{cfg.metrics_port}: {exc}") from exc

    def _worker_endpoint(self) -> ServiceEndpoint:
        """How local workers reach this server: its bound port, on loopback when it listens on every address."""
        cfg = self.config
        host = cfg.host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        return ServiceEndpoint(address, ca_file=cfg.tls_cert_file)  # a self-signed certificate is its own CA

    async def _abandon_start(self) -> None:
        """A start that failed: what was opened is closed, the lock released; the job states are untouched."""
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        self._server = None  # never started: stop() has nothing to do
        try:
            await self.core.stop_serving()
            await asyncio.to_thread(self.core.close)
        finally:
            self.data_dir_lock.release()

    async def stop(self, grace: float | None = None) -> None:
        """Flips health to NOT_SERVING, refuses new RPCs, lets in-flight ones finish within the grace period."""
        if self._server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down", extra={"grace_seconds": grace})
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._metrics is not None:
            self._metrics.stop()
        await self.core.stop_serving()  # the reconcile loop and HTTP connections to vLLM belong to this loop
        await asyncio.to_thread(self.core.close)  # waits for tuning workers to exit (SIGTERM, then SIGKILL)
        self.data_dir_lock.release()  # last: the workers are gone, the next server may recover their jobs
        log.info("stopped")

    async def wait(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: ServiceConfig) -> None:
    # Signals only set an event, from before start: a SIGTERM at any moment means a graceful stop (not the
    # default kill before the handler exists), and no stop task runs unawaited, its exception unretrieved.
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    server = LayercardServer(config)
    port = await server.start()
    # Scripts and tests read this line to learn the bound port when --port 0 was given.
    print(f"layercard-server listening on {config.host}:{port}", flush=True)
    if server.metrics_port is not None:
        print(f"layercard-server metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
    # Only a signal stops this server. (Not server.wait() in a task to cancel: cancelling grpc's
    # wait_for_termination cancels the server's own shutdown future.)
    await stop_requested.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        config = ServiceConfig.load(argv)
        token_ok = config.bearer_token  # read a token file now: a bad one stops start-up, not the first RPC
        del token_ok
    except ConfigError as exc:
        print(f"layercard-server: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except DataDirInUse as exc:
        print(f"layercard-server: {exc}", file=sys.stderr)
        return EXIT_DATA_DIR_IN_USE
    except PortUnavailable as exc:
        print(f"layercard-server: {exc}", file=sys.stderr)
        return EXIT_PORT_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
