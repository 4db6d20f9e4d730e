"""Responses that do not grow with the data, and DeleteTuningJob: the real server on a socket, real SQLite.

Most tests swap in an inert runner at the runner seam (jobs stay QUEUED until cancelled), so that many jobs with
large inline datasets cost no training; the last one runs real workers to check what a delete removes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.fakes import RecordingRunner
from support.server_thread import ServerThread
from test_tuning import _config, _details, _hp, _request, _states, _wait_for_event, _watch

from layercard.v1 import adapter_pb2, adapter_pb2_grpc, common_pb2, placement_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_client import errors
from layercard_client.aio import AsyncLayercardClient
from layercard_client.cli import main as cli_main
from layercard_client.client import LayercardClient
from layercard_service.api.tuning import TuningServicer
from layercard_service.control.tuning import TuningService
from layercard_service.persistence import store as store_module
from layercard_service.persistence.jobs import JobStore
from layercard_service.server import Servicers

S = tuning_pb2
DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024  # what a gRPC client accepts unless told otherwise


def _jsonl(size: int, tag: str = "x") -> bytes:
    """A valid dataset of about ``size`` bytes: 16 examples of long prompts."""
    line = json.dumps({"prompt": tag * max(1, size // 16 - 40), "completion": " y"}) + "\n"
    return (line * 16).encode()


@pytest.fixture
def inert(tmp_path):
    jobs_dir = tmp_path / "jobs"
    # The runner runs nothing: jobs stay QUEUED until cancelled.
    service = TuningService(JobStore(jobs_dir / "state.db"), RecordingRunner(), (), (), queue_size=64)
    servicers = Servicers(tuning=TuningServicer(service))
    with ServerThread(_config(tmp_path / "server"), servicers) as running:
        running.service, running.jobs_dir = service, jobs_dir
        with grpc.insecure_channel(running.address) as channel:  # gRPC's default limits: 4 MiB received
            running.stub = tuning_pb2_grpc.TuningServiceStub(channel)
            running.health = health_pb2_grpc.HealthStub(channel)
            yield running
    service.store.close()


def _serving(server) -> None:
    status = server.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _expect(call, request, code: grpc.StatusCode, *, field: str | None = None, reason: str | None = None) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    err = caught.value
    assert err.code() == code, err.details()
    details = _details(err)
    if field is not None:
        assert field in [v.field for v in details["BadRequest"].field_violations], err.details()
    if reason is not None:
        assert details["ErrorInfo"].reason == reason, err.details()


def _dataset_file(server, data: bytes) -> Path:
    return server.jobs_dir / "artifacts" / "datasets" / f"{hashlib.sha256(data).hexdigest()}.jsonl"


def _cancel(stub, name: str) -> None:
    assert stub.CancelTuningJob(S.CancelTuningJobRequest(name=name), timeout=10).state == S.TUNING_JOB_STATE_CANCELLED


def test_an_inline_dataset_is_stored_once_and_shown_by_reference(inert):
    data = _jsonl(5 * 1024 * 1024)  # more than a default client accepts, were it echoed
    request = _request(training_data=common_pb2.DatasetSource(inline_jsonl=data), validation_data=None)
    created = inert.stub.CreateTuningJob(request, timeout=60)
    got = inert.stub.GetTuningJob(S.GetTuningJobRequest(name=created.name), timeout=10)  # the 4 MiB client
    for job in (created, got):
        source = job.training_data
        assert source.WhichOneof("source") == "inline_jsonl" and source.inline_jsonl == b""
        assert source.inline_jsonl_sha256 == hashlib.sha256(data).hexdigest()
        assert source.inline_jsonl_size_bytes == len(data)
        assert job.ByteSize() < 16 * 1024
    assert _dataset_file(inert, data).read_bytes() == data
    with sqlite3.connect(inert.jobs_dir / "state.db") as db:
        (spec,) = db.execute("SELECT spec FROM tuning_jobs").fetchone()
    assert len(spec) < 16 * 1024  # the record holds the reference, never the bytes
    again = inert.stub.CreateTuningJob(request, timeout=60)  # equal data: one file for both
    assert again.training_data.inline_jsonl_sha256 == source.inline_jsonl_sha256
    assert len(list(_dataset_file(inert, data).parent.iterdir())) == 1


def test_list_pages_stay_under_the_byte_bound_and_together_list_every_job(inert, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_LIST_RESPONSE_BYTES", 48 * 1024)  # so that a few jobs fill a page
    placement = placement_pb2.Placement(layers=[4, 5], lora=common_pb2.LoraShape(rank=4), rationale="r" * 20_000)
    names = []
    for i in range(7):  # ~20 KB each shown (a caller's placement is echoed), 1 MB of data each, not shown
        request = _request(
            training_data=common_pb2.DatasetSource(inline_jsonl=_jsonl(1024 * 1024, tag=str(i))),
            placement=placement,
            validation_data=None,
        )
        names.append(inert.stub.CreateTuningJob(request, timeout=60).name)
    listed, token, pages = [], "", 0
    while True:
        page = inert.stub.ListTuningJobs(S.ListTuningJobsRequest(page_size=100, page_token=token), timeout=10)
        assert len(page.tuning_jobs) >= 1 and page.ByteSize() <= 48 * 1024
        listed += [j.name for j in page.tuning_jobs]
        pages, token = pages + 1, page.next_page_token
        if not token:
            break
    assert listed == names[::-1] and pages >= 3  # newest first, none skipped or repeated
    monkeypatch.undo()
    everything = inert.stub.ListTuningJobs(S.ListTuningJobsRequest(page_size=100), timeout=10)  # the real bound
    assert [j.name for j in everything.tuning_jobs] == names[::-1] and not everything.next_page_token
    assert everything.ByteSize() <= store_module.MAX_LIST_RESPONSE_BYTES


def test_user_strings_a_job_echoes_are_capped_and_the_server_keeps_serving(inert):
    huge = placement_pb2.Placement(layers=[4], lora=common_pb2.LoraShape(rank=4), rationale="r" * 100_000)
    _expect(inert.stub.CreateTuningJob, _request(placement=huge), grpc.StatusCode.INVALID_ARGUMENT, field="placement")
    _serving(inert)
    many = S.ExplicitLayers(layers=[4], lora=common_pb2.LoraShape(rank=4, target_modules=["q_proj"] * 65))
    long = S.ExplicitLayers(layers=[4], lora=common_pb2.LoraShape(rank=4, target_modules=["q" * 65]))
    for layers in (many, long):
        _expect(
            inert.stub.CreateTuningJob,
            _request(explicit_layers=layers),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="placement.lora.target_modules",
        )
        _serving(inert)
    assert inert.stub.CreateTuningJob(_request(), timeout=30).state == S.TUNING_JOB_STATE_QUEUED


def test_delete_refuses_bad_names_unknown_and_unended_jobs_and_the_server_keeps_serving(inert):
    stub, invalid = inert.stub, grpc.StatusCode.INVALID_ARGUMENT
    queued = stub.CreateTuningJob(_request(), timeout=30)
    for name in ("", "abc", "tuningJobs/", "tuningJobs/UPPER", "tuningJobs/a/b", "layerCards/abc"):
        _expect(stub.DeleteTuningJob, S.DeleteTuningJobRequest(name=name), invalid, field="name")
        _serving(inert)
    missing = S.DeleteTuningJobRequest(name="tuningJobs/no-such-job")
    _expect(stub.DeleteTuningJob, missing, grpc.StatusCode.NOT_FOUND, reason="TUNING_JOB_NOT_FOUND")
    _serving(inert)
    for state in ("QUEUED", "RUNNING", "CANCELLING"):
        if state != "QUEUED":
            with sqlite3.connect(inert.jobs_dir / "state.db") as db:  # as the runner and a cancel would
                db.execute("UPDATE tuning_jobs SET state = ?", (state,))
        request = S.DeleteTuningJobRequest(name=queued.name)
        _expect(stub.DeleteTuningJob, request, grpc.StatusCode.FAILED_PRECONDITION, reason="TUNING_JOB_NOT_ENDED")
        _serving(inert)
        assert stub.GetTuningJob(S.GetTuningJobRequest(name=queued.name), timeout=10).name == queued.name
    assert inert.service.runner.forgotten == []


def test_delete_removes_the_job_and_its_dataset_once_no_other_job_uses_it(inert):
    stub = inert.stub
    shared, own = _jsonl(64 * 1024, "s"), _jsonl(64 * 1024, "o")
    first = stub.CreateTuningJob(
        _request(
            training_data=common_pb2.DatasetSource(inline_jsonl=shared),
            validation_data=common_pb2.DatasetSource(inline_jsonl=own),
        ),
        timeout=30,
    )
    second = stub.CreateTuningJob(
        _request(training_data=common_pb2.DatasetSource(inline_jsonl=shared), validation_data=None), timeout=30
    )
    for job in (first, second):
        _cancel(stub, job.name)
    stub.DeleteTuningJob(S.DeleteTuningJobRequest(name=first.name), timeout=10)
    _expect(stub.GetTuningJob, S.GetTuningJobRequest(name=first.name), grpc.StatusCode.NOT_FOUND)
    _expect(stub.DeleteTuningJob, S.DeleteTuningJobRequest(name=first.name), grpc.StatusCode.NOT_FOUND)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.WatchTuningJob(S.WatchTuningJobRequest(name=first.name), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not _dataset_file(inert, own).exists() and _dataset_file(inert, shared).exists()  # still second's
    listed = stub.ListTuningJobs(S.ListTuningJobsRequest(), timeout=10)
    assert [j.name for j in listed.tuning_jobs] == [second.name]
    assert _states(_watch(stub, second.name, timeout=30))[-1] == S.TUNING_JOB_STATE_CANCELLED

    stub.DeleteTuningJob(S.DeleteTuningJobRequest(name=second.name), timeout=10)
    assert not _dataset_file(inert, shared).exists()
    assert inert.service.runner.forgotten == [first.name.split("/")[1], second.name.split("/")[1]]
    with sqlite3.connect(inert.jobs_dir / "state.db") as db:
        assert db.execute("SELECT COUNT(*) FROM tuning_job_events").fetchone() == (0,)
    _serving(inert)


def test_an_idempotent_retry_with_other_data_leaves_no_orphan_artifact(inert):
    data, other = _jsonl(32 * 1024, "a"), _jsonl(32 * 1024, "b")
    first = inert.stub.CreateTuningJob(
        _request(training_data=common_pb2.DatasetSource(inline_jsonl=data), request_id="req-1"), timeout=30
    )
    retry = inert.stub.CreateTuningJob(
        _request(training_data=common_pb2.DatasetSource(inline_jsonl=other), request_id="req-1"), timeout=30
    )
    assert retry.name == first.name and retry.training_data.inline_jsonl_sha256 == hashlib.sha256(data).hexdigest()
    assert _dataset_file(inert, data).exists() and not _dataset_file(inert, other).exists()


def test_the_clients_and_the_cli_delete_ended_jobs_and_report_refusals(inert, capsys):
    ended = [inert.stub.CreateTuningJob(_request(), timeout=30).name for _ in range(3)]
    for name in ended:
        _cancel(inert.stub, name)
    queued = inert.stub.CreateTuningJob(_request(), timeout=30).name
    with LayercardClient(inert.address) as client:
        assert client.delete_tuning_job(ended[0]) is None
        with pytest.raises(errors.NotFound):
            client.get_tuning_job(ended[0])
        with pytest.raises(errors.FailedPrecondition) as refused:
            client.delete_tuning_job(queued.split("/")[1])  # a bare id works too
        assert refused.value.reason == "TUNING_JOB_NOT_ENDED"

    async def delete_async() -> None:
        async with AsyncLayercardClient(inert.address) as client:
            assert await client.delete_tuning_job(ended[1]) is None
            with pytest.raises(errors.InvalidArgument):
                await client.delete_tuning_job("tuningJobs/UPPER")

    asyncio.run(delete_async())

    assert cli_main(["--address", inert.address, "jobs", "delete", ended[2]]) == 0
    assert f"deleted {ended[2]}" in capsys.readouterr().out
    assert cli_main(["--address", inert.address, "--json", "jobs", "delete", queued]) != 0
    assert "TUNING_JOB_NOT_ENDED" in capsys.readouterr().err
    listed = inert.stub.ListTuningJobs(S.ListTuningJobsRequest(), timeout=10)
    assert [j.name for j in listed.tuning_jobs] == [queued]
    _serving(inert)


@pytest.mark.slow
def test_delete_removes_checkpoints_and_log_but_keeps_published_adapter_versions(tmp_path):
    config = _config(tmp_path, max_concurrent_jobs=1)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = tuning_pb2_grpc.TuningServiceStub(channel)
        adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
        done = stub.CreateTuningJob(_request(adapter_id="kept", hyperparameters=_hp(steps=2)), timeout=60)
        assert _states(_watch(stub, done.name))[-1] == S.TUNING_JOB_STATE_SUCCEEDED
        version = stub.GetTuningJob(S.GetTuningJobRequest(name=done.name), timeout=10).result.adapter_version

        long = stub.CreateTuningJob(_request(hyperparameters=_hp(steps=500, checkpoint_interval=1)), timeout=60)
        _wait_for_event(stub, long.name, lambda e: e.WhichOneof("event") == "checkpoint")
        stub.CancelTuningJob(S.CancelTuningJobRequest(name=long.name), timeout=10)
        assert _states(_watch(stub, long.name))[-1] == S.TUNING_JOB_STATE_CANCELLED
        long_id = long.name.split("/")[1]
        checkpoints = tmp_path / "artifacts" / "checkpoints" / long_id
        log = tmp_path / "logs" / "jobs" / f"{long_id}.log"
        assert checkpoints.is_dir() and log.is_file()
        validation = _dataset_file_in(tmp_path, long.validation_data.inline_jsonl_sha256)
        assert validation.is_file()  # both jobs used the same validation data

        stub.DeleteTuningJob(S.DeleteTuningJobRequest(name=long.name), timeout=10)
        assert not checkpoints.exists() and not log.exists() and validation.is_file()
        stub.DeleteTuningJob(S.DeleteTuningJobRequest(name=done.name), timeout=10)
        assert not validation.exists()
        assert stub.ListTuningJobs(S.ListTuningJobsRequest(), timeout=10).tuning_jobs == []

        listed = adapters.ListAdapters(adapter_pb2.ListAdaptersRequest(), timeout=30).adapters
        kept = next(a for a in listed if a.name == "adapters/kept")
        assert [v.name for v in kept.versions] == [version] and kept.versions[0].tuning_job == done.name
        assert (tmp_path / "artifacts" / "adapters" / "kept" / "1" / "adapter_config.json").is_file()


def _dataset_file_in(data_dir: Path, sha256: str) -> Path:
    return data_dir / "artifacts" / "datasets" / f"{sha256}.jsonl"
