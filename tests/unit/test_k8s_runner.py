"""The Kubernetes job runner against a fake ``BatchApi`` (in-memory Jobs whose status the test advances) and a
real job store: create, watch to completion, failure, cancel, re-attach after a restart, API outages.
The real ``KubernetesBatchApi`` is tested at the end against a small HTTP stand-in for the API server."""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
from support.fakes import RecordingTelemetry

from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.errors import AlreadyExists, FailedPrecondition, Unavailable
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.kubernetes.api import BatchApi, KubernetesBatchApi, pod_failure_text
from layercard_service.runners.kubernetes.manifest import KubernetesSettings, job_manifest, job_name, worker_secret
from layercard_service.runners.kubernetes.runner import KubernetesJobRunner
from layercard_service.runners.local import worker_command
from layercard_service.telemetry import Telemetry

ADDRESS = "layercard.ml.svc:50051"
SPEC = JobSpec(
    "builtin:tiny",
    DatasetRequest(builtin="builtin:cipher"),
    None,
    PlacementSpec(layers=(1,)),
    Hyperparameters(steps=5),
    "bot",
)


class FakeBatchApi(BatchApi):
    """Jobs in a dict, in the API's JSON shape; ``finish`` plays the Job controller, ``down`` an outage."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.failures: dict[str, str] = {}  # Job name -> what pod_failure says
        self.stuck: dict[str, str] = {}  # Job name -> what pod_stuck says
        self.stuck_checks = 0
        self.down = False
        self.refuse = ""  # a create error message: the API refuses every create
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise Unavailable("connection refused")

    def create_job(self, namespace: str, body: dict) -> None:
        with self.lock:
            self._check()
            if self.refuse:
                raise FailedPrecondition(self.refuse)
            name = body["metadata"]["name"]
            if name in self.jobs:
                raise AlreadyExists(f"jobs.batch {name!r} already exists")
            job = copy.deepcopy(body)
            job["status"] = {"active": 1}
            self.jobs[name] = job
            self.created.append(name)

    def read_job(self, namespace: str, name: str) -> dict | None:
        with self.lock:
            self._check()
            return copy.deepcopy(self.jobs.get(name))

    def delete_job(self, namespace: str, name: str) -> None:
        with self.lock:
            self._check()
            self.jobs.pop(name, None)
            self.deleted.append(name)

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict]:
        key, _, value = label_selector.partition("=")
        with self.lock:
            self._check()
            return [
                copy.deepcopy(j)
                for j in self.jobs.values()
                if j["metadata"]["namespace"] == namespace and j["metadata"]["labels"].get(key) == value
            ]

    def put_secret(self, namespace: str, body: dict) -> None:
        with self.lock:
            self._check()
            self.secrets[body["metadata"]["name"]] = copy.deepcopy(body)

    def delete_secret(self, namespace: str, name: str) -> None:
        with self.lock:
            self._check()
            self.secrets.pop(name, None)

    def pod_failure(self, namespace: str, job_name: str) -> str:
        return self.failures.get(job_name, "")

    def pod_stuck(self, namespace: str, job_name: str) -> str:
        self.stuck_checks += 1
        return self.stuck.get(job_name, "")

    # --- the test's side: the Job controller ------------------------------------------------------------
    def finish(self, name: str, succeeded: bool, reason: str = "", message: str = "") -> None:
        kind = "Complete" if succeeded else "Failed"
        condition = {"type": kind, "status": "True", "reason": reason, "message": message}
        with self.lock:
            self.jobs[name]["status"] = {"succeeded" if succeeded else "failed": 1, "conditions": [condition]}


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def setup(tmp_path):
    store = JobStore(tmp_path / "state.db")
    api = FakeBatchApi()
    settings = KubernetesSettings(
        namespace="ml", trainer_image="trainer:1", data_claim="layercard-data", service_address=ADDRESS
    )
    command = worker_command(tmp_path, (), (), 16, threads=2)
    telemetry = RecordingTelemetry()
    runners: list[KubernetesJobRunner] = []

    def runner(
        max_concurrent: int = 1, cancel_grace_seconds: float = 60.0, start_timeout_seconds: float = 600.0
    ) -> KubernetesJobRunner:
        made = KubernetesJobRunner(
            store,
            api,
            settings,
            command,
            data_dir=tmp_path,
            max_concurrent=max_concurrent,
            poll_seconds=0.02,
            cancel_grace_seconds=cancel_grace_seconds,
            start_timeout_seconds=start_timeout_seconds,
            telemetry=telemetry,
        )
        runners.append(made)
        return made

    def create(*job_ids: str) -> None:
        for job_id in job_ids:
            store.create(job_id, None, SPEC, 5)

    yield store, api, runner, create, (settings, command, telemetry)
    for made in runners:
        made.close()
    store.close()


def _states(store: JobStore, job_id: str) -> list[str]:
    return [e.payload["state"] for e in store.events_after(job_id, 0) if e.kind == "state"]


def test_create_submits_the_manifest_and_queues_beyond_the_limit(setup, tmp_path):
    store, api, make, create, (settings, command, _) = setup
    runner = make(max_concurrent=2)
    runner.start()
    create("job-a", "job-b", "job-c")
    for job_id in ("job-a", "job-b", "job-c"):
        runner.submit(job_id)
    _wait(lambda: len(api.created) == 2)
    time.sleep(0.1)  # a few more rounds: the third must stay queued
    assert api.created == ["layercard-job-a", "layercard-job-b"]
    assert api.jobs["layercard-job-a"]["spec"] == job_manifest("job-a", settings, command, data_dir=tmp_path)["spec"]
    assert [store.state(j) for j in ("job-a", "job-b", "job-c")] == [JobState.RUNNING] * 2 + [JobState.QUEUED]
    assert runner.running == ["job-a", "job-b"] and runner.queued == ["job-c"]


def test_each_attempt_gets_a_credential_secret_that_only_it_can_use_and_it_goes_with_the_job(setup, tmp_path):
    from layercard_service.errors import PermissionDenied, Unauthenticated
    from layercard_service.runners.worker_reports import WorkerReports

    store, api, make, create, _ = setup
    reports = WorkerReports(store, tmp_path / "artifacts", 16)
    runner = make(max_concurrent=2)
    runner.start()
    create("job-a", "job-b")
    runner.submit("job-a")
    runner.submit("job-b")
    _wait(lambda: len(api.created) == 2)
    secret = api.secrets["layercard-job-a"]
    token = secret["stringData"]["token"]
    env = {e["name"]: e for e in api.jobs["layercard-job-a"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LAYERCARD_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert token not in json.dumps(api.jobs["layercard-job-a"])  # only the Secret holds it
    reports.authenticate("job-a", token)  # the token the pod gets is the one the service accepts
    with pytest.raises(PermissionDenied):
        reports.authenticate("job-b", token)
    assert token not in store.path.read_bytes().decode(errors="replace")  # the store keeps its digest only
    # The worker ends its job through the service; the Job completes; the credential goes with it.
    store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "training finished")
    api.finish("layercard-job-a", succeeded=True)
    _wait(lambda: "layercard-job-a" not in api.secrets)
    assert "layercard-job-b" in api.secrets
    # A new attempt of job-b (its Job vanished while the service was down) gets a new token: the old one is refused.
    old = api.secrets["layercard-job-b"]["stringData"]["token"]
    runner.close()
    api.jobs.pop("layercard-job-b")
    second = make(max_concurrent=2)
    second.start()
    _wait(lambda: api.created.count("layercard-job-b") == 2)
    new = api.secrets["layercard-job-b"]["stringData"]["token"]
    reports.authenticate("job-b", new)
    with pytest.raises(Unauthenticated):
        reports.authenticate("job-b", old)


def test_watch_to_completion_then_the_next_queued_job_runs(setup):
    store, api, make, create, (_, _, telemetry) = setup
    runner = make(max_concurrent=1)
    runner.start()
    create("job-a", "job-b")
    runner.submit("job-a")
    runner.submit("job-b")
    _wait(lambda: api.created == ["layercard-job-a"])
    # The worker in the pod ends the job in the store itself, then its pod exits and the Job completes.
    store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "training finished")
    api.finish("layercard-job-a", succeeded=True)
    _wait(lambda: api.created == ["layercard-job-a", "layercard-job-b"])
    assert store.state("job-a") == JobState.SUCCEEDED  # the runner writes nothing over the worker's end state
    assert _states(store, "job-a") == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert store.state("job-b") == JobState.RUNNING
    assert [o.state for o in telemetry.outcomes] == ["SUCCEEDED"]
    assert "layercard-job-a" in api.jobs  # finished Jobs stay for their TTL: logs to read


def test_a_failed_job_while_running_fails_with_worker_died(setup):
    store, api, make, create, _ = setup
    runner = make()
    runner.start()
    create("job-a")
    runner.submit("job-a")
    _wait(lambda: runner.running == ["job-a"])
    api.failures["layercard-job-a"] = "pod layercard-job-a-x7k2p; OOMKilled with exit code 137; last output: step 40"
    api.finish("layercard-job-a", succeeded=False, reason="BackoffLimitExceeded", message="Job has reached the limit")
    _wait(lambda: store.state("job-a") == JobState.FAILED)
    job = store.get("job-a")
    assert job.error_code == "WORKER_DIED"
    assert "BackoffLimitExceeded" in job.error_message and "OOMKilled with exit code 137" in job.error_message
    assert "step 40" in job.error_message
    assert runner.running == []


def test_a_job_deleted_behind_the_service_fails_with_worker_died(setup):
    store, api, make, create, _ = setup
    runner = make()
    runner.start()
    create("job-a")
    runner.submit("job-a")
    _wait(lambda: runner.running == ["job-a"])
    api.jobs.pop("layercard-job-a")  # kubectl delete job
    _wait(lambda: store.state("job-a") == JobState.FAILED)
    assert store.get("job-a").error_code == "WORKER_DIED" and "is gone" in store.get("job-a").error_message


def test_cancel_deletes_the_job_and_drops_a_queued_one(setup):
    store, api, make, create, _ = setup
    runner = make(max_concurrent=1, cancel_grace_seconds=0.0)
    runner.start()
    create("job-a", "job-b")
    runner.submit("job-a")
    runner.submit("job-b")
    _wait(lambda: runner.running == ["job-a"])
    # What TuningService.cancel does: the store first, then the runner.
    store.transition("job-b", [JobState.QUEUED], JobState.CANCELLED, "cancelled while queued")
    runner.cancel("job-b")
    assert runner.queued == []
    store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING, "cancel requested")
    runner.cancel("job-a")  # a worker that does not stop: its Job is deleted when the grace period is over
    _wait(lambda: store.state("job-a") == JobState.CANCELLED)
    assert api.deleted[0] == "layercard-job-a" and api.jobs == {}
    assert api.created == ["layercard-job-a"]  # the queued job never got a Job


def test_a_worker_that_honours_the_cancel_leaves_no_job_behind(setup):
    store, api, make, create, _ = setup
    runner = make(cancel_grace_seconds=60.0)
    runner.start()
    create("job-a")
    runner.submit("job-a")
    _wait(lambda: runner.running == ["job-a"])
    store.transition("job-a", [JobState.RUNNING], JobState.CANCELLING, "cancel requested")
    runner.cancel("job-a")
    time.sleep(0.1)
    assert "layercard-job-a" in api.jobs  # within the grace period the worker stops by itself
    store.transition("job-a", [JobState.CANCELLING], JobState.CANCELLED, "cancelled at step 2")  # the worker
    api.finish("layercard-job-a", succeeded=True)
    _wait(lambda: "layercard-job-a" not in api.jobs)
    assert store.get("job-a").state == JobState.CANCELLED
    assert store.events_after("job-a", 0)[-1].message == "cancelled at step 2"


def test_a_pod_that_cannot_start_fails_the_job_with_worker_start_failed(setup):
    store, api, make, create, _ = setup
    runner = make(max_concurrent=2, start_timeout_seconds=0.1)
    runner.start()
    create("job-a", "job-b")
    runner.submit("job-a")
    runner.submit("job-b")
    _wait(lambda: runner.running == ["job-a", "job-b"])
    store.set_progress("job-b", worker_pid=7)  # job-b's worker reported in: its pod is no longer looked at
    checks = api.stuck_checks
    _wait(lambda: api.stuck_checks > checks + 2)
    assert store.state("job-a") == JobState.RUNNING  # its pod waits, but for no reason that makes it fail
    api.stuck["layercard-job-a"] = 'pod layercard-job-a-x: ImagePullBackOff: Back-off pulling image "trainer:1"'
    api.stuck["layercard-job-b"] = "never asked"
    _wait(lambda: store.state("job-a") == JobState.FAILED)
    job = store.get("job-a")
    assert job.error_code == "WORKER_START_FAILED" and "ImagePullBackOff" in job.error_message
    assert "layercard-job-a" not in api.jobs and runner.running == ["job-b"]
    assert store.state("job-b") == JobState.RUNNING


def test_close_leaves_jobs_running_and_a_restart_reattaches_or_resubmits(setup):
    store, api, make, create, (_, _, telemetry) = setup
    first = make(max_concurrent=2)
    first.start()
    create("job-a", "job-b", "job-c", "job-d")
    for job_id in ("job-a", "job-b", "job-c", "job-d"):
        first.submit(job_id)
    _wait(lambda: first.running == ["job-a", "job-b"])
    first.close()
    assert set(api.jobs) == {"layercard-job-a", "layercard-job-b"} and api.deleted == []
    # While the service is down: job-b's Job disappears (its node went away), job-c is cancelled while
    # queued, job-a's worker keeps training.
    api.jobs.pop("layercard-job-b")
    store.transition("job-c", [JobState.QUEUED], JobState.CANCELLED, "cancelled while queued")
    checkpoint = Path(store.path.parent) / "artifacts" / "checkpoints" / "job-b" / "step-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")

    second = make(max_concurrent=2)
    second.start()
    assert "job-a" in second.running  # re-attached at start, not re-created
    _wait(lambda: api.created.count("layercard-job-b") == 2)
    assert api.created.count("layercard-job-a") == 1
    messages = [e.message for e in store.events_after("job-b", 0)]
    assert "resuming from step 3: its Kubernetes Job was gone after a service restart" in messages
    assert store.state("job-b") == JobState.RUNNING and store.get("job-b").step == 3
    assert second.queued == ["job-d"]  # two Jobs run: job-a (re-attached) and job-b (resubmitted)
    # The re-attached Job is watched: its end frees the slot for job-d.
    store.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "training finished")
    api.finish("layercard-job-a", succeeded=True)
    _wait(lambda: "layercard-job-d" in api.created)
    assert [o.state for o in telemetry.outcomes] == ["SUCCEEDED"]


def test_restart_settles_jobs_that_ended_or_were_cancelling_while_the_service_was_down(setup):
    store, api, make, create, _ = setup
    first = make(max_concurrent=2)
    first.start()
    create("job-a", "job-b")
    first.submit("job-a")
    first.submit("job-b")
    _wait(lambda: len(first.running) == 2)
    first.close()
    api.finish("layercard-job-a", succeeded=False, reason="DeadlineExceeded")  # died while no one watched
    store.transition("job-b", [JobState.RUNNING], JobState.CANCELLING, "cancel requested")
    api.jobs.pop("layercard-job-b")
    make(max_concurrent=2).start()
    assert store.state("job-a") == JobState.FAILED and "DeadlineExceeded" in store.get("job-a").error_message
    assert store.state("job-b") == JobState.CANCELLED


def test_an_api_outage_delays_jobs_and_loses_none(setup):
    store, api, make, create, _ = setup
    api.down = True
    create("job-a")
    runner = make()
    runner.start()  # recovery waits for the API
    runner.submit("job-a")
    time.sleep(0.1)
    assert store.state("job-a") == JobState.QUEUED and api.created == []
    api.down = False
    _wait(lambda: api.created == ["layercard-job-a"])
    assert store.state("job-a") == JobState.RUNNING


def test_a_refused_create_fails_the_job_with_worker_start_failed(setup):
    store, api, make, create, _ = setup
    api.refuse = 'Job.batch "layercard-job-a" is forbidden: exceeded quota'
    runner = make()
    runner.start()
    create("job-a")
    runner.submit("job-a")
    _wait(lambda: store.state("job-a") == JobState.FAILED)
    job = store.get("job-a")
    assert job.error_code == "WORKER_START_FAILED" and "exceeded quota" in job.error_message


def test_a_job_whose_create_answer_was_lost_is_attached_not_duplicated(setup, tmp_path):
    store, api, make, create, (settings, command, _) = setup
    create("job-a")
    # Created, but the answer never came back:
    api.create_job("ml", job_manifest("job-a", settings, command, data_dir=tmp_path))
    runner = make()
    runner.start()
    _wait(lambda: runner.running == ["job-a"])
    assert api.created == ["layercard-job-a"] and store.state("job-a") == JobState.RUNNING


def test_a_finished_job_in_the_way_is_replaced(setup, tmp_path):
    store, api, make, create, (settings, command, _) = setup
    create("job-a")
    api.create_job("ml", job_manifest("job-a", settings, command, data_dir=tmp_path))
    api.finish("layercard-job-a", succeeded=False)  # left over from an earlier run of the same job id
    runner = make()
    runner.start()
    _wait(lambda: api.created.count("layercard-job-a") == 2)
    assert api.deleted == ["layercard-job-a"] and store.state("job-a") == JobState.RUNNING


def test_pod_failure_text_reads_the_newest_pod():
    pods = [
        {"metadata": {"name": "old", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {}},
        {
            "metadata": {"name": "new", "creationTimestamp": "2026-01-02T00:00:00Z"},
            "status": {
                "containerStatuses": [
                    {"state": {"terminated": {"reason": "Error", "exitCode": 1, "message": "Traceback...\nBoom\n"}}}
                ]
            },
        },
    ]
    assert pod_failure_text(pods) == "pod new; Error with exit code 1; last output: Traceback...\nBoom"
    assert pod_failure_text([]) == ""


# --- the real BatchApi, over HTTP, against a stand-in for the API server -------------------------------------


class _ApiServer(BaseHTTPRequestHandler):
    jobs: ClassVar[dict[str, dict]] = {}  # the fixture resets all three
    secrets: ClassVar[dict[str, dict]] = {}
    requests: ClassVar[list[tuple[str, str, str]]] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "status": "Failure", "reason": reason, "message": message, "code": code})

    def _body(self) -> str:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()

    def do_PUT(self) -> None:
        body = self._body()
        self.requests.append(("PUT", self.path, body))
        self._send(200, json.loads(body))

    def do_POST(self) -> None:
        body = self._body()
        self.requests.append(("POST", self.path, body))
        if self.path.startswith("/api/v1/namespaces/ml/secrets"):
            secret = json.loads(body)
            if secret["metadata"]["name"] in self.secrets:
                return self._status(409, "AlreadyExists", "secrets exists")
            self.secrets[secret["metadata"]["name"]] = secret
            return self._send(201, secret)
        job = json.loads(body)
        name = job["metadata"]["name"]
        if name in self.jobs:
            return self._status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        if name.startswith("layercard-bad"):
            return self._status(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: Required value')
        self.jobs[name] = {**job, "status": {"active": 1}}
        self._send(201, self.jobs[name])

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.requests.append(("GET", self.path, ""))
        if url.path == "/apis/batch/v1/namespaces/ml/jobs":
            selector = parse_qs(url.query)["labelSelector"][0]
            key, _, value = selector.partition("=")
            items = [j for j in self.jobs.values() if j["metadata"]["labels"].get(key) == value]
            return self._send(200, {"kind": "JobList", "apiVersion": "batch/v1", "items": items})
        if url.path.startswith("/apis/batch/v1/namespaces/ml/jobs/"):
            name = url.path.rsplit("/", 1)[1]
            if name not in self.jobs:
                return self._status(404, "NotFound", f'jobs.batch "{name}" not found')
            return self._send(200, self.jobs[name])
        if url.path == "/api/v1/namespaces/ml/pods":
            selector = parse_qs(url.query)["labelSelector"][0]
            state = {"terminated": {"reason": "OOMKilled", "exitCode": 137, "message": "loading model"}}
            if selector != "batch.kubernetes.io/job-name=layercard-job-a":
                state = {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}}
            pod = {"metadata": {"name": "p1"}, "status": {"containerStatuses": [{"state": state}]}}
            return self._send(200, {"kind": "PodList", "items": [pod]})
        self._status(404, "NotFound", "no route")

    def do_DELETE(self) -> None:
        self.requests.append(("DELETE", self.path, self._body()))
        name = urlparse(self.path).path.rsplit("/", 1)[1]
        if "/secrets/" in self.path:
            self.secrets.pop(name, None)
            return self._send(200, {"kind": "Status", "status": "Success"})
        if self.jobs.pop(name, None) is None:
            return self._status(404, "NotFound", f'jobs.batch "{name}" not found')
        self._send(200, {"kind": "Status", "status": "Success"})


@pytest.fixture
def real_api():
    from kubernetes import client

    _ApiServer.jobs, _ApiServer.secrets, _ApiServer.requests = {}, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    yield KubernetesBatchApi(client.ApiClient(config), request_timeout=5.0)
    server.shutdown()
    server.server_close()


def test_the_real_batch_api_speaks_the_kubernetes_rest_api(real_api, tmp_path):
    settings = KubernetesSettings(
        namespace="ml", trainer_image="trainer:1", data_claim="layercard-data", service_address=ADDRESS
    )
    manifest = job_manifest("job-a", settings, worker_command(tmp_path, (), (), 16), data_dir=tmp_path)
    real_api.create_job("ml", manifest)
    method, path, body = _ApiServer.requests[-1]
    assert (method, path) == ("POST", "/apis/batch/v1/namespaces/ml/jobs")
    assert json.loads(body) == manifest  # sent as built: nothing lost through the client's model classes

    with pytest.raises(AlreadyExists):
        real_api.create_job("ml", manifest)
    with pytest.raises(FailedPrecondition, match="is invalid"):
        real_api.create_job(
            "ml", job_manifest("bad", settings, worker_command(tmp_path, (), (), 16), data_dir=tmp_path)
        )

    listed = real_api.list_jobs("ml", "app.kubernetes.io/name=layercard-trainer")
    assert [j["metadata"]["name"] for j in listed] == [job_name("job-a")]
    assert real_api.list_jobs("ml", "app.kubernetes.io/name=other") == []
    assert real_api.read_job("ml", "layercard-job-a")["status"] == {"active": 1}
    assert real_api.read_job("ml", "layercard-nothing") is None
    assert "OOMKilled with exit code 137; last output: loading model" in real_api.pod_failure("ml", "layercard-job-a")
    assert real_api.pod_stuck("ml", "layercard-job-a") == ""
    assert real_api.pod_stuck("ml", "layercard-other") == "pod p1: ErrImagePull: pull access denied"

    real_api.delete_job("ml", "layercard-job-a")
    method, path, body = _ApiServer.requests[-1]
    assert method == "DELETE" and "Background" in path + body  # pods go with it, in the background
    real_api.delete_job("ml", "layercard-job-a")  # gone already: no error
    assert real_api.list_jobs("ml", "app.kubernetes.io/name=layercard-trainer") == []

    real_api.put_secret("ml", worker_secret("job-a", "first", settings))
    real_api.put_secret("ml", worker_secret("job-a", "second", settings))  # exists: replaced
    methods = [(m, p) for m, p, _ in _ApiServer.requests[-3:]]
    assert methods == [("POST", "/api/v1/namespaces/ml/secrets"), ("POST", "/api/v1/namespaces/ml/secrets"),
                       ("PUT", "/api/v1/namespaces/ml/secrets/layercard-job-a")]  # fmt: skip
    assert json.loads(_ApiServer.requests[-1][2])["stringData"] == {"token": "second"}
    real_api.delete_secret("ml", "layercard-job-a")
    real_api.delete_secret("ml", "layercard-job-a")  # gone already: no error


def test_the_real_batch_api_reports_an_unreachable_server_as_unavailable():
    from kubernetes import client

    config = client.Configuration(host="http://127.0.0.1:9")  # the discard port: nothing listens
    config.retries = 0
    api = KubernetesBatchApi(client.ApiClient(config), request_timeout=2.0)
    with pytest.raises(Unavailable):
        api.list_jobs("ml", "app.kubernetes.io/name=layercard-trainer")


def test_the_service_chooses_the_kubernetes_runner_by_configuration(tmp_path, monkeypatch):
    from layercard_service.config import ServiceConfig
    from layercard_service.core import _tuning

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    flags = ["--job-runner", "kubernetes", "--data-dir", str(tmp_path / "data"), "--k8s-namespace", "ml"]
    flags += ["--k8s-service-address", ADDRESS]
    config = ServiceConfig.load([*flags, "--k8s-trainer-image", "t:1", "--k8s-data-claim", "d"], environ={})
    tuning = _tuning(config, Telemetry())
    try:
        assert isinstance(tuning.runner, KubernetesJobRunner) and tuning.runner.namespace == "ml"
        argv = tuning.runner.command("job-a")
        assert argv[argv.index("--threads") + 1] == "1"  # the pod's CPU request: 1 core
        assert argv[argv.index("--prefix-cache-memory-bytes") + 1] == str(1 << 30)  # the service's setting
    finally:
        tuning.store.close()
    local = _tuning(ServiceConfig.load(["--data-dir", str(tmp_path / "local")], environ={}), Telemetry())
    assert type(local.runner).__name__ == "LocalProcessRunner"
    local.store.close()
