"""Service settings: read once from flags and ``LAYERCARD_*`` environment variables, then passed down typed.

Precedence: command-line flag, then environment variable, then the default. Every setting has both spellings:
``--metrics-port`` and ``LAYERCARD_METRICS_PORT``. Lists in the environment are comma-separated.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["ConfigError", "ServiceConfig"]

ENV_PREFIX = "LAYERCARD_"


class ConfigError(ValueError):
    """A setting is malformed; the server refuses to start rather than guess."""


@dataclass(frozen=True)
class ServiceConfig:
    # Network. port 0 picks a free port (the server prints the one it bound).
    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics on its own HTTP port; -1 turns it off, 0 picks a free port.
    metrics_port: int = -1
    # Where state (SQLite) and artifacts (cards, adapters) live.
    data_dir: Path = Path(".layercard")
    # Models and datasets load only from under these roots (PERMISSION_DENIED otherwise); built-ins always load.
    model_roots: tuple[Path, ...] = ()
    dataset_roots: tuple[Path, ...] = ()
    # vLLM servers of the fleet: base URLs (e.g. http://127.0.0.1:8000), and/or "host:port" of a DNS name that
    # resolves to every server (a Kubernetes headless Service), re-resolved every reconcile round.
    vllm_urls: tuple[str, ...] = ()
    vllm_dns: str = ""
    # What the fleet's servers were started with (vLLM does not report it): the base model, as layercard names
    # models, and --lora-target-modules (empty: every LoRA-capable module). Their --max-lora-rank is
    # max_lora_rank below.
    vllm_model: str = "builtin:tiny"
    vllm_lora_target_modules: tuple[str, ...] = ()
    # How often the fleet is made to match the desired deployments, and how long a version swap waits for the
    # old version's requests in flight before unloading it.
    reconcile_interval_seconds: float = 5.0
    drain_timeout_seconds: float = 30.0
    # Optional bearer token: every RPC but health then needs metadata "authorization: Bearer <token>".
    auth_token: str | None = None
    auth_token_file: Path | None = None
    # Optional TLS: both files or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Largest request or response message.
    max_message_bytes: int = 64 * 1024 * 1024
    # On SIGTERM: health flips to NOT_SERVING, in-flight RPCs get this long to finish, then the process exits.
    shutdown_grace_seconds: float = 30.0
    # Layer Cards computed at once, and how many more may wait (RESOURCE_EXHAUSTED past that).
    max_concurrent_cards: int = 1
    card_queue_size: int = 4
    # Tuning jobs trained at once (one worker process each), how many more may wait (RESOURCE_EXHAUSTED past
    # that), and the largest LoRA rank a job may train: the serving engine's maximum (vLLM's max_lora_rank).
    max_concurrent_jobs: int = 1
    job_queue_size: int = 16
    max_lora_rank: int = 16
    # torch threads per tuning worker; 0: the machine's cores divided by max_concurrent_jobs. More threads than
    # free cores make every step wait on descheduled threads (20x slower measured on a busy 2-core machine).
    job_threads: int = 0
    # Where tuning jobs run: "local" (a worker process each, on this machine) or "kubernetes" (a batch/v1 Job
    # each; see tune/k8s_manifest.py). The Kubernetes runner needs data_dir (absolute) on a ReadWriteMany volume,
    # k8s_data_claim, mounted at the same path in this pod (the trainers read and write the artifacts there; only
    # this pod opens state.db), and k8s_service_address: host:port where trainer pods reach this service's gRPC
    # port, to report through (e.g. its Service, layercard.<namespace>.svc:50051). k8s_namespace "": this pod's
    # own. Quantities as Kubernetes writes them ("2", "500m", "8Gi"; "" for no limit). k8s_node_selector: "k=v,k2=v2";
    # k8s_tolerations: "key=value:Effect" items; k8s_read_only_claims: "claim=/mount/path" items (models,
    # datasets: model_roots and dataset_roots must exist at the same paths in the trainer pods).
    job_runner: str = "local"
    k8s_namespace: str = ""
    k8s_trainer_image: str = ""
    k8s_data_claim: str = ""
    k8s_service_address: str = ""
    k8s_service_account: str = ""
    k8s_gpus: int = 0
    k8s_gpu_resource: str = "nvidia.com/gpu"
    k8s_cpu_request: str = "1"
    k8s_cpu_limit: str = ""
    k8s_memory_request: str = "4Gi"
    k8s_memory_limit: str = ""
    k8s_node_selector: str = ""
    k8s_tolerations: tuple[str, ...] = ()
    k8s_read_only_claims: tuple[str, ...] = ()
    k8s_run_as_user: int = 10001  # the UID of deploy/docker/Dockerfile and of the service pod
    k8s_active_deadline_seconds: int = 0
    k8s_ttl_seconds_after_finished: int = 86_400
    k8s_poll_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "json"  # "json" for machines, "text" for people

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be -1 (off) or in 0..65535, got {self.metrics_port}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError("shutdown_grace_seconds must be >= 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ConfigError("set auth_token or auth_token_file, not both")
        if self.max_concurrent_cards < 1 or self.card_queue_size < 0:
            raise ConfigError("max_concurrent_cards must be >= 1 and card_queue_size >= 0")
        if self.max_concurrent_jobs < 1 or self.job_queue_size < 0:
            raise ConfigError("max_concurrent_jobs must be >= 1 and job_queue_size >= 0")
        if self.job_threads < 0:
            raise ConfigError(f"job_threads must be >= 0 (0: automatic), got {self.job_threads}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.job_runner not in ("local", "kubernetes"):
            raise ConfigError(f"job_runner must be 'local' or 'kubernetes', got {self.job_runner!r}")
        if self.k8s_poll_seconds <= 0:
            raise ConfigError(f"k8s_poll_seconds must be > 0, got {self.k8s_poll_seconds}")
        if self.job_runner == "kubernetes":
            from layercard_service.tune.k8s_manifest import kubernetes_settings  # imports ConfigError from here

            kubernetes_settings(self)  # checks every k8s_* setting; raises ConfigError
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        host, _, port = self.vllm_dns.rpartition(":")
        if self.vllm_dns and not (host.strip() and port.isdigit()):
            raise ConfigError(f"vllm_dns must be host:port, got {self.vllm_dns!r}")
        if self.reconcile_interval_seconds <= 0 or self.drain_timeout_seconds < 0:
            raise ConfigError("reconcile_interval_seconds must be > 0 and drain_timeout_seconds >= 0")
        for url in self.vllm_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"vllm_urls entries must be http(s) URLs, got {url!r}")

    @property
    def bearer_token(self) -> str | None:
        """The token clients must present, read from the file when one is configured (Kubernetes Secrets)."""
        if self.auth_token_file is not None:
            try:
                token = self.auth_token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read auth_token_file {self.auth_token_file}: {exc}") from exc
            if not token:
                raise ConfigError(f"auth_token_file {self.auth_token_file} is empty")
            return token
        return self.auth_token or None

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        """Builds the config from flags over environment variables over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        args = _parser().parse_args(argv)
        for name, raw in vars(args).items():
            if raw is not None:
                values[name] = _parse(name, _field_type(name), raw)
        return cls(**values)


def _field_type(name: str) -> str:
    return next(f.type for f in fields(ServiceConfig) if f.name == name)


def _parse(name: str, type_name: str, raw: str) -> object:
    """Converts one setting's text into its field's type; the annotations are strings (postponed evaluation)."""
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "Path":
            return Path(raw)
        if type_name == "Path | None":
            return Path(raw) if raw else None
        if type_name == "tuple[Path, ...]":
            return tuple(Path(p) for p in raw.split(",") if p)
        if type_name == "tuple[str, ...]":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot parse {raw!r} as {type_name}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layercard-server",
        description="The layercard gRPC service. Every flag also reads from LAYERCARD_<NAME> in the environment.",
        epilog="exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 bad settings, 3 the data dir is in use by another "
        "server (one data dir, one server), 4 a port cannot be bound",
    )
    for f in fields(ServiceConfig):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, help=f"env {ENV_PREFIX}{f.name.upper()}")
    return parser
