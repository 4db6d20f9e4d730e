"""The seam between the Kubernetes runner and the cluster: ``BatchApi``, and ``KubernetesBatchApi`` on the
official ``kubernetes`` client (``pip install 'layercard-service[kubernetes]'``, imported only when used).

Objects cross the seam as plain dicts in the API's JSON shape (the client is asked for the raw JSON): the runner
reads a few fields, tests build them by hand, and the client's model classes never stand between the two.
Errors cross it as the service's own (``errors.py``), raised ``from`` the client's.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from layercard_service.errors import AlreadyExists, FailedPrecondition, Unavailable
from layercard_service.settings import ConfigError

__all__ = ["BatchApi", "KubernetesBatchApi", "pod_failure_text", "pod_stuck_text"]

log = logging.getLogger(__name__)

DETAIL_CHARS = 1500  # of a pod's termination message (with FallbackToLogsOnError: its log's tail)
# A container waiting for one of these after the runner's start timeout will not start by itself.
STUCK_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)


class BatchApi(ABC):
    """The few Kubernetes calls the runner makes. Objects travel as plain dicts in the API's JSON shape.

    Errors: ``AlreadyExists`` (a Job of that name exists), ``FailedPrecondition`` (the API refused the request:
    invalid, forbidden) and ``Unavailable`` (anything that may pass: unreachable, throttled, 5xx).
    """

    @abstractmethod
    def create_job(self, namespace: str, body: dict[str, Any]) -> None: ...

    @abstractmethod
    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job, or None when there is none of that name."""

    @abstractmethod
    def delete_job(self, namespace: str, name: str) -> None:
        """Deletes the Job and, in the background, its pods; a Job already gone is no error."""

    @abstractmethod
    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def put_secret(self, namespace: str, body: dict[str, Any]) -> None:
        """Creates the Secret, or replaces the one of that name (a job's worker credential, new per attempt)."""

    @abstractmethod
    def delete_secret(self, namespace: str, name: str) -> None:
        """Deletes the Secret; one already gone is no error."""

    @abstractmethod
    def pod_failure(self, namespace: str, job_name: str) -> str:
        """Why the Job's pod ended, from its status (reason, exit code, termination message); "" if unknown."""

    @abstractmethod
    def pod_stuck(self, namespace: str, job_name: str) -> str:
        """Why the Job's pod cannot start (an image it cannot pull, a broken config); "" when it is not stuck."""


class KubernetesBatchApi(BatchApi):
    """``BatchApi`` on the official ``kubernetes`` client (``pip install 'layercard-service[kubernetes]'``)."""

    def __init__(self, api_client: Any = None, request_timeout: float = 30.0) -> None:
        try:
            import urllib3
            from kubernetes import client
            from kubernetes import config as kube_config
            from kubernetes.client.exceptions import ApiException
        except ImportError as exc:
            raise ConfigError(
                "job_runner 'kubernetes' needs the Kubernetes client: pip install 'layercard-service[kubernetes]'"
            ) from exc
        if api_client is None:
            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                try:
                    # KUBECONFIG read now: the client reads it once, when first imported.
                    kube_config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
                except (kube_config.ConfigException, OSError) as exc:
                    raise ConfigError(f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}") from exc
            api_client = client.ApiClient()
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._errors = (ApiException, urllib3.exceptions.HTTPError, OSError)
        self._job_type, self._secret_type = client.V1Job, client.V1Secret
        self._timeout = request_timeout

    def create_job(self, namespace: str, body: dict[str, Any]) -> None:
        job = self._job_type.from_dict(body)
        self._call("create a Job", lambda: self._batch.create_namespaced_job(namespace, job, **self._raw()))

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("read a Job", lambda: self._batch.read_namespaced_job(name, namespace, **self._raw()), True)

    def delete_job(self, namespace: str, name: str) -> None:
        self._call(
            "delete a Job",
            lambda: self._batch.delete_namespaced_job(name, namespace, propagation_policy="Background", **self._raw()),
            missing_ok=True,
        )

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        listed = self._call(
            "list Jobs",
            lambda: self._batch.list_namespaced_job(namespace, label_selector=label_selector, **self._raw()),
        )
        return list((listed or {}).get("items") or [])

    def put_secret(self, namespace: str, body: dict[str, Any]) -> None:
        secret = self._secret_type(**{k: v for k, v in body.items() if k != "metadata"}, metadata=body["metadata"])
        name = body["metadata"]["name"]
        try:
            self._call("create a Secret", lambda: self._core.create_namespaced_secret(namespace, secret, **self._raw()))
        except AlreadyExists:
            self._call(
                "replace a Secret",
                lambda: self._core.replace_namespaced_secret(name, namespace, secret, **self._raw()),
            )

    def delete_secret(self, namespace: str, name: str) -> None:
        self._call(
            "delete a Secret",
            lambda: self._core.delete_namespaced_secret(name, namespace, **self._raw()),
            missing_ok=True,
        )

    def pod_failure(self, namespace: str, job_name: str) -> str:
        return pod_failure_text(self._pods(namespace, job_name))

    def pod_stuck(self, namespace: str, job_name: str) -> str:
        return pod_stuck_text(self._pods(namespace, job_name))

    def _pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The Job's pods; none when they cannot be listed (their status only adds detail to a message)."""
        selector = f"batch.kubernetes.io/job-name={job_name}"
        try:
            listed = self._call(
                "list pods", lambda: self._core.list_namespaced_pod(namespace, label_selector=selector, **self._raw())
            )
        except (Unavailable, FailedPrecondition) as exc:
            log.info("no pod status for the Job %s: %s", job_name, exc.message)
            return []
        return list((listed or {}).get("items") or [])

    def _raw(self) -> dict[str, Any]:
        # The API's JSON as it is: no model classes between the server and the runner (which reads dicts).
        return {"_preload_content": False, "_request_timeout": self._timeout}

    def _call(self, what: str, request: Callable[[], Any], missing_ok: bool = False) -> dict[str, Any] | None:
        try:
            response = request()
        except self._errors as exc:
            status = getattr(exc, "status", None) or 0
            if status == 404 and missing_ok:
                return None
            body = _status_message(getattr(exc, "body", None)) or str(getattr(exc, "reason", "") or exc)
            message = f"cannot {what}: {status or type(exc).__name__} {body}".strip()
            if status == 409:
                raise AlreadyExists(message, reason="KUBERNETES_JOB_EXISTS") from exc
            if status in (400, 403, 404, 422):
                raise FailedPrecondition(message, reason="KUBERNETES_REFUSED") from exc
            raise Unavailable(message, reason="KUBERNETES_UNAVAILABLE") from exc
        try:
            return json.loads(response.data or b"{}")
        except ValueError as exc:
            raise Unavailable(f"cannot {what}: the API answered with no JSON", reason="KUBERNETES_UNAVAILABLE") from exc


def pod_failure_text(pods: list[dict[str, Any]]) -> str:
    """The newest pod's end in a line: pod reason, container reason and exit code, and its termination message."""
    if not pods:
        return ""
    pod = _newest(pods)
    status = pod.get("status") or {}
    parts = [f"pod {(pod.get('metadata') or {}).get('name', '?')}"]
    if status.get("reason") or status.get("message"):
        parts.append(": ".join(p for p in (status.get("reason"), status.get("message")) if p))
    for container in status.get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated")
        if ended:
            parts.append(f"{ended.get('reason') or 'terminated'} with exit code {ended.get('exitCode')}")
            if ended.get("message"):
                parts.append(f"last output: {ended['message'].strip()[-DETAIL_CHARS:]}")
    return "; ".join(parts)


def pod_stuck_text(pods: list[dict[str, Any]]) -> str:
    """The newest pod's container waiting for a reason that time does not cure; "" otherwise."""
    if not pods:
        return ""
    pod = _newest(pods)
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            name = (pod.get("metadata") or {}).get("name", "?")
            return f"pod {name}: " + ": ".join(p for p in (waiting["reason"], waiting.get("message")) if p)
    return ""


def _newest(pods: list[dict[str, Any]]) -> dict[str, Any]:
    return max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")


def _status_message(body: Any) -> str:
    """The ``message`` of a Kubernetes Status body, when the error carries one."""
    try:
        return str(json.loads(body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return ""
