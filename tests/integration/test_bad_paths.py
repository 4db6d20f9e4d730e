"""Paths from callers over a real socket: nothing outside the roots is read, none of it is echoed back, and a
path the file system cannot take is INVALID_ARGUMENT naming the field. The server keeps serving after each."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, tuning_pb2, tuning_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.models.builtin import builtin_model_path

SECRET = "s3cret-outside-the-roots"  # in every file outside the roots: it must never come back in an error


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    models, data, outside = base / "models", base / "data", base / "outside"
    for folder in (models, data, outside):
        folder.mkdir()
    secret_json = outside / "config.json"  # valid JSON, so a reader would get far enough to quote a value of it
    secret_json.write_text(json.dumps({"model_type": SECRET, "num_hidden_layers": SECRET}))
    secret_text = outside / "notes.txt"
    secret_text.write_text(f"{SECRET}\n")

    def model(name: str) -> str:
        folder = models / name
        shutil.copytree(builtin_model_path("tiny"), folder)
        return str(folder)

    config_out = model("config-out")  # config.json -> a file outside the roots
    (models / "config-out" / "config.json").unlink()
    (models / "config-out" / "config.json").symlink_to(secret_json)
    weights_out = model("weights-out")  # every file but config.json could be one transformers opens
    for file in (models / "weights-out").iterdir():
        if file.name != "config.json":
            file.unlink()
            file.symlink_to(secret_text)
    sub_out = model("subfolder-out")  # a folder in the model that links out
    (models / "subfolder-out" / "extra").symlink_to(outside, target_is_directory=True)
    linked = models / "linked"  # a model directory that is itself a link within the roots: fine
    linked.symlink_to(model("real"), target_is_directory=True)
    bad_content = model("bad-content")  # inside the roots, but what it holds must not be echoed either
    (models / "bad-content" / "config.json").write_text(json.dumps({"model_type": SECRET}))
    broken_json = model("broken-json")
    (models / "broken-json" / "config.json").write_text(f"{{{SECRET}")
    (data / "out.jsonl").symlink_to(secret_text)
    return {
        "models": models,
        "data": data,
        "outside": outside,
        "config_out": config_out,
        "weights_out": weights_out,
        "sub_out": sub_out,
        "linked": str(linked),
        "bad_content": bad_content,
        "broken_json": broken_json,
        "dataset_out": str(data / "out.jsonl"),
    }


@pytest.fixture(scope="module")
def server(layout, tmp_path_factory):
    config = ServiceConfig(
        port=0,
        log_format="text",
        data_dir=tmp_path_factory.mktemp("state"),
        model_roots=(layout["models"],),
        dataset_roots=(layout["data"],),
        job_threads=1,
    )
    with ServerThread(config) as running, grpc.insecure_channel(running.address) as channel:
        running.cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        running.jobs = tuning_pb2_grpc.TuningServiceStub(channel)
        running.health = health_pb2_grpc.HealthStub(channel)
        yield running


def _card(server, model: str = "builtin:tiny", dataset: common_pb2.DatasetSource | None = None) -> None:
    request = layer_card_pb2.ComputeLayerCardRequest(
        model=model,
        dataset=dataset or common_pb2.DatasetSource(builtin="builtin:cipher"),
        probe_size=32,
        max_seq_len=48,
    )
    list(server.cards.ComputeLayerCard(request, timeout=300))


def _job(server, model: str = "builtin:tiny", training: common_pb2.DatasetSource | None = None, lr: float = 1e-3):
    request = tuning_pb2.CreateTuningJobRequest(
        model=model,
        training_data=training or common_pb2.DatasetSource(builtin="builtin:cipher"),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[0], lora=common_pb2.LoraShape(rank=8)),
        hyperparameters=tuning_pb2.Hyperparameters(steps=1, batch_size=8, max_seq_len=64, learning_rate=lr),
        adapter_id="paths",
    )
    server.jobs.CreateTuningJob(request, timeout=60)


def _details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return info, fields


def _still_serving(server) -> None:
    check = server.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    server.jobs.ListTuningJobs(tuning_pb2.ListTuningJobsRequest(), timeout=10)  # a good call still answers


def _fails(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    assert SECRET not in err.value.details()
    return err.value


# --- links out of the roots --------------------------------------------------------------------------------------
LINKS_OUT = [
    ("config.json", "config_out", "config.json"),
    ("weights and tokenizer files", "weights_out", "notes.txt"),
    ("a folder", "sub_out", ""),
]


@pytest.mark.parametrize("rpc", [_card, _job])
@pytest.mark.parametrize(("label", "key", "target"), LINKS_OUT, ids=[x[0] for x in LINKS_OUT])
def test_a_model_file_linking_out_of_the_roots_is_refused(server, layout, rpc, label, key, target):
    err = _fails(rpc, server, model=layout[key])
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    info, _ = _details(err)
    assert info.reason == "PATH_OUTSIDE_ROOTS"
    assert info.metadata["field"] == "model"
    assert info.metadata["resolved_path"] == str(layout["outside"] / target)
    assert info.metadata["resolved_path"] in err.details()  # the message names what was refused
    _still_serving(server)


@pytest.mark.parametrize("rpc", [_card, _job])
def test_a_dataset_linking_out_of_the_roots_is_refused_naming_the_resolved_path(server, layout, rpc):
    source = common_pb2.DatasetSource(path=layout["dataset_out"])
    err = _fails(rpc, server, **({"dataset": source} if rpc is _card else {"training": source}))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    info, _ = _details(err)
    assert info.reason == "PATH_OUTSIDE_ROOTS"
    assert info.metadata["resolved_path"] == str(layout["outside"] / "notes.txt")
    assert str(layout["outside"] / "notes.txt") in err.details()
    _still_serving(server)


def test_a_model_directory_that_links_within_the_roots_is_accepted(server, layout):
    # The model passes every check; the bad learning rate, checked after it, is what fails the request.
    err = _fails(_job, server, model=layout["linked"], lr=-1.0)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(err)[1] == ["hyperparameters.learning_rate"]


# --- content is never echoed --------------------------------------------------------------------------------------
def test_a_model_that_fails_to_load_is_not_quoted(server, layout):
    err = _fails(_card, server, model=layout["bad_content"])  # transformers' own message names the model_type
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot load model" in err.details()
    _still_serving(server)


def test_a_config_that_is_not_json_is_named_by_line_not_quoted(server, layout):
    err = _fails(_job, server, model=layout["broken_json"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json is not valid JSON (line 1" in err.details()
    assert _details(err)[1] == ["model"]
    _still_serving(server)


# --- paths no file system takes ------------------------------------------------------------------------------------
def _unusable(layout) -> list[tuple[str, str]]:
    models, data = layout["models"], layout["data"]
    return [
        ("model", f"{models}/a\x00b"),
        ("model", f"{models}/{'m' * 300}"),  # one name over NAME_MAX: ENAMETOOLONG
        ("dataset", f"{data}/a\x00b.jsonl"),
        ("dataset", f"{data}/{'d' * 300}.jsonl"),
        ("dataset", f"{data}/{'d/' * 3000}x.jsonl"),  # short names, a whole path over PATH_MAX
    ]


UNUSABLE_IDS = ["model NUL", "model long name", "data NUL", "data long name", "data long"]


@pytest.mark.parametrize("rpc", [_card, _job])
@pytest.mark.parametrize("case", range(5), ids=UNUSABLE_IDS)
def test_a_path_the_file_system_cannot_take_is_invalid_argument(server, layout, rpc, case):
    kind, path = _unusable(layout)[case]
    if kind == "model":
        err, field = _fails(rpc, server, model=path), "model"
    else:
        source = common_pb2.DatasetSource(path=path)
        if rpc is _card:
            err, field = _fails(rpc, server, dataset=source), "dataset.path"
        else:
            err, field = _fails(rpc, server, training=source), "training_data.path"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert _details(err)[1] == [field]
    _still_serving(server)
