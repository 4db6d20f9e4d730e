"""Workers report through the service (layercard.internal.v1.WorkerService), never through its database.

Real servers on real sockets, real worker processes on builtin:tiny. The workers run under
tests/support/no_database (a sitecustomize that makes every SQLite connect fail and logs the attempt), so a job
that succeeds proves its worker read its spec and wrote its events and end through the service alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.internal.v1 import worker_pb2, worker_pb2_grpc
from layercard.v1 import adapter_pb2, adapter_pb2_grpc, common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.errors import AlreadyExists
from layercard_service.persistence.store import disk_full_error
from layercard_service.runners.kubernetes import runner as k8s_runner
from layercard_service.runners.kubernetes.api import BatchApi
from layercard_service.runners.kubernetes.settings import KubernetesSettings
from layercard_service.runners.worker_reports import issue_worker_token
from layercard_service.trainer import worker
from layercard_service.trainer.checkpoint_dirs import latest_step
from layercard_service.trainer.reporter import GrpcChannel

pytestmark = pytest.mark.slow

GUARD = Path(__file__).resolve().parents[1] / "support" / "no_database"
W = worker_pb2


def _request(adapter_id: str, steps: int = 30) -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[6, 7], lora=common_pb2.LoraShape(rank=4)),
        hyperparameters=tuning_pb2.Hyperparameters(steps=steps, batch_size=8, max_seq_len=32, checkpoint_interval=10),
        adapter_id=adapter_id,
    )


def _guarded_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a worker that cannot open any SQLite database."""
    log = tmp_path / "guard.log"
    path = os.pathsep.join([str(GUARD), os.environ.get("PYTHONPATH", ""), *sys.path])
    return {"PYTHONPATH": path, "LAYERCARD_TEST_GUARD_LOG": str(log)}


def _guard_lines(tmp_path: Path) -> list[str]:
    log = tmp_path / "guard.log"
    return log.read_text().splitlines() if log.exists() else []


def _events(stub, name: str) -> list[tuning_pb2.TuningJobEvent]:
    return list(stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=name), timeout=300))


def _kinds(events, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def _assert_complete_history(events, steps: int) -> None:
    """Every step once, in order, and one checkpoint event per interval: nothing lost, nothing twice."""
    assert [s.step for s in _kinds(events, "step")] == list(range(1, steps + 1))
    assert [c.step for c in _kinds(events, "checkpoint")] == list(range(10, steps, 10))
    assert _kinds(events, "state_change")[-1] == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED


def test_a_local_job_succeeds_through_the_service_with_a_worker_that_cannot_open_the_database(tmp_path, monkeypatch):
    for key, value in _guarded_env(tmp_path).items():
        monkeypatch.setenv(key, value)  # the runner's workers inherit the service's environment
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path / "data", job_threads=1)
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        stub = tuning_pb2_grpc.TuningServiceStub(channel)
        job = stub.CreateTuningJob(_request("guarded-bot", steps=20))
        events = _events(stub, job.name)
        done = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name))
        adapters = adapter_pb2_grpc.AdapterServiceStub(channel).ListAdapters(adapter_pb2.ListAdaptersRequest())
    assert done.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, (done.error_code, done.error_message)
    assert done.result.adapter_version == "adapters/guarded-bot/versions/1"
    _assert_complete_history(events, 20)
    (adapter,) = [a for a in adapters.adapters if a.name == "adapters/guarded-bot"]
    assert [v.version for v in adapter.versions] == [1]
    lines = _guard_lines(tmp_path)
    assert any(line.endswith("guard active") for line in lines)  # the worker ran under the guard...
    assert not any(" connect " in line for line in lines)  # ...and never tried to open a database


# --- the Kubernetes runner, its Jobs played by local processes -----------------------------------------------
class ProcessBatchApi(BatchApi):
    """A cluster whose Jobs are local processes running the manifest's container (env and Secrets resolved).

    It outlives the service, as a cluster does: a restarted service re-attaches to the Jobs still running.
    """

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.jobs: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.secrets: dict[str, dict] = {}

    def create_job(self, namespace: str, body: dict) -> None:
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise AlreadyExists(f"jobs.batch {name!r} already exists")
        container = body["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][0] == "python"
        env = {**os.environ, **self.env}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]]["stringData"][ref["key"]]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *container["command"][1:]], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.jobs[name] = body

    def _with_status(self, name: str) -> dict:
        code = self.procs[name].poll()
        status: dict = {"active": 1}
        if code is not None:
            kind = "Complete" if code == 0 else "Failed"
            status = {"conditions": [{"type": kind, "status": "True", "reason": f"exit code {code}"}]}
        return {**self.jobs[name], "status": status}

    def read_job(self, namespace: str, name: str) -> dict | None:
        return self._with_status(name) if name in self.jobs else None

    def delete_job(self, namespace: str, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.jobs.pop(name, None)

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict]:
        return [self._with_status(name) for name in self.jobs]

    def put_secret(self, namespace: str, body: dict) -> None:
        self.secrets[body["metadata"]["name"]] = body

    def delete_secret(self, namespace: str, name: str) -> None:
        self.secrets.pop(name, None)

    def pod_failure(self, namespace: str, job_name: str) -> str:
        return (self.log_dir / f"{job_name}.log").read_text()[-500:]

    def pod_stuck(self, namespace: str, job_name: str) -> str:
        return ""

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            self.delete_job("", name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_kubernetes_worker_outlives_a_service_restart_and_its_buffered_events_arrive_once(tmp_path, monkeypatch):
    api = ProcessBatchApi(_guarded_env(tmp_path), tmp_path)
    monkeypatch.setattr(k8s_runner, "KubernetesBatchApi", lambda: api)
    port = _free_port()
    config = ServiceConfig(
        port=port,
        log_format="text",
        data_dir=tmp_path / "data",
        job_runner="kubernetes",
        kubernetes=KubernetesSettings(
            namespace="ml",
            trainer_image="trainer:test",
            data_claim="layercard-data",
            service_address=f"127.0.0.1:{port}",
            poll_seconds=0.2,
        ),
    )
    steps = 40
    try:
        first = ServerThread(config).start()
        with grpc.insecure_channel(first.address) as channel:
            stub = tuning_pb2_grpc.TuningServiceStub(channel)
            job = stub.CreateTuningJob(_request("restart-bot", steps=steps), timeout=30)
            call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=job.name), timeout=300)
            for event in call:  # training has begun: the worker reports through the service
                if event.WhichOneof("event") == "step" and event.step.step >= 2:
                    call.cancel()
                    break
        job_id = job.name.split("/")[1]
        job_name = f"layercard-{job_id}"
        checkpoints = tmp_path / "data" / "artifacts" / "checkpoints" / job_id
        first.stop()  # the Kubernetes runner leaves its Jobs running: the worker trains on, alone
        assert api.procs[job_name].poll() is None
        before = latest_step(checkpoints)
        _wait(lambda: "the service is unreachable" in api.log(job_name), "the worker to notice")
        # It trains on while the service is away (a new checkpoint shows it): those steps' events wait in its
        # buffer, retried with backoff.
        _wait(lambda: latest_step(checkpoints) > before, "a checkpoint written while the service was away")
        second = ServerThread(config).start()  # same data dir and port: the runner re-attaches to the Job
        try:
            with grpc.insecure_channel(second.address) as channel:
                stub = tuning_pb2_grpc.TuningServiceStub(channel)
                events = _events(stub, job.name)
                done = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name))
            _wait(lambda: api.procs[job_name].poll() is not None, "the worker's exit", timeout=60)
        finally:
            second.stop()
    finally:
        api.close()
    assert done.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, (done.error_code, done.error_message)
    assert api.procs.get(job_name) is None or api.procs[job_name].returncode == 0
    _assert_complete_history(events, steps)
    assert "the service answers again" in api.log(job_name)
    assert done.result.adapter_version == "adapters/restart-bot/versions/1"
    lines = _guard_lines(tmp_path)
    assert any(line.endswith("guard active") for line in lines) and not any(" connect " in line for line in lines)


# --- credentials and bad input --------------------------------------------------------------------------------
SPEC = JobSpec(
    "builtin:tiny", DatasetRequest(builtin="builtin:cipher"), None, PlacementSpec(layers=(1,)), Hyperparameters(), "bot"
)


@pytest.fixture
def auth_server(tmp_path):
    """A server with a public bearer token, and two RUNNING jobs (made in its store, never run) with credentials."""
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path / "data", auth_token="public-token")
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        store = running.server.core.tuning.store
        tokens = {}
        for job_id in ("job-a", "job-b"):
            store.create(job_id, None, SPEC, 5)
            tokens[job_id] = issue_worker_token(store, job_id)
            store.transition(job_id, [JobState.QUEUED], JobState.RUNNING)
        yield worker_pb2_grpc.WorkerServiceStub(channel), channel, store, tokens


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _code_and_field(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    fields = []
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return err.code(), ",".join(fields)


def test_only_the_jobs_own_credential_opens_the_internal_api(auth_server):
    stub, channel, _, tokens = auth_server
    get = W.GetJobRequest(job_id="job-a")
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert _code_and_field(lambda: stub.GetJob(get, timeout=10))[0] == unauthenticated  # no token
    assert _code_and_field(lambda: stub.GetJob(get, metadata=_as("wrong"), timeout=10))[0] == unauthenticated
    assert _code_and_field(lambda: stub.GetJob(get, metadata=_as("public-token"), timeout=10))[0] == unauthenticated
    other = _code_and_field(lambda: stub.GetJob(get, metadata=_as(tokens["job-b"]), timeout=10))
    assert other[0] == grpc.StatusCode.PERMISSION_DENIED
    job = stub.GetJob(get, metadata=_as(tokens["job-a"]), timeout=10)  # no public token needed
    assert json.loads(job.spec_json)["adapter_id"] == "bot" and job.state == tuning_pb2.TUNING_JOB_STATE_RUNNING
    # A worker's token opens nothing of the public API.
    public = tuning_pb2_grpc.TuningServiceStub(channel)
    listing = tuning_pb2.ListTuningJobsRequest()
    assert _code_and_field(lambda: public.ListTuningJobs(listing, metadata=_as(tokens["job-a"])))[0] == unauthenticated
    assert len(public.ListTuningJobs(listing, metadata=_as("public-token")).tuning_jobs) == 2


def test_reports_are_idempotent_by_batch_and_an_ended_job_takes_no_more(auth_server):
    stub, _, store, tokens = auth_server
    me = _as(tokens["job-a"])
    events = [W.WorkerEvent(kind="step", payload_json=json.dumps({"step": n}).encode()) for n in (1, 2)]
    first = stub.ReportProgress(W.ReportProgressRequest(job_id="job-a", batch=1, events=events, step=2), metadata=me)
    retried = stub.ReportProgress(W.ReportProgressRequest(job_id="job-a", batch=1, events=events, step=2), metadata=me)
    assert first.recorded and not retried.recorded  # the answer was lost, the batch sent again: written once
    assert [e.payload["step"] for e in store.events_after("job-a", 0) if e.kind == "step"] == [1, 2]
    assert store.get("job-a").step == 2
    assert stub.GetJob(W.GetJobRequest(job_id="job-a"), metadata=me).recorded_steps == {"step": 2}
    fail = W.FinishJobRequest(
        job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_FAILED, error_code="INTERNAL", error_message="boom"
    )
    assert stub.FinishJob(fail, metadata=me).applied
    again = stub.FinishJob(fail, metadata=me)
    assert not again.applied and again.state == tuning_pb2.TUNING_JOB_STATE_FAILED
    late = stub.ReportProgress(W.ReportProgressRequest(job_id="job-a", batch=2, events=events), metadata=me)
    assert not late.recorded and late.state == tuning_pb2.TUNING_JOB_STATE_FAILED
    assert store.get("job-a").error_code == "INTERNAL"


@pytest.mark.parametrize(
    "method, request_, field",
    [
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", batch=1, events=[W.WorkerEvent(kind="state")]),
         "events[0].kind"),
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", batch=1,
                                                   events=[W.WorkerEvent(kind="step", payload_json=b"{not json")]),
         "events[0].payload_json"),
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", batch=1,
                                                   events=[W.WorkerEvent(kind="step", payload_json=b"[1]")]),
         "events[0].payload_json"),
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", batch=-1), "batch"),
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", events=[W.WorkerEvent(kind="note")]), "batch"),
        ("ReportProgress", W.ReportProgressRequest(job_id="job-a", step=-3), "step"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a"), "outcome"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_RUNNING), "outcome"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_FAILED), "error_code"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_SUCCEEDED,
                                         staged_adapter_path="/etc"), "staged_adapter_path"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_SUCCEEDED,
                                         staged_adapter_path="../../../x"), "staged_adapter_path"),
        ("FinishJob", W.FinishJobRequest(job_id="job-a", outcome=tuning_pb2.TUNING_JOB_STATE_SUCCEEDED,
                                         result_json=b"nope"), "result_json"),
    ],
)  # fmt: skip
def test_bad_reports_get_invalid_argument_naming_the_field_and_the_server_keeps_serving(
    auth_server, method, request_, field
):
    stub, channel, store, tokens = auth_server
    code, fields = _code_and_field(lambda: getattr(stub, method)(request_, metadata=_as(tokens["job-a"]), timeout=10))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    assert store.state("job-a") == JobState.RUNNING  # nothing was written
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_full_disk_on_the_service_side_makes_the_worker_exit_with_the_disk_full_code(tmp_path, monkeypatch):
    """The service does the writes now: its RESOURCE_EXHAUSTED/DISK_FULL answer is the worker's own full disk."""
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path / "data")
    with ServerThread(config) as running:
        store = running.server.core.tuning.store
        store.create("job-a", None, SPEC, 5)
        token = issue_worker_token(store, "job-a")
        store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)

        def full(*args, **kwargs):
            raise disk_full_error(store.path.parent)

        monkeypatch.setattr(store, "_write", full)
        settings = worker.parse_args(["--data-dir", str(tmp_path / "data"), "--job-id", "job-a"])
        channel = GrpcChannel(running.address, token, "job-a")
        try:
            assert worker.run_job(channel, settings) == worker.EXIT_DISK_FULL  # the runner then records DISK_FULL
        finally:
            channel.close()
        assert store.state("job-a") == JobState.RUNNING
