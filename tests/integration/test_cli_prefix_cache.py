"""The CLI's side of the prefix cache: ``jobs create --no-prefix-cache`` sends an explicit false (unset otherwise,
the service's default), and ``jobs watch`` prints the cache's event line."""

from __future__ import annotations

import pytest
from support.server_thread import ServerThread

from layercard.v1 import tuning_pb2, tuning_pb2_grpc
from layercard_client.cli import main
from layercard_service.server import Servicers

STATE = tuning_pb2.TuningJobState
LINE = "prefix cache on: blocks 0-5 cached for 16 examples in 0.01 s, 0.1 MiB in memory; about 0.002 s saved per step"


class RecordingJobs(tuning_pb2_grpc.TuningServiceServicer):
    def __init__(self) -> None:
        self.created: list[tuning_pb2.CreateTuningJobRequest] = []

    async def CreateTuningJob(self, request, context):
        self.created.append(request)
        return tuning_pb2.TuningJob(name="tuningJobs/abc", state=STATE.TUNING_JOB_STATE_QUEUED, total_steps=3)

    async def GetTuningJob(self, request, context):
        return tuning_pb2.TuningJob(name=request.name, state=STATE.TUNING_JOB_STATE_SUCCEEDED, step=3, total_steps=3)

    async def WatchTuningJob(self, request, context):
        report = tuning_pb2.PrefixCacheReport(enabled=True, cached_blocks=6, examples=16)
        yield tuning_pb2.TuningJobEvent(sequence=1, prefix_cache=report, message=LINE)
        yield tuning_pb2.TuningJobEvent(sequence=2, state_change=STATE.TUNING_JOB_STATE_SUCCEEDED)


@pytest.fixture
def jobs():
    recording = RecordingJobs()
    with ServerThread(servicers=Servicers(tuning=recording)) as running:
        yield running, recording


def _create(address: str, *extra: str) -> int:
    base = ["--address", address, "jobs", "create", "--model", "builtin:tiny", "--dataset", "builtin:cipher"]
    return main([*base, "--adapter-id", "cipher", "--layers", "6,7", *extra])


def test_no_prefix_cache_sends_an_explicit_false_and_the_default_leaves_it_unset(jobs, capsys):
    server, recording = jobs
    assert _create(server.address, "--no-prefix-cache") == 0
    assert _create(server.address) == 0
    off, default = recording.created
    assert off.hyperparameters.HasField("prefix_cache") and not off.hyperparameters.prefix_cache
    assert not default.hyperparameters.HasField("prefix_cache")


def test_watch_prints_the_prefix_cache_line(jobs, capsys):
    server, _ = jobs
    assert main(["--address", server.address, "jobs", "watch", "abc"]) == 0
    assert LINE in capsys.readouterr().err
