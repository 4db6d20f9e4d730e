"""A full data-dir disk, for real: the data dir on a small tmpfs, filled to the last byte.

Needs root to mount the tmpfs (this machine and CI have it). A full disk must answer RESOURCE_EXHAUSTED with
reason DISK_FULL, keep the server SERVING, end a job whose worker meets it FAILED with DISK_FULL once the disk
takes the write (the runner retries it), and leave state.db intact.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, tuning_pb2, tuning_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.domain.jobs import JobState

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Writes a file until the disk refuses another byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            while True:
                try:
                    if handle.write(chunk) == 0:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def _server(disk: Path) -> ServerThread:
    config = ServiceConfig(port=0, log_format="text", data_dir=disk / "data", job_threads=1, max_concurrent_jobs=1)
    return ServerThread(config).start()


def _reason(err: grpc.RpcError) -> str:
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def _serving(channel) -> bool:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _integrity(data_dir: Path) -> str:
    with sqlite3.connect(data_dir / "state.db") as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def _card_request() -> layer_card_pb2.ComputeLayerCardRequest:
    return layer_card_pb2.ComputeLayerCardRequest(
        model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), probe_size=32, max_seq_len=48
    )


def _job_request(steps: int = 100_000) -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[1], lora=common_pb2.LoraShape(rank=4)),
        hyperparameters=tuning_pb2.Hyperparameters(steps=steps, batch_size=2, max_seq_len=32),
        adapter_id="full-bot",
    )


def test_a_card_on_a_full_disk_is_resource_exhausted_and_the_server_keeps_serving(small_disk):
    running = _server(small_disk)
    try:
        with grpc.insecure_channel(running.address) as channel:
            cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
            tuning = tuning_pb2_grpc.TuningServiceStub(channel)
            filler = fill(small_disk)
            with pytest.raises(grpc.RpcError) as err:
                list(cards.ComputeLayerCard(_card_request(), timeout=300))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert _reason(err.value) == "DISK_FULL" and "data dir" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                tuning.CreateTuningJob(_job_request(), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _reason(err.value) == "DISK_FULL"
            assert _serving(channel)
            filler.unlink()
            events = list(cards.ComputeLayerCard(_card_request(), timeout=300))  # space again: it works
            assert events[-1].WhichOneof("event") == "card"
    finally:
        running.stop()
    assert _integrity(small_disk / "data") == "ok"


def test_a_job_whose_worker_meets_a_full_disk_ends_failed_disk_full_once_space_is_freed(small_disk):
    running = _server(small_disk)
    runner = running.server.core.tuning.runner
    try:
        with grpc.insecure_channel(running.address) as channel:
            tuning = tuning_pb2_grpc.TuningServiceStub(channel)
            job = tuning.CreateTuningJob(_job_request(), timeout=60)
            job_id = job.name.rsplit("/", 1)[-1]
            _wait(lambda: runner.running == [job_id])  # RUNNING, its worker started (it trains for minutes)
            filler = fill(small_disk)
            _wait(lambda: runner.running == [])  # the worker could not write, and left
            supervisor = runner._monitors[-1]
            time.sleep(1.0)  # a few refused retries of the runner's own write
            assert supervisor.is_alive() and runner._dispatcher.is_alive()
            assert running.server.core.tuning.store.state(job_id) == JobState.RUNNING  # not ended: nothing written
            assert _serving(channel)
            filler.unlink()
            _wait(lambda: running.server.core.tuning.store.state(job_id) == JobState.FAILED, timeout=60)
            done = tuning.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name), timeout=10)
            assert done.error_code == "DISK_FULL" and "disk is full" in done.error_message
            assert runner._dispatcher.is_alive()
    finally:
        running.stop()
    assert _integrity(small_disk / "data") == "ok"
