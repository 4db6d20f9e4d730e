"""The Kubernetes Job that runs one tuning job's worker, as plain data: settings, names and the manifest.

No Kubernetes client and no torch here: ``job_manifest`` is a pure function of the job id and the settings, so
tests validate it offline against the API's schemas (kubernetes-validate) and a reviewer reads it like YAML.

What the Job looks like, and why:
- the container runs the worker exactly as the local runner does (``worker_command``'s arguments), with
  ``python`` from the trainer image in place of the service's interpreter;
- the worker reports through the service's internal gRPC API (``service_address``: the service's in-cluster
  address, e.g. its Service ``layercard.<namespace>.svc:50051``), never into ``state.db``: only the service
  pod opens the database. Its credential, fresh per attempt, is a Secret of its own (``worker_secret``, named
  as the Job) that the container reads as ``LAYERCARD_WORKER_TOKEN``: not in the Job's spec, which anyone who
  may read Jobs sees. Trainer pods may run on any node;
- the service's ``data_dir`` (a ReadWriteMany PersistentVolumeClaim) is mounted at the same path in trainer
  pods for the files a worker reads and writes: inline datasets, checkpoints and the staged adapter, which the
  service then publishes (a rename on the same volume);
- ``backoffLimit: 0``: Kubernetes never runs a failed worker again by itself; the service decides. A failed
  Job fails the job (WORKER_DIED); a RUNNING job whose Job vanished while the service was down is created
  again at the next start and resumes from its last checkpoint. One exception, in the pod failure policy: a
  pod evicted or preempted (the ``DisruptionTarget`` condition) does not count, so the Job starts a new pod,
  whose worker resumes from the checkpoint (``activeDeadlineSeconds`` bounds a job that is evicted forever);
- more than one GPU: the worker starts through ``torchrun --standalone --nproc_per_node N``. The worker is
  NOT data-parallel yet: rank 0 trains on one GPU and the other ranks exit at once (see ``worker.main``), so
  multi-GPU is the launch path only, ready for a DDP-aware worker;
- ``terminationMessagePolicy: FallbackToLogsOnError``: a worker that dies without a word leaves the tail of
  its log in the pod's status, which the runner copies into the job's error message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercard_service.config import ConfigError

if TYPE_CHECKING:
    from layercard_service.config import ServiceConfig

__all__ = [
    "APP_LABEL",
    "JOB_ID_KEY",
    "SELECTOR",
    "KubernetesSettings",
    "job_manifest",
    "job_name",
    "kubernetes_settings",
    "worker_secret",
    "parse_node_selector",
    "parse_toleration",
]

APP_LABEL = ("app.kubernetes.io/name", "layercard-trainer")
JOB_ID_KEY = "layercard.dev/job-id"  # a label (for selection) and an annotation (the exact id)
SELECTOR = f"{APP_LABEL[0]}={APP_LABEL[1]}"
WORKER_MODULE = "layercard_service.tune.worker"
TOKEN_ENV = "LAYERCARD_WORKER_TOKEN"  # tune/reports.py's; repeated so this module stays free of the store
NAME_PREFIX = "layercard-"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# Always fullmatch: "$" accepts a trailing newline, which Kubernetes does not.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_QUANTITY = re.compile(r"[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how trainer Jobs run; every field is checked here, so a bad setting stops the server at start."""

    namespace: str
    image: str
    data_claim: str  # a ReadWriteMany PVC holding data_dir, mounted in the service pod at the same path
    data_dir: Path  # absolute: the mount path in the trainer pods, the worker's --data-dir
    service_address: str = ""  # host:port where trainer pods reach the service's gRPC port (its Service)
    service_account: str = ""  # "": the namespace's default
    gpus: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "1"
    cpu_limit: str = ""  # "": none
    memory_request: str = "4Gi"
    memory_limit: str = ""  # "": none
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    read_only_claims: tuple[tuple[str, Path], ...] = ()  # (claim, mount path): models and datasets
    run_as_user: int = 10001  # and group, fsGroup: the service pod's (deploy/), so both write the artifacts
    active_deadline_seconds: int = 0  # 0: no deadline
    ttl_seconds_after_finished: int = 86_400

    def __post_init__(self) -> None:
        _check(_DNS_LABEL, self.namespace, "k8s_namespace")
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise ConfigError(f"k8s_trainer_image must be an image reference, got {self.image!r}")
        _check(_DNS_SUBDOMAIN, self.data_claim, "k8s_data_claim")
        host, _, port = self.service_address.rpartition(":")
        if not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536) or any(
            c.isspace() for c in self.service_address
        ):
            raise ConfigError(
                "k8s_service_address must be the host:port where trainer pods reach the service's gRPC port "
                f"(e.g. layercard.<namespace>.svc:50051), got {self.service_address!r}"
            )
        if not self.data_dir.is_absolute():
            raise ConfigError(
                f"data_dir must be an absolute path with the Kubernetes runner (the trainer pods mount the data "
                f"volume at the same path), got {str(self.data_dir)!r}"
            )
        if self.service_account:
            _check(_DNS_SUBDOMAIN, self.service_account, "k8s_service_account")
        if self.gpus < 0:
            raise ConfigError(f"k8s_gpus must be >= 0, got {self.gpus}")
        prefix, _, name = self.gpu_resource.rpartition("/")
        if not (prefix and _DNS_SUBDOMAIN.fullmatch(prefix) and _LABEL_NAME.fullmatch(name)):
            raise ConfigError(f"k8s_gpu_resource must look like 'nvidia.com/gpu', got {self.gpu_resource!r}")
        for name, value in (("k8s_cpu_request", self.cpu_request), ("k8s_memory_request", self.memory_request)):
            _check(_QUANTITY, value, name, "a Kubernetes quantity like '2', '500m' or '8Gi'")
        for name, value in (("k8s_cpu_limit", self.cpu_limit), ("k8s_memory_limit", self.memory_limit)):
            if value:
                _check(_QUANTITY, value, name, "a Kubernetes quantity like '2', '500m' or '8Gi', or empty")
        for claim, path in self.read_only_claims:
            _check(_DNS_SUBDOMAIN, claim, "k8s_read_only_claims")
            if not path.is_absolute():
                raise ConfigError(f"k8s_read_only_claims: the mount path of {claim!r} must be absolute, got {path}")
        if self.run_as_user < 1:
            raise ConfigError(f"k8s_run_as_user must be >= 1 (the pods run as non-root), got {self.run_as_user}")
        if self.active_deadline_seconds < 0 or self.ttl_seconds_after_finished < 0:
            raise ConfigError("k8s_active_deadline_seconds and k8s_ttl_seconds_after_finished must be >= 0")


def kubernetes_settings(config: ServiceConfig, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> KubernetesSettings:
    """The settings from the service's config; the namespace defaults to the service pod's own."""
    namespace = config.k8s_namespace
    if not namespace:
        try:
            namespace = namespace_file.read_text().strip() or "default"
        except OSError:
            namespace = "default"
    if not config.k8s_trainer_image:
        raise ConfigError("job_runner 'kubernetes' needs k8s_trainer_image: the image that runs the worker")
    if not config.k8s_data_claim:
        raise ConfigError("job_runner 'kubernetes' needs k8s_data_claim: the ReadWriteMany PVC holding data_dir")
    return KubernetesSettings(
        namespace=namespace,
        image=config.k8s_trainer_image,
        data_claim=config.k8s_data_claim,
        data_dir=config.data_dir,
        service_address=config.k8s_service_address,
        service_account=config.k8s_service_account,
        gpus=config.k8s_gpus,
        gpu_resource=config.k8s_gpu_resource,
        cpu_request=config.k8s_cpu_request,
        cpu_limit=config.k8s_cpu_limit,
        memory_request=config.k8s_memory_request,
        memory_limit=config.k8s_memory_limit,
        node_selector=parse_node_selector(config.k8s_node_selector, "k8s_node_selector"),
        tolerations=tuple(parse_toleration(t) for t in config.k8s_tolerations),
        read_only_claims=tuple(_parse_claim(c) for c in config.k8s_read_only_claims),
        run_as_user=config.k8s_run_as_user,
        active_deadline_seconds=config.k8s_active_deadline_seconds,
        ttl_seconds_after_finished=config.k8s_ttl_seconds_after_finished,
    )


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
        _check(_LABEL_VALUE, value.strip(), f"{setting} value")
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
        _check(_LABEL_VALUE, value, "k8s_tolerations value")
        toleration["value"] = value
    if effect:
        if effect not in TAINT_EFFECTS:
            raise ConfigError(f"k8s_tolerations effect must be one of {TAINT_EFFECTS}, got {effect!r}")
        toleration["effect"] = effect
    return toleration


def job_name(job_id: str) -> str:
    """The Job's name: ``layercard-<id>``, shortened with a hash when the id is too long for a DNS label."""
    name = NAME_PREFIX + job_id
    if _DNS_LABEL.fullmatch(name):
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}{job_id[:43].rstrip('-')}-{digest}"


def job_label(job_id: str) -> str:
    """The id as a label value (which must end in a letter or digit); the annotation keeps it exactly."""
    if _LABEL_VALUE.fullmatch(job_id):
        return job_id
    return f"{job_id[:54].rstrip('-')}.{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"


def job_manifest(job_id: str, settings: KubernetesSettings, command: Callable[[str], Sequence[str]]) -> dict[str, Any]:
    """The ``batch/v1`` Job for one tuning job; ``command`` is ``worker_command(...)``: its arguments are reused."""
    s = settings
    labels = {APP_LABEL[0]: APP_LABEL[1], "app.kubernetes.io/component": "tuning-job", JOB_ID_KEY: job_label(job_id)}
    annotations = {JOB_ID_KEY: job_id}
    requests: dict[str, str] = {"cpu": s.cpu_request, "memory": s.memory_request}
    limits: dict[str, str] = {}
    if s.cpu_limit:
        limits["cpu"] = s.cpu_limit
    if s.memory_limit:
        limits["memory"] = s.memory_limit
    if s.gpus > 0:  # an extended resource: requests, if given, must equal limits
        requests[s.gpu_resource] = limits[s.gpu_resource] = str(s.gpus)
    mounts: list[dict[str, Any]] = [{"name": "data", "mountPath": str(s.data_dir)}]
    volumes: list[dict[str, Any]] = [{"name": "data", "persistentVolumeClaim": {"claimName": s.data_claim}}]
    for i, (claim, path) in enumerate(s.read_only_claims):
        mounts.append({"name": f"ro-{i}", "mountPath": str(path), "readOnly": True})
        volumes.append({"name": f"ro-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    if s.gpus > 0:  # NCCL and pinned-memory loaders outgrow the container runtime's 64 MiB /dev/shm
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # the log tail on failure is the last thing it printed
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # models load from mounted directories, never from a hub
        {"name": "LAYERCARD_JOB_ID", "value": job_id},
        {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": job_name(job_id), "key": "token"}}},
    ]
    container: dict[str, Any] = {
        "name": "trainer",
        "image": s.image,
        "command": _container_command([*command(job_id), "--service-address", s.service_address], s.gpus),
        "env": env,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the worker talks to the service, never to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": s.run_as_user,
            "runAsGroup": s.run_as_user,
            "fsGroup": s.run_as_user,
            "fsGroupChangePolicy": "OnRootMismatch",  # not a recursive chown of the whole volume per trainer
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if s.service_account:
        pod_spec["serviceAccountName"] = s.service_account
    if s.node_selector:
        pod_spec["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in s.tolerations]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # retries are the service's decision: a resumed job continues from its checkpoint
        "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
        "ttlSecondsAfterFinished": s.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
    }
    if s.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = s.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(job_id), "namespace": s.namespace, "labels": labels, "annotations": annotations},
        "spec": job_spec,
    }


def worker_secret(job_id: str, token: str, settings: KubernetesSettings) -> dict[str, Any]:
    """The ``v1`` Secret holding one attempt's worker credential; named as the job's Job, replaced per attempt."""
    labels = {APP_LABEL[0]: APP_LABEL[1], "app.kubernetes.io/component": "worker-credential"}
    labels[JOB_ID_KEY] = job_label(job_id)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": job_name(job_id),
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {JOB_ID_KEY: job_id},
        },
        "stringData": {"token": token},
    }


def _container_command(argv: list[str], gpus: int) -> list[str]:
    """``[interpreter, -m, worker, *args]`` -> the same run with the image's python, or torchrun for >1 GPU."""
    if argv[1:3] != ["-m", WORKER_MODULE]:
        raise ValueError(f"not a worker command: {argv[:3]}")
    args = argv[3:]
    if gpus > 1:
        return ["torchrun", "--standalone", "--nproc_per_node", str(gpus), "-m", WORKER_MODULE, *args]
    return ["python", "-m", WORKER_MODULE, *args]


def _parse_claim(text: str) -> tuple[str, Path]:
    claim, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"k8s_read_only_claims entries must be claim=/mount/path, got {text!r}")
    return claim.strip(), Path(path.strip())


def _check_label_key(key: str, setting: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if not _LABEL_NAME.fullmatch(name) or (slash and not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise ConfigError(f"{setting}: {key!r} is not a valid label key")


def _check(pattern: re.Pattern[str], value: str, setting: str, what: str = "") -> None:
    if not pattern.fullmatch(value):
        raise ConfigError(f"{setting} must be {what or 'a valid Kubernetes name'}, got {value!r}")
