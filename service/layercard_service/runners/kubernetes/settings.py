"""The Kubernetes runner's settings: ``--k8s-<name>`` flags and ``LAYERCARD_K8S_<NAME>`` environment variables.

``ServiceConfig.kubernetes`` holds them (config.py reads them with the service's other settings); this module
owns what they are, their help text and their checks, and imports nothing of config.py. Text that is a list or a
map (node selector, tolerations, read-only claims, colocation labels) is parsed when the settings are read; the
other checks run only when the Kubernetes runner is used (``check``), so a local server ignores the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from layercard_service.settings import ConfigError, setting

__all__ = [
    "FLAG_PREFIX",
    "SERVICE_ACCOUNT_NAMESPACE",
    "KubernetesSettings",
    "parse_claims",
    "parse_node_selector",
    "parse_toleration",
    "parse_tolerations",
]

FLAG_PREFIX = "k8s_"  # the settings' names in flags, environment variables and messages: k8s_<field>
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# Always fullmatch: "$" accepts a trailing newline, which Kubernetes does not.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_QUANTITY = re.compile(r"[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_QUANTITY_TEXT = "a Kubernetes quantity like '2', '500m' or '8Gi'"


def parse_node_selector(text: str, setting: str = "k8s_node_selector") -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}``; keys and values as Kubernetes labels allow them."""
    selector: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{setting} entries must be key=value, got {item!r}")
        _check_label_key(key.strip(), setting)
        _check(LABEL_VALUE, value.strip(), f"{setting} value")
        selector[key.strip()] = value.strip()
    return selector


def parse_toleration(text: str) -> dict[str, str]:
    """A toleration in ``kubectl taint`` spelling: ``key=value:Effect``, ``key:Effect``, ``key=value`` or ``key``.

    With a value the operator is Equal, without one Exists; without an effect it tolerates every effect.
    """
    spec, _, effect = text.strip().partition(":")
    key, sep, value = spec.partition("=")
    _check_label_key(key, "k8s_tolerations")
    toleration = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        _check(LABEL_VALUE, value, "k8s_tolerations value")
        toleration["value"] = value
    if effect:
        if effect not in TAINT_EFFECTS:
            raise ConfigError(f"k8s_tolerations effect must be one of {TAINT_EFFECTS}, got {effect!r}")
        toleration["effect"] = effect
    return toleration


def parse_tolerations(text: str) -> tuple[dict[str, str], ...]:
    """Comma-separated tolerations (``parse_toleration``)."""
    return tuple(parse_toleration(t) for t in _items(text))


def parse_claims(text: str) -> tuple[tuple[str, Path], ...]:
    """Comma-separated ``claim=/mount/path`` items -> ``((claim, path), ...)``."""
    claims = []
    for item in _items(text):
        claim, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"k8s_read_only_claims entries must be claim=/mount/path, got {item!r}")
        claims.append((claim.strip(), Path(path.strip())))
    return tuple(claims)


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how trainer Jobs run. Quantities as Kubernetes writes them ("2", "500m", "8Gi")."""

    namespace: str = setting("", "namespace of the trainer Jobs; empty: this pod's own")
    trainer_image: str = setting("", "the image that runs the tuning worker (needed by job_runner kubernetes)")
    data_claim: str = setting(
        "",
        "the ReadWriteMany PersistentVolumeClaim holding data_dir, mounted at the same path (data_dir, absolute) "
        "in this pod and the trainer pods; the trainers write datasets, checkpoints and adapters there, never "
        "state.db (needed by job_runner kubernetes)",
    )
    service_address: str = setting(
        "",
        "host:port where trainer pods reach this service's gRPC port to report through (its Service, e.g. "
        "layercard.<namespace>.svc:50051)",
    )
    service_account: str = setting("", "the trainer pods' ServiceAccount; empty: the namespace's default")
    gpus: int = setting(0, "GPUs per trainer pod; more than one trains data-parallel, one rank per GPU (torchrun)")
    gpu_resource: str = setting("nvidia.com/gpu", "the extended resource a GPU is requested as")
    cpu_request: str = setting("1", "a trainer pod's CPU request")
    cpu_limit: str = setting("", "a trainer pod's CPU limit; empty: none")
    memory_request: str = setting("4Gi", "a trainer pod's memory request")
    memory_limit: str = setting("", "a trainer pod's memory limit; empty: none")
    node_selector: Mapping[str, str] = setting(
        help="node labels the trainer pods need: k=v,k2=v2", factory=dict, parse=parse_node_selector
    )
    tolerations: tuple[Mapping[str, str], ...] = setting(
        (), "taints the trainer pods tolerate: key=value:Effect, key:Effect, key=value or key items",
        parse=parse_tolerations,
    )  # fmt: skip
    read_only_claims: tuple[tuple[str, Path], ...] = setting(
        (),
        "claim=/mount/path items mounted read-only in the trainer pods (models, datasets: model_roots and "
        "dataset_roots must exist at the same paths there)",
        parse=parse_claims,
    )
    run_as_user: int = setting(
        10001, "UID, GID and fsGroup of the trainer pods: the service pod's (deploy/), so both write the artifacts"
    )
    active_deadline_seconds: int = setting(0, "a trainer Job's deadline in seconds; 0: none")
    ttl_seconds_after_finished: int = setting(86_400, "how long a finished trainer Job is kept, in seconds")
    poll_seconds: float = setting(5.0, "how often the runner lists its Jobs, in seconds")

    def __post_init__(self) -> None:
        if self.poll_seconds <= 0:
            raise ConfigError(f"k8s_poll_seconds must be > 0, got {self.poll_seconds}")

    def check(self, data_dir: Path) -> None:
        """Every setting the Kubernetes runner needs, checked: ConfigError stops the server at start."""
        if not self.trainer_image:
            raise ConfigError("job_runner 'kubernetes' needs k8s_trainer_image: the image that runs the worker")
        if not self.data_claim:
            raise ConfigError("job_runner 'kubernetes' needs k8s_data_claim: the ReadWriteMany PVC holding data_dir")
        if self.namespace:  # "": this pod's own, read by ``resolved``
            _check(DNS_LABEL, self.namespace, "k8s_namespace")
        if any(c.isspace() for c in self.trainer_image):
            raise ConfigError(f"k8s_trainer_image must be an image reference, got {self.trainer_image!r}")
        _check(DNS_SUBDOMAIN, self.data_claim, "k8s_data_claim")
        host, _, port = self.service_address.rpartition(":")
        if not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536) or any(
            c.isspace() for c in self.service_address
        ):
            raise ConfigError(
                "k8s_service_address must be the host:port where trainer pods reach the service's gRPC port "
                f"(e.g. layercard.<namespace>.svc:50051), got {self.service_address!r}"
            )
        if not data_dir.is_absolute():
            raise ConfigError(
                f"data_dir must be an absolute path with the Kubernetes runner (the trainer pods mount the data "
                f"volume at the same path), got {str(data_dir)!r}"
            )
        if self.service_account:
            _check(DNS_SUBDOMAIN, self.service_account, "k8s_service_account")
        if self.gpus < 0:
            raise ConfigError(f"k8s_gpus must be >= 0, got {self.gpus}")
        prefix, _, name = self.gpu_resource.rpartition("/")
        if not (prefix and DNS_SUBDOMAIN.fullmatch(prefix) and LABEL_NAME.fullmatch(name)):
            raise ConfigError(f"k8s_gpu_resource must look like 'nvidia.com/gpu', got {self.gpu_resource!r}")
        for name, value in (("k8s_cpu_request", self.cpu_request), ("k8s_memory_request", self.memory_request)):
            _check(_QUANTITY, value, name, _QUANTITY_TEXT)
        for name, value in (("k8s_cpu_limit", self.cpu_limit), ("k8s_memory_limit", self.memory_limit)):
            if value:
                _check(_QUANTITY, value, name, _QUANTITY_TEXT + ", or empty")
        for claim, path in self.read_only_claims:
            _check(DNS_SUBDOMAIN, claim, "k8s_read_only_claims")
            if not path.is_absolute():
                raise ConfigError(f"k8s_read_only_claims: the mount path of {claim!r} must be absolute, got {path}")
        if self.run_as_user < 1:
            raise ConfigError(f"k8s_run_as_user must be >= 1 (the pods run as non-root), got {self.run_as_user}")
        if self.active_deadline_seconds < 0 or self.ttl_seconds_after_finished < 0:
            raise ConfigError("k8s_active_deadline_seconds and k8s_ttl_seconds_after_finished must be >= 0")

    def resolved(self, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> KubernetesSettings:
        """These settings with the namespace filled in: an empty one is the service pod's own (or "default")."""
        if self.namespace:
            return self
        try:
            namespace = namespace_file.read_text().strip() or "default"
        except OSError:
            namespace = "default"
        _check(DNS_LABEL, namespace, "k8s_namespace")
        return replace(self, namespace=namespace)


def _items(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _check_label_key(key: str, setting: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if not LABEL_NAME.fullmatch(name) or (slash and not DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ConfigError(f"{setting}: {key!r} is not a valid label key")


def _check(pattern: re.Pattern[str], value: str, setting: str, what: str = "") -> None:
    if not pattern.fullmatch(value):
        raise ConfigError(f"{setting} must be {what or 'a valid Kubernetes name'}, got {value!r}")
