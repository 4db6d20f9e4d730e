"""Data-parallel jobs through the service. A global batch smaller than the ranks a job trains on is refused at
creation, naming the field. And the Kubernetes runner's multi-GPU launch, run here: the trainer container's
command for 2 GPUs (``torchrun --standalone --nproc_per_node 2 -m layercard_service.trainer.worker ...``) and
its environment, started on this machine (2 CPU ranks, gloo) against a real server over its socket, trains one
job to SUCCEEDED: rank 0 reports each step once and publishes the adapter, rank 1 trains its shard of every
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.fakes import RecordingRunner
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.api.tuning import TuningServicer
from layercard_service.config import ServiceConfig
from layercard_service.control.tuning import TuningService
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.kubernetes.manifest import KubernetesSettings, job_manifest
from layercard_service.runners.local import worker_command
from layercard_service.runners.worker_reports import TOKEN_ENV, issue_worker_token
from layercard_service.server import Servicers

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_a_batch_smaller_than_the_ranks_is_refused_at_creation(tmp_path):
    store, runner = JobStore(tmp_path / "state.db"), RecordingRunner()
    runner.ranks_per_job = 4  # as the Kubernetes runner with k8s_gpus = 4
    servicers = Servicers(tuning=TuningServicer(TuningService(store, runner, (), (), data_dir=tmp_path)))
    with ServerThread(servicers=servicers) as server, grpc.insecure_channel(server.address) as channel:
        stub = tuning_pb2_grpc.TuningServiceStub(channel)

        def request(batch_size: int) -> tuning_pb2.CreateTuningJobRequest:
            return tuning_pb2.CreateTuningJobRequest(
                model="builtin:tiny",
                training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
                explicit_layers=tuning_pb2.ExplicitLayers(layers=[7]),
                hyperparameters=tuning_pb2.Hyperparameters(steps=2, batch_size=batch_size),
                adapter_id="bot",
            )

        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateTuningJob(request(2), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 data-parallel ranks" in caught.value.details()
        status = rpc_status.from_call(caught.value)
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in status.details)
        assert [v.field for v in bad.field_violations] == ["hyperparameters.batch_size"]
        assert runner.submitted == []
        stub.CreateTuningJob(request(4), timeout=30)  # one example a rank: accepted
        assert len(runner.submitted) == 1
    store.close()


def test_the_two_gpu_launch_trains_the_job_on_two_ranks(tmp_path):
    spec = JobSpec(
        model="builtin:tiny",
        training_data=DatasetRequest(builtin="builtin:lexicon"),
        validation_data=None,  # the task's own validation split: base and final evaluation, sharded
        placement=PlacementSpec(layers=(7,), rank=4, alpha=8.0, dropout=0.0),
        hyperparameters=Hyperparameters(steps=3, batch_size=8, max_seq_len=32, checkpoint_interval=2),
        adapter_id="bot",
    )
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path)
    with ServerThread(config) as server:
        store = server.server.core.tuning.store
        # As the Kubernetes runner does before it creates the Job: RUNNING, and the attempt's credential.
        store.create("job-a", None, spec, spec.hyperparameters.steps)
        store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
        token = issue_worker_token(store, "job-a")
        settings = KubernetesSettings(
            namespace="ml", trainer_image="trainer:1", data_claim="data", service_address=server.address, gpus=2
        )
        command = worker_command(tmp_path, (), (), 16, threads=1)
        container = job_manifest("job-a", settings, command, data_dir=tmp_path)["spec"]["template"]["spec"]
        container = container["containers"][0]
        argv = container["command"]
        assert argv[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env[TOKEN_ENV] = token  # the Secret's key, as the pod reads it
        done = subprocess.run(
            [str(TORCHRUN), *argv[1:]],
            env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        job = store.get("job-a")
        assert job.state == JobState.SUCCEEDED, job.error_message
        assert job.result.adapter_version == "adapters/bot/versions/1"
        assert job.result.final_eval is not None and job.result.base_eval is not None
        events = store.events_after("job-a", 0)
        assert [e.payload["step"] for e in events if e.kind == "step"] == [1, 2, 3]  # rank 0 alone reports
        assert any(e.kind == "note" and e.message.startswith("data-parallel on 2 ranks") for e in events)
        metadata = json.loads((tmp_path / "artifacts" / "adapters" / "bot" / "1" / "layercard.json").read_text())
        assert metadata["data_parallel_ranks"] == 2
        assert "rank 1 of 2 trained its shards up to step 3" in done.stderr  # (before: "only rank 0 trains")
