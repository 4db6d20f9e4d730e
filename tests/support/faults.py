"""Fault scenarios without vLLM, shared by tests/integration/test_faults.py and ``make bench BENCH=hardening``.

Each scenario injects one fault into a real server (a process, or a thread with real worker processes), asserts
the end state the design promises, and returns what ``lost_data`` finds in the data directory afterwards:
events not numbered 1..n, step numbers that skip or repeat within a run, a job left non-final without a live
worker, a SQLite integrity failure. A scenario that cannot reach its end state raises AssertionError.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, tuning_pb2, tuning_pb2_grpc

__all__ = ["SCENARIOS", "ServerProcess", "lost_data", "serving"]

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
VALIDATION = "".join(json.dumps({"prompt": f"word {i}:", "completion": f" w{i}"}) + "\n" for i in range(8))


class ServerProcess:
    """``layercard-server`` as a real process on port 0 (so that it can be killed -9), its log in a file."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "layercard_service.server", "--port", "0", "--log-format", "text",
                 "--data-dir", str(data_dir), "--job-threads", "1", *flags],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r}; log:\n{self.log.read_text()[-3000:]}")
        self.address = line.rsplit(" ", 1)[-1].strip()
        self.channel = grpc.insecure_channel(self.address)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.channel.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        self.channel.close()


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _alive_worker(pid: int | None) -> bool:
    try:
        return bool(pid) and b"layercard_service.trainer.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def lost_data(data_dir: Path) -> list[str]:
    """Every broken promise about the state the data directory holds; [] when nothing was lost."""
    problems = []
    with sqlite3.connect(f"file:{data_dir / 'state.db'}?mode=ro", uri=True) as db:
        check = db.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            problems.append(f"integrity_check: {check}")
        jobs = db.execute("SELECT job_id, state, step, total_steps, worker_pid FROM tuning_jobs").fetchall()
        for job_id, state, step, total, pid in jobs:
            if state not in FINAL and (state != "QUEUED" and not _alive_worker(pid)):
                problems.append(f"job {job_id} is {state} without a live worker")
            rows = db.execute(
                "SELECT sequence, kind, payload FROM tuning_job_events WHERE job_id = ? ORDER BY sequence", (job_id,)
            ).fetchall()
            if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
                problems.append(f"job {job_id}: event sequences {[r[0] for r in rows]} are not 1..{len(rows)}")
            problems += _step_problems(job_id, [(kind, json.loads(payload)) for _, kind, payload in rows])
            if state == "SUCCEEDED" and step != total:
                problems.append(f"job {job_id} SUCCEEDED at step {step} of {total}")
    return problems


def _step_problems(job_id: str, events: list[tuple[str, dict]]) -> list[str]:
    """Each step is reported once, in order, across every run of the job: a run resumed from a checkpoint
    repeats the steps after it, but reports only those the job has not reported yet (issue 12)."""
    steps = [payload["step"] for kind, payload in events if kind == "step"]
    if steps != list(range(1, len(steps) + 1)):
        return [f"job {job_id}: steps are not reported once each from 1: {steps}"]
    return []


def _worker_pid(data_dir: Path, name: str) -> int | None:
    with sqlite3.connect(f"file:{data_dir / 'state.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT worker_pid FROM tuning_jobs WHERE job_id = ?", (name.split("/")[1],)).fetchone()
    return row[0] if row else None


def _job_request(adapter_id: str, steps: int, checkpoint_interval: int = 5) -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        validation_data=common_pb2.DatasetSource(inline_jsonl=VALIDATION.encode()),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[6, 7], lora=common_pb2.LoraShape(rank=4)),
        hyperparameters=tuning_pb2.Hyperparameters(
            steps=steps, batch_size=4, max_seq_len=32, checkpoint_interval=checkpoint_interval
        ),
        adapter_id=adapter_id,
    )


def _wait_for(stub, name: str, predicate: Callable, timeout: float = 300) -> tuning_pb2.TuningJobEvent:
    call = stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=name), timeout=timeout)
    for event in call:
        if predicate(event):
            call.cancel()
            return event
    raise AssertionError(f"{name} ended before the awaited event")


def _finish(stub, name: str, timeout: float = 300) -> tuning_pb2.TuningJob:
    list(stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=name), timeout=timeout))
    return stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=name), timeout=30)


def server_killed_mid_job(tmp: Path) -> list[str]:
    """kill -9 of the server while a job trains; a new server on the same data dir resumes it to success."""
    data_dir = tmp / "state"
    with ServerProcess(data_dir) as first:
        stub = tuning_pb2_grpc.TuningServiceStub(first.channel)
        job = stub.CreateTuningJob(_job_request("survivor", steps=40), timeout=60)
        _wait_for(stub, job.name, lambda e: e.WhichOneof("event") == "checkpoint")
        assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    # The worker outlives its server (its own session). Frozen, it cannot finish the job before the next server
    # starts, however fast the machine: that server must then deal with a stale worker, the hard case.
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(_worker_pid(data_dir, job.name), signal.SIGSTOP)
    with ServerProcess(data_dir) as second:
        stub = tuning_pb2_grpc.TuningServiceStub(second.channel)
        events = list(stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=job.name), timeout=300))
        assert sum("after a service restart" in e.message for e in events) == 1  # it resumed, once
        done = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name), timeout=30)
        assert done.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, (done.state, done.error_message)
        assert done.step == 40 and done.result.adapter_version == "adapters/survivor/versions/1"
        assert serving(second.channel)
    return lost_data(data_dir)


def worker_killed_mid_step(tmp: Path) -> list[str]:
    """kill -9 of a job's worker: the job ends FAILED with WORKER_DIED, the server serves the next job."""
    data_dir = tmp / "state"
    with ServerProcess(data_dir) as server:
        stub = tuning_pb2_grpc.TuningServiceStub(server.channel)
        job = stub.CreateTuningJob(_job_request("doomed", steps=10_000), timeout=60)
        _wait_for(stub, job.name, lambda e: e.WhichOneof("event") == "step" and e.step.step >= 2)
        pid = _worker_pid(data_dir, job.name)
        assert _alive_worker(pid)
        os.kill(pid, signal.SIGKILL)
        done = _finish(stub, job.name, timeout=120)
        assert done.state == tuning_pb2.TUNING_JOB_STATE_FAILED and done.error_code == "WORKER_DIED", done
        assert serving(server.channel)
        after = stub.CreateTuningJob(_job_request("after", steps=3), timeout=60)
        assert _finish(stub, after.name).state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED
    return lost_data(data_dir)


def sigterm_during_card(tmp: Path) -> list[str]:
    """SIGTERM while a card computes: exit 0 soon after the grace, no partial card stored, a new server works."""
    data_dir = tmp / "state"
    big = layer_card_pb2.ComputeLayerCardRequest(
        model="builtin:tiny",
        dataset=common_pb2.DatasetSource(builtin="builtin:cipher"),
        probe_size=512,
        compute_coupling=True,
    )
    with ServerProcess(data_dir, "--shutdown-grace-seconds", "2") as server:
        stream = layer_card_pb2_grpc.LayerCardServiceStub(server.channel).ComputeLayerCard(big, timeout=300)
        for response in stream:
            if response.WhichOneof("event") == "progress" and response.progress.phase not in ("queued", "load_model"):
                break  # computing now
        began = time.monotonic()
        assert server.kill(signal.SIGTERM) == 0
        assert time.monotonic() - began < 60
        stream.cancel()
    with ServerProcess(data_dir) as again:
        cards = layer_card_pb2_grpc.LayerCardServiceStub(again.channel)
        # A card that finished within the grace may be stored; a partial one never is.
        for stored in cards.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(), timeout=30).layer_cards:
            assert len(stored.layers) == stored.num_layers == stored.coupling.size == 8, stored.name
            assert stored.probe_examples > 0 and len(stored.coupling.values) == 64
        small = layer_card_pb2.ComputeLayerCardRequest(
            model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), probe_size=8
        )
        card = list(cards.ComputeLayerCard(small, timeout=300))[-1].card
        assert card.num_layers == 8 and not card.from_store
        assert cards.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=card.name), timeout=30).name == card.name
        assert serving(again.channel)
    return lost_data(data_dir)


def sigterm_mid_job(tmp: Path) -> list[str]:
    """SIGTERM (a rolling restart) while a job trains: exit 0, the job stays resumable, the next server finishes it."""
    data_dir = tmp / "state"
    with ServerProcess(data_dir) as first:
        stub = tuning_pb2_grpc.TuningServiceStub(first.channel)
        job = stub.CreateTuningJob(_job_request("rolled", steps=40), timeout=60)
        _wait_for(stub, job.name, lambda e: e.WhichOneof("event") == "checkpoint")
        assert first.kill(signal.SIGTERM) == 0
    with ServerProcess(data_dir) as second:
        stub = tuning_pb2_grpc.TuningServiceStub(second.channel)
        done = _finish(stub, job.name)
        assert done.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, (done.state, done.error_message)
        assert done.step == 40 and serving(second.channel)
    return lost_data(data_dir)


def second_server_on_the_data_dir(tmp: Path) -> list[str]:
    """A second server on a data dir in use exits at once (code 3) and leaves the first one's job untouched."""
    data_dir = tmp / "state"
    with ServerProcess(data_dir) as first:
        stub = tuning_pb2_grpc.TuningServiceStub(first.channel)
        job = stub.CreateTuningJob(_job_request("undisturbed", steps=100_000), timeout=60)
        _wait_for(stub, job.name, lambda e: e.WhichOneof("event") == "step")
        pid = _worker_pid(data_dir, job.name)
        second = subprocess.run(
            [sys.executable, "-m", "layercard_service.server", "--port", "0", "--data-dir", str(data_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 3 and str(data_dir) in second.stderr, (second.returncode, second.stderr[-500:])
        state = stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=job.name), timeout=30)
        assert state.state == tuning_pb2.TUNING_JOB_STATE_RUNNING, (state.state, state.error_message)
        assert _alive_worker(pid) and _worker_pid(data_dir, job.name) == pid  # the first one's worker lives on
        stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=job.name), timeout=30)
        assert _finish(stub, job.name).state == tuning_pb2.TUNING_JOB_STATE_CANCELLED
        assert serving(first.channel)
    return lost_data(data_dir)


SCENARIOS: dict[str, Callable[[Path], list[str]]] = {
    "server_killed_mid_job": server_killed_mid_job,
    "worker_killed_mid_step": worker_killed_mid_step,
    "sigterm_during_card": sigterm_during_card,
    "sigterm_mid_job": sigterm_mid_job,
    "second_server_on_the_data_dir": second_server_on_the_data_dir,
}
