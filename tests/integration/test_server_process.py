"""The layercard-server console script as a real process: port 0, the printed port, SIGTERM, TLS, bad flags,
one server per data dir, and a port that is taken."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.lock import DataDirInUse
from layercard_service.server import EXIT_DATA_DIR_IN_USE, EXIT_PORT_UNAVAILABLE, PortUnavailable

SERVER = [sys.executable, "-m", "layercard_service.server"]


def start_process(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*SERVER, "--port", "0", "--log-format", "text", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()
    assert "listening on" in line, f"unexpected first line {line!r}; stderr: {proc.stderr.read()}"
    return proc, line.rsplit(" ", 1)[-1].strip()


def test_port_zero_prints_bound_port_and_sigterm_exits_cleanly():
    proc, address = start_process("--metrics-port", "0")
    try:
        assert not address.endswith(":0")
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        metrics_line = proc.stdout.readline()
        assert "/metrics" in metrics_line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_settings_come_from_the_environment_and_bad_ones_stop_startup():
    proc, address = start_process(env={"LAYERCARD_AUTH_TOKEN": "env-token"})
    try:
        with grpc.insecure_channel(address) as channel:
            from layercard.v1 import placement_pb2, placement_pb2_grpc

            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.PlanPlacement(placement_pb2.PlanPlacementRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run([*SERVER, "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "port must be in 0..65535" in bad.stderr


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls(tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    config = ServiceConfig(port=0, tls_cert_file=cert_file, tls_key_file=key_file, log_format="text")
    with ServerThread(config) as running:
        address = f"localhost:{running.server.port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
        with grpc.secure_channel(address, credentials) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)


def test_sigterm_right_after_the_listening_line_stops_gracefully():
    # The ready lines used to come before the signal handler: a SIGTERM then killed the process outright
    # (-15, no graceful stop), most of the time; three tries make a miss of that old race unlikely.
    for _ in range(3):
        proc, _address = start_process("--metrics-port", "0")
        assert "/metrics" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read()
        assert "stopped" in stderr and "never retrieved" not in stderr and "Traceback" not in stderr


def _job_request() -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[1], lora=common_pb2.LoraShape(rank=4)),
        hyperparameters=tuning_pb2.Hyperparameters(steps=100_000, batch_size=2, max_seq_len=32),  # minutes
        adapter_id="locked-bot",
    )


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
def test_a_second_server_on_the_same_data_dir_fails_fast_and_leaves_the_first_ones_job_alone(tmp_path):
    data = tmp_path / "data"
    first, address = start_process("--data-dir", str(data), "--job-threads", "1")
    store = JobStore(data / "state.db")
    try:
        with grpc.insecure_channel(address) as channel:
            job = tuning_pb2_grpc.TuningServiceStub(channel).CreateTuningJob(_job_request(), timeout=60)
        job_id = job.name.rsplit("/", 1)[-1]
        _wait(lambda: store.state(job_id) == JobState.RUNNING and store.worker_pid(job_id))
        worker, events = store.worker_pid(job_id), len(store.events_after(job_id, 0))

        second = subprocess.run(
            [*SERVER, "--port", "0", "--data-dir", str(data)], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == EXIT_DATA_DIR_IN_USE
        assert str(data) in second.stderr and f"pid {first.pid}" in second.stderr
        with pytest.raises(DataDirInUse):
            ServerThread(ServiceConfig(port=0, log_format="text", data_dir=data))

        assert _alive(worker) and store.state(job_id) == JobState.RUNNING and store.worker_pid(job_id) == worker
        assert "after a service restart" not in " ".join(e.message for e in store.events_after(job_id, events))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        with ServerThread(ServiceConfig(port=0, log_format="text", data_dir=data, job_threads=1)) as after:
            assert after.server.port  # the lock went with the first server: a new one starts and recovers
            _wait(lambda: store.state(job_id) == JobState.RUNNING and store.worker_pid(job_id) not in (None, worker))
    finally:
        first.kill()
        store.close()


def test_a_server_whose_port_is_taken_fails_without_touching_job_states(tmp_path):
    data = tmp_path / "data"
    store = JobStore(data / "state.db")
    spec = JobSpec(
        "builtin:tiny",
        DatasetRequest(builtin="builtin:cipher"),
        None,
        PlacementSpec(layers=(1,)),
        Hyperparameters(),
        "b",
    )
    store.create("job-c", None, spec, 5)
    store.transition("job-c", [JobState.QUEUED], JobState.RUNNING)
    store.transition("job-c", [JobState.RUNNING], JobState.CANCELLING)
    store.create("job-r", None, spec, 5)
    store.transition("job-r", [JobState.QUEUED], JobState.RUNNING)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = ServerThread(ServiceConfig(port=port, log_format="text", data_dir=data))
        try:
            with pytest.raises(PortUnavailable):
                running.start()
        finally:
            running.stop()
        assert store.state("job-c") == JobState.CANCELLING and store.state("job-r") == JobState.RUNNING
        process = subprocess.run(
            [*SERVER, "--port", str(port), "--data-dir", str(data)], capture_output=True, text=True, timeout=60
        )
        assert process.returncode == EXIT_PORT_UNAVAILABLE and f"127.0.0.1:{port}" in process.stderr
        assert store.state("job-c") == JobState.CANCELLING and store.state("job-r") == JobState.RUNNING
    with ServerThread(ServiceConfig(port=0, log_format="text", data_dir=data)):  # the lock was released
        assert store.state("job-c") == JobState.CANCELLED
    store.close()
