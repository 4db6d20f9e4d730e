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
- more than one GPU: the worker starts through ``torchrun --standalone --nproc_per_node N`` (one rank per GPU,
  rendezvous inside the pod), and the ranks train the job data-parallel (trainer/distributed.py): the same
  global batch, sharded; rank 0 reports. Each rank gets the pod's cores / N torch threads (``trainer_threads``).
  One GPU, or none, runs the worker as the local runner does, without torchrun;
- ``terminationMessagePolicy: FallbackToLogsOnError``: a worker that dies without a word leaves the tail of
  its log in the pod's status, which the runner copies into the job's error message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layercard_service.runners.kubernetes.settings import (
    DNS_LABEL,
    LABEL_VALUE,
    KubernetesSettings,
    parse_node_selector,
    parse_toleration,
)

__all__ = [
    "APP_LABEL",
    "JOB_ID_KEY",
    "SELECTOR",
    "KubernetesSettings",
    "job_manifest",
    "job_name",
    "worker_secret",
    "parse_node_selector",
    "parse_toleration",
]

APP_LABEL = ("app.kubernetes.io/name", "layercard-trainer")
JOB_ID_KEY = "layercard.dev/job-id"  # a label (for selection) and an annotation (the exact id)
SELECTOR = f"{APP_LABEL[0]}={APP_LABEL[1]}"
WORKER_MODULE = "layercard_service.trainer.worker"
TOKEN_ENV = "LAYERCARD_WORKER_TOKEN"  # runners/worker_reports.py's; repeated so this module stays free of the store
NAME_PREFIX = "layercard-"


def job_name(job_id: str) -> str:
    """The Job's name: ``layercard-<id>``, shortened with a hash when the id is too long for a DNS label."""
    name = NAME_PREFIX + job_id
    if DNS_LABEL.fullmatch(name):
        return name
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return f"{NAME_PREFIX}{job_id[:43].rstrip('-')}-{digest}"


def job_label(job_id: str) -> str:
    """The id as a label value (which must end in a letter or digit); the annotation keeps it exactly."""
    if LABEL_VALUE.fullmatch(job_id):
        return job_id
    return f"{job_id[:54].rstrip('-')}.{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"


def job_manifest(
    job_id: str, settings: KubernetesSettings, command: Callable[[str], Sequence[str]], *, data_dir: Path
) -> dict[str, Any]:
    """The ``batch/v1`` Job for one tuning job; ``command`` is ``worker_command(...)``: its arguments are reused.

    ``settings`` are checked and resolved (``KubernetesSettings.check``, ``resolved``); ``data_dir`` is the
    service's, absolute: the data volume's mount path in the trainer pods."""
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
    mounts: list[dict[str, Any]] = [{"name": "data", "mountPath": str(data_dir)}]
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
        "image": s.trainer_image,
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
