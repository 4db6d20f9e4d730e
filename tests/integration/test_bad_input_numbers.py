"""Numbers, nesting and ids no request should carry, over a real socket: each is INVALID_ARGUMENT naming the
field (never INTERNAL, never accepted), and the server keeps serving after it."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    common_pb2,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_service.config import ServiceConfig

INF, NAN = float("inf"), float("nan")
DEEP = b"[" * 100_000 + b"]" * 100_000  # a JSON line nested 100,000 deep


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServiceConfig(port=0, log_format="text", data_dir=tmp_path_factory.mktemp("state"), job_threads=1)
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        running.cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        running.jobs = tuning_pb2_grpc.TuningServiceStub(channel)
        running.adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
        running.health = health_pb2_grpc.HealthStub(channel)
        yield running


def _fields(err: grpc.RpcError) -> list[str]:
    fields = []
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _invalid(server, call, request, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=60)  # streaming calls are passed wrapped in list()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert _fields(err.value) == [field]
    check = server.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    server.jobs.ListTuningJobs(tuning_pb2.ListTuningJobsRequest(), timeout=10)  # a good call still answers


# --- ComputeLayerCard -------------------------------------------------------------------------------------------
def _card(**overrides) -> layer_card_pb2.ComputeLayerCardRequest:
    fields = dict(model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), probe_size=32)
    fields.update(overrides)
    return layer_card_pb2.ComputeLayerCardRequest(**fields)


CARDS = [
    ("alpha infinity", _card(lora=common_pb2.LoraShape(alpha=INF)), "lora.alpha"),
    ("alpha NaN", _card(lora=common_pb2.LoraShape(alpha=NAN)), "lora.alpha"),
    ("alpha negative", _card(lora=common_pb2.LoraShape(alpha=-1)), "lora.alpha"),
    ("dropout -5", _card(lora=common_pb2.LoraShape(dropout=-5)), "lora.dropout"),
    ("dropout 1", _card(lora=common_pb2.LoraShape(dropout=1)), "lora.dropout"),
    ("dropout NaN", _card(lora=common_pb2.LoraShape(dropout=NAN)), "lora.dropout"),
    ("deep array", _card(dataset=common_pb2.DatasetSource(inline_jsonl=DEEP + b"\n")), "line 1"),
    (
        "deep value on line 2",
        _card(dataset=common_pb2.DatasetSource(inline_jsonl=b'{"text": "ok"}\n{"text": ' + DEEP + b"}\n")),
        "line 2",
    ),
]


@pytest.mark.parametrize(("label", "request_", "field"), CARDS, ids=[c[0] for c in CARDS])
def test_compute_layer_card_rejects(server, label, request_, field):
    _invalid(server, lambda r, timeout: list(server.cards.ComputeLayerCard(r, timeout=timeout)), request_, field)


# --- CreateTuningJob --------------------------------------------------------------------------------------------
def _job(**overrides) -> tuning_pb2.CreateTuningJobRequest:
    fields = dict(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[0], lora=common_pb2.LoraShape(rank=8)),
        hyperparameters=tuning_pb2.Hyperparameters(steps=1, batch_size=8, max_seq_len=64),
        adapter_id="numbers",
    )
    fields.update(overrides)
    return tuning_pb2.CreateTuningJobRequest(**fields)


def _placement(**overrides) -> placement_pb2.Placement:
    fields = dict(layers=[0], lora=common_pb2.LoraShape(rank=8))
    fields.update(overrides)
    return placement_pb2.Placement(**fields)


JOBS = [
    ("deep training line", _job(training_data=common_pb2.DatasetSource(inline_jsonl=DEEP)), "line 1"),
    ("step seconds infinity", _job(placement=_placement(step_seconds=common_pb2.Prediction(value=INF))), None),
    ("memory NaN", _job(placement=_placement(peak_memory_bytes=common_pb2.Prediction(value=NAN))), None),
    ("memory infinity", _job(placement=_placement(peak_memory_bytes=common_pb2.Prediction(value=INF))), None),
    ("memory negative", _job(placement=_placement(peak_memory_bytes=common_pb2.Prediction(value=-1))), None),
    ("plan steps negative", _job(placement=_placement(steps=-5)), "placement.steps"),
    ("plan steps huge", _job(placement=_placement(steps=2_000_000_000)), "placement.steps"),
    ("plan learning rate NaN", _job(placement=_placement(learning_rate=NAN)), "placement.learning_rate"),
    ("plan learning rate negative", _job(placement=_placement(learning_rate=-1e-3)), "placement.learning_rate"),
    ("plan serving pool not a name", _job(placement=_placement(serving_pool="Lean Pool")), "placement.serving_pool"),
    (
        "plan curve step 0",
        _job(placement=_placement(predicted_curve=[placement_pb2.CurvePoint(steps=0, gain=1.0)])),
        "placement.predicted_curve[0]",
    ),
    (
        "plan curve gain infinity",
        _job(placement=_placement(predicted_curve=[placement_pb2.CurvePoint(steps=5, gain=INF)])),
        "placement.predicted_curve[0]",
    ),
    ("placement dropout -5", _job(placement=_placement(lora=common_pb2.LoraShape(rank=8, dropout=-5))), None),
    *(
        (
            f"min delta {value}",
            _job(hyperparameters=tuning_pb2.Hyperparameters(steps=1, **{name: value})),
            f"hyperparameters.{name}",
        )
        for name in ("early_stopping_min_delta", "early_stopping_min_delta_relative")
        for value in (NAN, INF, -1.0)
    ),
]
PLACEMENT_FIELDS = {
    "step seconds infinity": "placement.step_seconds.value",
    "memory NaN": "placement.peak_memory_bytes.value",
    "memory infinity": "placement.peak_memory_bytes.value",
    "memory negative": "placement.peak_memory_bytes.value",
    "placement dropout -5": "placement.lora.dropout",
}


@pytest.mark.parametrize(("label", "request_", "field"), JOBS, ids=[j[0] for j in JOBS])
def test_create_tuning_job_rejects(server, label, request_, field):
    _invalid(server, server.jobs.CreateTuningJob, request_, field or PLACEMENT_FIELDS[label])


# --- ids and names with whitespace --------------------------------------------------------------------------------
SPACES = ["\n", " ", "\t", "\r\n", "\x00"]


@pytest.mark.parametrize("tail", SPACES, ids=repr)
def test_ids_with_trailing_whitespace_are_invalid(server, tail):
    _invalid(server, server.jobs.CreateTuningJob, _job(adapter_id="base1" + tail), "adapter_id")
    _invalid(server, server.jobs.CreateTuningJob, _job(tuning_job_id="job1" + tail), "tuning_job_id")
    for call, message in (
        (server.jobs.GetTuningJob, tuning_pb2.GetTuningJobRequest),
        (server.jobs.CancelTuningJob, tuning_pb2.CancelTuningJobRequest),
    ):
        _invalid(server, call, message(name="tuningJobs/job1" + tail), "name")
    watch = tuning_pb2.WatchTuningJobRequest(name="tuningJobs/job1" + tail)
    _invalid(server, lambda r, timeout: list(server.jobs.WatchTuningJob(r, timeout=timeout)), watch, "name")
    deploy = adapter_pb2.DeployAdapterRequest(adapter="adapters/base1" + tail)
    _invalid(server, server.adapters.DeployAdapter, deploy, "adapter")
    undeploy = adapter_pb2.UndeployAdapterRequest(adapter="adapters/base1" + tail)
    _invalid(server, server.adapters.UndeployAdapter, undeploy, "adapter")


@pytest.mark.parametrize("fraction", [INF, NAN, -0.5], ids=["infinity", "NaN", "negative"])
def test_deploy_budget_must_be_a_finite_fraction(server, fraction):
    request = adapter_pb2.DeployAdapterRequest(adapter="adapters/base1", max_overhead_fraction=fraction)
    _invalid(server, server.adapters.DeployAdapter, request, "max_overhead_fraction")
