"""Service settings: read once from flags and ``LAYERCARD_*`` environment variables, then passed down typed.

Precedence: command-line flag, then environment variable, then the default. Every setting has both spellings:
``--metrics-port`` and ``LAYERCARD_METRICS_PORT``. Lists in the environment are comma-separated.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any

from layercard_service.runners.kubernetes.settings import FLAG_PREFIX as K8S_PREFIX
from layercard_service.runners.kubernetes.settings import KubernetesSettings
from layercard_service.serving.pool_spec import DEFAULT_POOL, PoolSpec, parse_pools
from layercard_service.settings import ConfigError, setting, setting_help, setting_parser

__all__ = ["ConfigError", "KubernetesSettings", "ServiceConfig"]

ENV_PREFIX = "LAYERCARD_"
# Below the 100 connections a replica's client holds (serving/vllm_api.py): a probe's requests all run at once.
MAX_PROBE_STREAMS = 64
MAX_PROBE_SAMPLES = 100  # pairs of one latency probe: a probing deploy's time grows with them


@dataclass(frozen=True)
class ServiceConfig:
    host: str = setting("127.0.0.1", "address the gRPC server binds")
    port: int = setting(50051, "gRPC port; 0 picks a free port (the server prints the one it bound)")
    metrics_port: int = setting(-1, "Prometheus /metrics on its own HTTP port; -1 turns it off, 0 picks a free port")
    data_dir: Path = setting(Path(".layercard"), "where state (SQLite) and artifacts (cards, adapters) live")
    model_roots: tuple[Path, ...] = setting(
        (), "comma-separated directories models load from (PERMISSION_DENIED elsewhere); built-ins always load"
    )
    dataset_roots: tuple[Path, ...] = setting((), "comma-separated directories datasets load from")
    vllm_urls: tuple[str, ...] = setting((), "the fleet's vLLM servers: comma-separated base URLs (http://host:port)")
    vllm_dns: str = setting(
        "",
        "host:port of a DNS name that resolves to every vLLM server (a Kubernetes headless Service), "
        "re-resolved every reconcile round",
    )
    vllm_model: str = setting(
        "builtin:tiny",
        "the base model the fleet's servers were started with (vLLM does not report it), as layercard names models",
    )
    vllm_lora_target_modules: tuple[str, ...] = setting(
        (),
        "the fleet's --lora-target-modules (empty: every LoRA-capable module); their --max-lora-rank is max_lora_rank",
    )
    vllm_pools: tuple[PoolSpec, ...] = setting(
        (),
        'serving pools, each a set of vLLM replicas with its own LoRA settings, as a JSON list: [{"name": "lean", '
        '"dns": "vllm-lean:8000", "target_modules": ["o_proj"], "max_lora_rank": 8}, {"name": "full", "urls": '
        '["http://vllm:8000"]}] (serving/pool_spec.py); instead of vllm_urls, vllm_dns and vllm_lora_target_modules, '
        'which make one pool named "default"',
        parse=parse_pools,
    )
    reconcile_interval_seconds: float = setting(5.0, "how often the fleet is made to match the desired deployments")
    drain_timeout_seconds: float = setting(
        30.0, "how long a version swap waits for the old version's requests in flight before unloading it"
    )
    serving_calibration_min_probes: int = setting(
        3, "latency probes of a serving shape (model, LoRA settings, adapter rank) after which deploys skip the probe"
    )
    serving_calibration_max_age_seconds: float = setting(
        7 * 86400.0, "latency probes older than this do not calibrate a serving shape"
    )
    serving_probe_concurrency: tuple[int, ...] = setting(
        (),
        "comma-separated stream counts (2..64) a deploy's latency probe also measures at, after one stream: the "
        "figures a serving budget at that concurrency is planned with; each adds a probe to a deploy that probes",
        parse=lambda text: tuple(int(p) for p in text.split(",") if p.strip()),
    )
    serving_probe_samples: int = setting(
        5,
        f"interleaved base/adapter pairs (1..{MAX_PROBE_SAMPLES}) a deploy's latency probe times: more is a steadier "
        "figure (a tight budget's check) and a slower probing deploy",
    )
    live_window_seconds: float = setting(300.0, "how long a deploy with rollback_over_budget is judged on live traffic")
    live_min_requests: int = setting(20, "requests of the version and of the base model a live verdict needs")
    auth_token: str | None = setting(
        None, 'bearer token: every RPC but health then needs metadata "authorization: Bearer <token>"'
    )
    auth_token_file: Path | None = setting(None, "a file holding the bearer token (a Kubernetes Secret)")
    tls_cert_file: Path | None = setting(None, "TLS certificate (PEM); with tls_key_file: both or neither")
    tls_key_file: Path | None = setting(None, "TLS private key (PEM); with tls_cert_file: both or neither")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest request or response message, in bytes")
    shutdown_grace_seconds: float = setting(
        30.0, "on SIGTERM health flips to NOT_SERVING and in-flight RPCs get this long to finish"
    )
    max_concurrent_cards: int = setting(1, "Layer Cards computed at once")
    card_queue_size: int = setting(4, "Layer Cards that may wait (RESOURCE_EXHAUSTED past that)")
    max_concurrent_jobs: int = setting(1, "tuning jobs trained at once (one worker process or Kubernetes Job each)")
    job_queue_size: int = setting(16, "tuning jobs that may wait (RESOURCE_EXHAUSTED past that)")
    max_lora_rank: int = setting(
        16, "the largest LoRA rank a job may train: the serving engine's maximum (vLLM's --max-lora-rank)"
    )
    prefix_cache_memory_bytes: int = setting(
        1 << 30,  # the worker's own default (trainer/prefix_pricing.py DEFAULT_MAX_MEMORY_BYTES)
        "the frozen-prefix cache's bound in a tuning worker's memory (a larger cache goes to a file); the planner "
        "prices the cache against the same bound",
    )
    # More threads than free cores make every step wait on descheduled threads (20x slower measured on a busy
    # 2-core machine).
    job_threads: int = setting(
        0, "torch threads per local tuning worker; 0: the machine's cores divided by max_concurrent_jobs"
    )
    job_runner: str = setting(
        "local",
        "where tuning jobs run: local (a worker process each, on this machine) or kubernetes (a batch/v1 Job "
        "each, with the --k8s-* settings)",
    )
    # Flags and variables --k8s-<name> / LAYERCARD_K8S_<NAME>: the runner's own settings
    # (runners/kubernetes/settings.py).
    kubernetes: KubernetesSettings = setting(help="the Kubernetes runner's settings", factory=KubernetesSettings)
    log_level: str = setting("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = setting("json", "json for machines, text for people")

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
        if self.prefix_cache_memory_bytes < 0:
            raise ConfigError(f"prefix_cache_memory_bytes must be >= 0, got {self.prefix_cache_memory_bytes}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.job_runner not in ("local", "kubernetes"):
            raise ConfigError(f"job_runner must be 'local' or 'kubernetes', got {self.job_runner!r}")
        if self.job_runner == "kubernetes":
            self.kubernetes.check(self.data_dir)
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        host, _, port = self.vllm_dns.rpartition(":")
        if self.vllm_dns and not (host.strip() and port.isdigit()):
            raise ConfigError(f"vllm_dns must be host:port, got {self.vllm_dns!r}")
        if self.reconcile_interval_seconds <= 0 or self.drain_timeout_seconds < 0:
            raise ConfigError("reconcile_interval_seconds must be > 0 and drain_timeout_seconds >= 0")
        if self.serving_calibration_min_probes < 1 or self.serving_calibration_max_age_seconds < 0:
            raise ConfigError(
                "serving_calibration_min_probes must be >= 1 and serving_calibration_max_age_seconds >= 0"
            )
        if any(not 2 <= c <= MAX_PROBE_STREAMS for c in self.serving_probe_concurrency):
            raise ConfigError(
                f"serving_probe_concurrency entries must be in 2..{MAX_PROBE_STREAMS}, got "
                f"{self.serving_probe_concurrency}"
            )
        if not 1 <= self.serving_probe_samples <= MAX_PROBE_SAMPLES:
            raise ConfigError(
                f"serving_probe_samples must be in 1..{MAX_PROBE_SAMPLES}, got {self.serving_probe_samples}"
            )
        if self.live_window_seconds <= 0 or self.live_min_requests < 1:
            raise ConfigError("live_window_seconds must be > 0 and live_min_requests >= 1")
        for url in self.vllm_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"vllm_urls entries must be http(s) URLs, got {url!r}")
        if self.vllm_pools and (self.vllm_urls or self.vllm_dns or self.vllm_lora_target_modules):
            raise ConfigError(
                "vllm_pools names every pool's replicas and LoRA settings: leave vllm_urls, vllm_dns and "
                "vllm_lora_target_modules unset with it"
            )

    def serving_pools(self) -> tuple[PoolSpec, ...]:
        """The pools the fleet is made of, every max rank filled in: vllm_pools, or the one "default" pool."""
        pools = self.vllm_pools or (
            PoolSpec(DEFAULT_POOL, self.vllm_urls, self.vllm_dns, self.vllm_lora_target_modules),
        )
        return tuple(dataclasses.replace(p, max_lora_rank=p.max_lora_rank or self.max_lora_rank) for p in pools)

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
        args = vars(_parser().parse_args(argv))
        values: dict[str, dict[str, object]] = {"": {}, K8S_PREFIX: {}}
        for prefix, f in _settings():
            name = prefix + f.name
            raw = args.get(name)
            if raw is None:
                raw = environ.get(ENV_PREFIX + name.upper()) or None
            if raw is not None:
                values[prefix][f.name] = _parse(name, f, raw)
        return cls(**values[""], kubernetes=KubernetesSettings(**values[K8S_PREFIX]))


def _settings() -> Iterator[tuple[str, Field[Any]]]:
    """Every setting with the prefix of its name: the service's own, then the Kubernetes runner's (``k8s_``)."""
    for f in fields(ServiceConfig):
        if f.name == "kubernetes":
            yield from ((K8S_PREFIX, k) for k in fields(KubernetesSettings))
        else:
            yield "", f


def _parse(name: str, f: Field[Any], raw: str) -> object:
    """Converts one setting's text into its field's value; the annotations are strings (postponed evaluation)."""
    parse, type_name = setting_parser(f), f.type
    try:
        if parse is not None:
            return parse(raw)
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
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot parse {raw!r} as {type_name}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layercard-server",
        description="The layercard gRPC service. Every flag also reads from LAYERCARD_<NAME> in the environment.",
        epilog="exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 bad settings, 3 the data dir is in use by another "
        "server (one data dir, one server), 4 a port cannot be bound",
    )
    groups = {"": parser.add_argument_group("settings"), K8S_PREFIX: parser.add_argument_group(
        "Kubernetes runner (--job-runner kubernetes)", "Quantities as Kubernetes writes them: 2, 500m, 8Gi."
    )}  # fmt: skip
    for prefix, f in _settings():
        name = prefix + f.name
        default = "" if f.default in (None, "", ()) or callable(f.default_factory) else f" (default: {f.default})"
        help_text = f"{setting_help(f)}{default}. env {ENV_PREFIX}{name.upper()}"
        groups[prefix].add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)
    return parser
