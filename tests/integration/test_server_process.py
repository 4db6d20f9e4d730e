"""The layercard-server console script as a real process: port 0, the printed port, SIGTERM, TLS, bad flags."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.server_thread import ServerThread

from layercard_service.config import ServiceConfig

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
