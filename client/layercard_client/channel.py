"""Channel construction shared by the sync and async clients: address, TLS, token, limits and retries.

Retries are gRPC's own (the service config's ``retryPolicy``), not a loop in Python, so they behave the same
in both clients, honour the call's deadline across all attempts, and only replay a call that has not yet
received a response: a server stream is never replayed after its first message arrived. They apply to
UNAVAILABLE only (the server was not reached or went away), and only to idempotent methods, where
running a call twice is harmless; see ``IDEMPOTENT_METHODS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from layercard.v1 import (
    adapter_pb2_grpc,
    inference_pb2_grpc,
    layer_card_pb2_grpc,
    placement_pb2_grpc,
    tuning_pb2_grpc,
)
from layercard_client.errors import ClientConfigError

__all__ = [
    "DEFAULT",
    "DEFAULT_ADDRESS",
    "IDEMPOTENT_METHODS",
    "ClientSettings",
    "RetryPolicy",
    "Stubs",
    "Timeout",
    "channel_options",
    "open_aio_channel",
    "open_channel",
    "resolve_settings",
    "service_config",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
HEALTH_SERVICE = "grpc.health.v1.Health"
_PACKAGE = "layercard.v1"

# Methods a client may safely send twice. Reads and watches have no effect; Cancel, Deploy and Undeploy
# converge on a desired state; Plan is a pure function of a stored card; Generate produces a fresh
# completion, which costs a little but changes nothing. CreateTuningJob is here because the client always
# sends a request_id (uuid4 when the caller gave none) and the server returns the first job for a repeated
# request_id. ComputeLayerCard is left out on purpose: it is long work whose retry could silently restart a
# computation; callers retry it themselves, and the store's fingerprint cache makes that cheap.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "LayerCardService": ("GetLayerCard", "ListLayerCards"),
    "PlacementService": ("PlanPlacement",),
    "TuningService": ("CreateTuningJob", "GetTuningJob", "ListTuningJobs", "CancelTuningJob", "WatchTuningJob"),
    "AdapterService": ("DeployAdapter", "UndeployAdapter", "ListAdapters"),
    "InferenceService": ("Generate", "GenerateStream"),
}


class _Default:
    """Marks "use the client's default deadline", since None already means "no deadline"."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
# A per-call deadline in seconds: a number, None for no deadline, or DEFAULT for the client's default.
Timeout = float | None | _Default


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE on idempotent methods.

    Attempt n waits a random time in [0, min(initial_backoff * multiplier**(n-1), max_backoff)] (gRPC's
    jittered backoff). gRPC caps attempts at 5, counting the first one, so ``max_attempts`` is 2..5.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ClientConfigError(f"retry max_attempts must be in 2..5 (gRPC's limit), got {self.max_attempts}")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ClientConfigError("retry backoffs must satisfy 0 < initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ClientConfigError("retry backoff_multiplier must be >= 1")

    def as_service_config(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:.3f}s",
            "maxBackoff": f"{self.max_backoff:.3f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }


@dataclass(frozen=True)
class ClientSettings:
    """Everything a client needs to reach the service; read once and passed down typed.

    ``token`` travels as ``authorization: Bearer <token>``: as call credentials on TLS channels (gRPC then
    refuses to send it in the clear), as plain metadata on insecure ones, e.g. localhost or a mesh sidecar.
    ``timeout`` is the default deadline of unary calls; ``stream_timeout`` that of streams (watching a job
    or computing a card takes as long as it takes, so None: no deadline). ``retry=None`` turns retries off.
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    # Name to verify the server certificate against, when it differs from the address' host.
    tls_server_name: str | None = None
    timeout: float | None = 30.0
    stream_timeout: float | None = None
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    max_message_bytes: int = 64 * 1024 * 1024
    # Further raw channel arguments, appended last so they win.
    extra_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.address or not self.address.strip():
            raise ClientConfigError("address must not be empty")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ClientConfigError("client_cert_file and client_key_file go together: set both or neither")
        for name in ("timeout", "stream_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ClientConfigError(f"{name} must be positive or None, got {value}")
        if self.max_message_bytes < 1024:
            raise ClientConfigError("max_message_bytes must be at least 1024")

    @property
    def secure(self) -> bool:
        """TLS is on when asked for, or implied by a CA file or client certificate."""
        return self.tls or self.ca_file is not None or self.client_cert_file is not None

    def with_overrides(self, **overrides: Any) -> ClientSettings:
        """A copy with the given fields replaced; arguments left at DEFAULT keep the current value."""
        changes = {key: value for key, value in overrides.items() if value is not DEFAULT}
        return replace(self, **changes) if changes else self

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every call carries: the token on insecure channels (TLS ones use call credentials)."""
        if self.token and not self.secure:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def deadline(self, timeout: Timeout, *, stream: bool = False) -> float | None:
        if timeout is DEFAULT:
            return self.stream_timeout if stream else self.timeout
        return timeout  # type: ignore[return-value]


def resolve_settings(
    settings: ClientSettings | None,
    *,
    address: str | None,
    token: str | None,
    tls: bool | None,
    ca_file: str | Path | None,
    timeout: Any,
    retry: Any,
) -> ClientSettings:
    """The clients' constructor shortcuts applied over ``settings`` (None and DEFAULT keep the setting)."""
    return (settings or ClientSettings()).with_overrides(
        address=address if address is not None else DEFAULT,
        token=token if token is not None else DEFAULT,
        tls=tls if tls is not None else DEFAULT,
        ca_file=Path(ca_file) if ca_file is not None else DEFAULT,
        timeout=timeout,
        retry=retry,
    )


def _client_version() -> str:
    try:
        return importlib_metadata.version("layercard-client")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def service_config(retry: RetryPolicy | None) -> dict[str, Any]:
    """The channel's service config: the retry policy on idempotent methods and health, nothing elsewhere."""
    if retry is None:
        return {"methodConfig": []}
    names: list[dict[str, str]] = [
        {"service": f"{_PACKAGE}.{service}", "method": method}
        for service, methods in IDEMPOTENT_METHODS.items()
        for method in methods
    ]
    names.append({"service": HEALTH_SERVICE})  # every method of the service
    return {"methodConfig": [{"name": names, "retryPolicy": retry.as_service_config()}]}


def channel_options(settings: ClientSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(settings.retry))),
        ("grpc.enable_retries", 1 if settings.retry is not None else 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.primary_user_agent", f"layercard-client/{_client_version()}"),
    ]
    if settings.retry is not None:
        # After a failed connect the channel waits its reconnect backoff (1 s, growing to 120 s by default)
        # before dialling again, and fails RPCs fast meanwhile; without aligning it with the retry backoff,
        # every retry would land in that window and a server that just came up would never be reached.
        options += [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(settings.retry.initial_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(settings.retry.max_backoff * 1000))),
        ]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    options.extend(settings.extra_options)
    return options


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {what} {path}: {exc}") from exc


def channel_credentials(settings: ClientSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials (system roots unless a CA file is given) carrying the token; None when insecure."""
    if not settings.secure:
        return None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.ca_file, "CA file"),
        private_key=_read(settings.client_key_file, "client key file"),
        certificate_chain=_read(settings.client_cert_file, "client certificate file"),
    )
    if settings.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.token)
        )
    return credentials


def open_channel(settings: ClientSettings) -> grpc.Channel:
    credentials = channel_credentials(settings)
    options = channel_options(settings)
    if credentials is None:
        return grpc.insecure_channel(settings.address, options=options)
    return grpc.secure_channel(settings.address, credentials, options=options)


def open_aio_channel(settings: ClientSettings) -> grpc.aio.Channel:
    credentials = channel_credentials(settings)
    options = channel_options(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(settings.address, options=options)
    return grpc.aio.secure_channel(settings.address, credentials, options=options)


class Stubs:
    """The generated stubs over one channel; the same class serves sync and ``grpc.aio`` channels."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self._by_service = {
            "LayerCardService": layer_card_pb2_grpc.LayerCardServiceStub(channel),
            "PlacementService": placement_pb2_grpc.PlacementServiceStub(channel),
            "TuningService": tuning_pb2_grpc.TuningServiceStub(channel),
            "AdapterService": adapter_pb2_grpc.AdapterServiceStub(channel),
            "InferenceService": inference_pb2_grpc.InferenceServiceStub(channel),
        }
        self.health = health_pb2_grpc.HealthStub(channel)

    def resolve(self, rpc: str) -> tuple[Any, str]:
        """``"TuningService/GetTuningJob"`` -> (the stub's callable, "/layercard.v1.TuningService/GetTuningJob")."""
        service, method = rpc.split("/")
        return getattr(self._by_service[service], method), f"/{_PACKAGE}.{service}/{method}"
