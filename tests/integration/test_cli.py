"""The ``layercard`` CLI against a real in-process server: in-process through ``main([...])``, and once for real
as the installed console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, tuning_pb2, tuning_pb2_grpc
from layercard_client.cli import main
from layercard_service.config import ServiceConfig
from layercard_service.server import Servicers

TOKEN = "cli-token"
SUBCOMMANDS = ("health", "card", "plan", "jobs", "adapters", "generate")
STATE = tuning_pb2.TuningJobState


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_card() -> layer_card_pb2.LayerCard:
    layers = [
        layer_card_pb2.LayerStats(index=i, resnorm_share=share, predicted_gain=share / 10, activation_bytes=4096)
        for i, share in enumerate((0.7, 0.3))
    ]
    return layer_card_pb2.LayerCard(
        name="layerCards/abc", model="builtin:tiny", architecture="LlamaForCausalLM", num_layers=2, layers=layers
    )


class FakeCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def ComputeLayerCard(self, request, context):
        for fraction, phase in ((0.1, "load_model"), (0.6, "probe"), (1.0, "calibrate")):
            progress = common_pb2.Progress(phase=phase, fraction=fraction, eta=duration_pb2.Duration(seconds=1))
            yield layer_card_pb2.ComputeLayerCardResponse(progress=progress)
        yield layer_card_pb2.ComputeLayerCardResponse(card=tiny_card())


class FakeJobs(tuning_pb2_grpc.TuningServiceServicer):
    """A job that ran five of ten steps and failed."""

    async def GetTuningJob(self, request, context):
        return tuning_pb2.TuningJob(name=request.name, state=STATE.TUNING_JOB_STATE_FAILED, step=5, total_steps=10)

    async def WatchTuningJob(self, request, context):
        events = [
            tuning_pb2.TuningJobEvent(state_change=STATE.TUNING_JOB_STATE_RUNNING),
            tuning_pb2.TuningJobEvent(step=tuning_pb2.StepMetrics(step=5, loss=1.25)),
            tuning_pb2.TuningJobEvent(eval=tuning_pb2.EvalMetrics(step=5, loss=1.5)),
            tuning_pb2.TuningJobEvent(state_change=STATE.TUNING_JOB_STATE_FAILED, message="out of memory"),
        ]
        for sequence, event in enumerate(events, start=1):
            event.sequence = sequence
            yield event


@pytest.fixture
def fake_server():
    with ServerThread(servicers=Servicers(layer_card=FakeCards(), tuning=FakeJobs())) as running:
        yield running


# health


def test_health_readable(server, capsys):
    code, out, err = run(capsys, "--address", server.address, "health")
    assert code == 0, err
    assert "SERVING" in out and server.address in out


def test_health_json(server, capsys):
    code, out, _ = run(capsys, "--address", server.address, "--json", "health")
    assert code == 0
    assert json.loads(out) == {"status": "SERVING"}


def test_address_from_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("LAYERCARD_ADDRESS", server.address)
    code, out, _ = run(capsys, "health", "--wait", "5")
    assert code == 0 and "SERVING" in out


def test_health_of_unknown_service_is_not_found(server, capsys):
    code, _, err = run(capsys, "--address", server.address, "health", "--service", "layercard.v1.Nope")
    assert code == 4 and "NOT_FOUND" in err


# errors


def test_error_json_exits_nonzero_with_error_on_stderr(server, capsys):
    code, out, err = run(capsys, "--address", server.address, "--json", "adapters", "deploy", "nope")
    assert code == 4  # NOT_FOUND
    assert out == ""
    error = json.loads(err)["error"]
    assert error["code"] == "NOT_FOUND"
    assert error["reason"] == "ADAPTER_NOT_FOUND"
    assert "adapters/nope" in error["message"]


def test_error_readable(server, capsys):
    code, out, err = run(capsys, "--address", server.address, "adapters", "undeploy", "nope")
    assert code == 4 and out == ""
    assert "NOT_FOUND" in err and "ADAPTER_NOT_FOUND" in err and "adapters/nope" in err


def test_token_option_and_exit_code_of_unauthenticated(capsys):
    with ServerThread(ServiceConfig(port=0, log_format="text", auth_token=TOKEN)) as running:
        code, _, err = run(capsys, "--address", running.address, "card", "get", "abc")
        assert code == 8 and "UNAUTHENTICATED" in err and "MISSING_TOKEN" in err
        code, _, err = run(capsys, "--address", running.address, "--token", TOKEN, "card", "get", "abc")
        assert code == 4 and "LAYER_CARD_NOT_FOUND" in err, err  # past auth, to the handler
        assert run(capsys, "--address", running.address, "health")[0] == 0


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "card")[0] == 2
    code, _, err = run(capsys, "--ca-file", "/no/such/ca.pem", "health")
    assert code == 2 and "CA file" in err


# help


def test_help_lists_subcommands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in SUBCOMMANDS:
        assert name in out
    assert "exit codes:" in out and "UNIMPLEMENTED" in out
    code, out, _ = run(capsys, "jobs", "--help")
    assert code == 0
    for action in ("create", "get", "list", "cancel", "delete", "watch"):
        assert action in out


# streams


def test_card_compute_json_is_one_object_per_line(fake_server, capsys):
    argv = ("--address", fake_server.address, "--json", "card", "compute", "--model", "builtin:tiny")
    code, out, _ = run(capsys, *argv, "--dataset", "builtin:cipher")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [next(iter(line)) for line in lines] == ["progress", "progress", "progress", "card"]
    assert lines[-1]["card"]["name"] == "layerCards/abc"


def test_card_compute_readable_shows_the_card(fake_server, capsys):
    argv = ("--address", fake_server.address, "card", "compute", "--model", "builtin:tiny")
    code, out, _ = run(capsys, *argv, "--dataset", "builtin:cipher", "--rank", "4")
    assert code == 0
    assert "layerCards/abc" in out and "LlamaForCausalLM" in out and "70.0%" in out


def test_jobs_watch_exits_21_when_the_job_failed(fake_server, capsys):
    code, out, _ = run(capsys, "--address", fake_server.address, "--json", "jobs", "watch", "abc")
    assert code == 21
    events = [json.loads(line) for line in out.splitlines()]
    assert [event["sequence"] for event in events] == ["1", "2", "3", "4"]  # int64 is a string in proto JSON
    assert events[-1]["stateChange"] == "TUNING_JOB_STATE_FAILED"
    code, out, err = run(capsys, "--address", fake_server.address, "jobs", "watch", "tuningJobs/abc")
    assert code == 21
    assert "tuningJobs/abc" in out and "failed" in out
    assert "out of memory" in err and "eval at step 5" in err


# the installed console script


def test_console_script_in_a_subprocess(server):
    script = Path(sys.executable).parent / "layercard"
    done = subprocess.run(
        [str(script), "--address", server.address, "health"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    done = subprocess.run(
        [str(script), "--address", server.address, "--json", "adapters", "deploy", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4
    assert json.loads(done.stderr)["error"]["code"] == "NOT_FOUND"
