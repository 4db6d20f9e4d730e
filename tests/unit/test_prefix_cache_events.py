"""The job's events say whether the frozen-prefix cache ran, what it cost and what a step saves, and why it was
off; the job option turns it off. Run in-process on a real job store, as test_tuning_worker.py does."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from support.fakes import RecordingRunner

from layercard.v1 import common_pb2, tuning_pb2
from layercard_service.api.tuning import TuningServicer, event_to_proto
from layercard_service.control.tuning import TuningService
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
from layercard_service.persistence.datasets import DatasetArtifacts
from layercard_service.persistence.jobs import JobStore
from layercard_service.runners.worker_reports import WorkerReports, issue_worker_token
from layercard_service.trainer import worker
from layercard_service.trainer.reporter import InProcessChannel

TRAIN = "".join(json.dumps({"prompt": f"say {i}", "completion": f" {i}"}) + "\n" for i in range(16)).encode()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _events(tmp_path, layers: tuple[int, ...], prefix_cache: bool = True) -> list:
    """The job's events, as WatchTuningJob sends them: 3 steps over 2 batches a epoch, so the cache pays."""
    store = JobStore(tmp_path / "state.db")
    DatasetArtifacts(tmp_path / "artifacts").put(TRAIN)
    spec = JobSpec(
        model="builtin:tiny",
        training_data=DatasetRequest(inline_sha256=hashlib.sha256(TRAIN).hexdigest(), inline_size_bytes=len(TRAIN)),
        validation_data=None,
        placement=PlacementSpec(layers=layers, rank=4, alpha=8.0),
        hyperparameters=Hyperparameters(steps=3, batch_size=8, max_seq_len=32, prefix_cache=prefix_cache),
        adapter_id="bot",
    )
    try:
        store.create("job-a", None, spec, spec.hyperparameters.steps)
        store.transition("job-a", [JobState.QUEUED], JobState.RUNNING)
        issue_worker_token(store, "job-a")
        channel = InProcessChannel(WorkerReports(store, tmp_path / "artifacts", 16), "job-a")
        settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a"])
        assert worker.run_job(channel, settings) == 0
        assert store.get("job-a").state == JobState.SUCCEEDED
        return [event_to_proto(e) for e in store.events_after("job-a", 0)]
    finally:
        store.close()


def _cache_events(events: list) -> list:
    return [e for e in events if e.WhichOneof("event") == "prefix_cache"]


def test_the_events_show_the_cache_ran_with_its_cost_and_saving(tmp_path):
    (event,) = _cache_events(_events(tmp_path, layers=(6, 7)))
    report = event.prefix_cache
    assert report.enabled and not report.reason and report.cached_blocks == 6 and report.examples == 16
    assert report.size_bytes > 0 and not report.on_disk
    assert report.build_duration.ToNanoseconds() > 0 and report.saved_per_step.ToNanoseconds() > 0
    assert event.message.startswith("prefix cache on: blocks 0-5 cached for 16 examples")


def test_the_events_say_why_the_cache_was_off(tmp_path):
    (event,) = _cache_events(_events(tmp_path, layers=(0, 7)))
    assert not event.prefix_cache.enabled and "block 0" in event.prefix_cache.reason
    assert event.message == f"prefix cache off: {event.prefix_cache.reason}"


def test_the_job_option_turns_it_off(tmp_path):
    (event,) = _cache_events(_events(tmp_path, layers=(7,), prefix_cache=False))
    assert not event.prefix_cache.enabled and "turned off" in event.prefix_cache.reason


def test_the_prefix_cache_option_is_the_callers_or_on_by_default(tmp_path):
    store = JobStore(tmp_path / "state.db")
    servicer = TuningServicer(TuningService(store, RecordingRunner(), (), (), max_lora_rank=16))

    def create(**hp) -> tuning_pb2.TuningJob:
        request = tuning_pb2.CreateTuningJobRequest(
            model="builtin:tiny",
            training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
            explicit_layers=tuning_pb2.ExplicitLayers(layers=[6, 7]),
            hyperparameters=tuning_pb2.Hyperparameters(**hp),
            adapter_id="cached",
        )
        return asyncio.run(servicer.CreateTuningJob(request, None))

    try:
        off, default = create(prefix_cache=False), create()
        assert off.hyperparameters.HasField("prefix_cache") and not off.hyperparameters.prefix_cache
        assert default.hyperparameters.prefix_cache
        assert not store.get(off.name.split("/")[1]).spec.hyperparameters.prefix_cache
        assert store.get(default.name.split("/")[1]).spec.hyperparameters.prefix_cache
    finally:
        store.close()
