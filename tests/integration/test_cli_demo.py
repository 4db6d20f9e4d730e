"""``layercard demo``: the whole pipeline through the CLI against a real in-process server (card, plan and a short
tuning job for real; no vLLM here), and once against fakes of every service for the deploy and generate steps."""

from __future__ import annotations

import json

import pytest
from support.server_thread import ServerThread

from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_client.cli import main
from layercard_client.cli.demo import DEMO_PROMPTS
from layercard_service.config import ServiceConfig
from layercard_service.data.tasks import get_task
from layercard_service.server import Servicers

STATE = tuning_pb2.TuningJobState
SHORT = ("--steps", "20", "--probe-size", "32", "--max-step-fraction", "0.6")  # seconds on two cores


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def real_server():
    """One server for the module: the second demo finds the first one's card in the store. The card is computed
    in this process (the server runs in a thread), so torch gets one thread, as the tuning workers do."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ServerThread(ServiceConfig(port=0, log_format="text", job_threads=1)) as running:
            yield running
    finally:
        torch.set_num_threads(threads)


def test_demo_prompts_are_validation_examples_of_the_task():
    validation = {(e.prompt, e.completion) for e in get_task("builtin:cipher").validation}
    assert set(DEMO_PROMPTS["builtin:cipher"]) <= validation


def _texts(value: object) -> set[str]:
    """Every string inside an example, whatever its shape (prompt and completion, or chat messages)."""
    if isinstance(value, str):
        return {value.strip()}
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, name) for name in value.__dataclass_fields__]
    return set().union(*map(_texts, value)) if isinstance(value, list | tuple) else set()


@pytest.mark.parametrize("dataset", sorted(DEMO_PROMPTS))
def test_every_demo_task_asks_questions_of_its_validation_split(dataset):
    task = get_task(dataset)
    questions = DEMO_PROMPTS[dataset]
    assert questions, f"the demo asks nothing of {dataset}: copy a question and its answer from its validation split"
    for question, answer in questions:
        assert any({question.strip(), answer.strip()} <= _texts(e) for e in task.validation), (question, answer)


@pytest.mark.slow
def test_demo_with_skip_deploy_shows_the_card_the_plan_and_the_finished_job(real_server, capsys):
    argv = ("--address", real_server.address, "demo", "--skip-deploy", "--adapter-id", "demo-skip", *SHORT)
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "1/3 card" in out and "layerCards/" in out and "Res² share" in out and "fwd+bwd ms" in out
    assert "2/3 plan" in out and "step time at most 60% of full-layer LoRA's" in out and "predicted step" in out
    assert "rationale:" in out
    assert "3/3 tuning" in out and "succeeded" in out and "adapters/demo-skip/versions/1" in out
    assert "measured / predicted" in out and "validation   loss" in out
    assert "--skip-deploy: stopping after tuning" in out and "demo finished" in out
    assert "step 20/20" in err  # progress lines go to stderr, like every progress display of the CLI


@pytest.mark.slow
def test_demo_without_vllm_stops_at_the_deploy_step_with_a_clear_message(real_server, capsys):
    argv = ("--address", real_server.address, "demo", "--adapter-id", "demo-deploy", *SHORT)
    code, out, err = run(capsys, *argv)
    # DeployAdapter is being built: until it lands the service answers UNIMPLEMENTED (exit 12); then, with no
    # vLLM configured, FAILED_PRECONDITION with reason NO_VLLM_SERVERS (exit 6). Either way the demo must say so
    # and fail; it never pretends the adapter went live.
    assert code in (6, 12), (code, err)
    assert "4/5 deploy" in out and "succeeded" in out  # the tuning before it finished
    assert "the demo stopped at step 4 (deploy)" in err
    if code == 6:
        assert "NO_VLLM_SERVERS" in err and "no vLLM servers" in err
    else:
        assert "UNIMPLEMENTED" in err and "cannot deploy adapters yet" in err
    assert "--skip-deploy" in err
    assert "5/5 generate" not in out and "demo finished" not in out


# every step against fakes: the deploy and generate steps need vLLM for real


CARD = "layerCards/fake"
VERSION = "adapters/demo-cipher/versions/3"


class FakeCards(layer_card_pb2_grpc.LayerCardServiceServicer):
    async def ComputeLayerCard(self, request, context):
        yield layer_card_pb2.ComputeLayerCardResponse(progress=common_pb2.Progress(phase="probe", fraction=0.5))
        layers = [
            layer_card_pb2.LayerStats(index=i, resnorm_sq=s, resnorm_share=s, predicted_gain=s / 2)
            for i, s in enumerate((0.2, 0.8))
        ]
        yield layer_card_pb2.ComputeLayerCardResponse(
            card=layer_card_pb2.LayerCard(name=CARD, model=request.model, num_layers=2, layers=layers)
        )


class FakePlacement(placement_pb2_grpc.PlacementServiceServicer):
    async def PlanPlacement(self, request, context):
        assert request.layer_card == CARD and request.budget.max_step_fraction_of_full == pytest.approx(1.0)  # default
        return placement_pb2.Placement(
            layer_card=CARD,
            layers=[1],
            lora=common_pb2.LoraShape(rank=4, alpha=8, target_modules=["q_proj"]),
            predicted_gain_share=0.8,
            step_seconds=common_pb2.Prediction(value=0.05, unit="s"),
            rationale="layer 1 holds most of the gain",
        )


class FakeJobs(tuning_pb2_grpc.TuningServiceServicer):
    def __init__(self, final: int = STATE.TUNING_JOB_STATE_SUCCEEDED) -> None:
        self.final = final

    async def CreateTuningJob(self, request, context):
        assert request.placement.layers == [1] and request.hyperparameters.steps == 4  # the plan itself
        return tuning_pb2.TuningJob(name="tuningJobs/fake", adapter_id=request.adapter_id, total_steps=4)

    async def WatchTuningJob(self, request, context):
        yield tuning_pb2.TuningJobEvent(sequence=1, state_change=STATE.TUNING_JOB_STATE_RUNNING)
        for step in range(1, 5):
            yield tuning_pb2.TuningJobEvent(sequence=1 + step, step=tuning_pb2.StepMetrics(step=step, loss=2.0 / step))
        yield tuning_pb2.TuningJobEvent(sequence=6, state_change=self.final)

    async def GetTuningJob(self, request, context):
        job = tuning_pb2.TuningJob(name=request.name, state=self.final, adapter_id="demo-cipher", step=4, total_steps=4)
        if self.final == STATE.TUNING_JOB_STATE_SUCCEEDED:
            job.result.CopyFrom(
                tuning_pb2.TuningResult(
                    adapter_version=VERSION,
                    base_eval=tuning_pb2.EvalMetrics(loss=8.0),
                    final_eval=tuning_pb2.EvalMetrics(loss=1.0, exact_match=1.0, examples=200),
                    measured_step_seconds=0.055,
                    predicted_step_seconds=0.05,
                )
            )
        return job


class FakeAdapters(adapter_pb2_grpc.AdapterServiceServicer):
    async def DeployAdapter(self, request, context):
        assert request.adapter == "adapters/demo-cipher" and request.version == 3
        replica = adapter_pb2.ReplicaStatus(
            replica="http://127.0.0.1:8000", healthy=True, desired_loaded=True, observed_adapters=["demo-cipher@v3"]
        )
        latency = adapter_pb2.LatencyMeasurement(
            replica="http://127.0.0.1:8000",
            base_ttft_ms=10.0,
            adapter_ttft_ms=12.0,
            base_inter_token_ms=2.0,
            adapter_inter_token_ms=2.5,
            overhead_fraction=0.2,
            samples=5,
        )
        return adapter_pb2.Deployment(
            adapter=request.adapter,
            version=3,
            served_name="demo-cipher@v3",
            state=adapter_pb2.DEPLOYMENT_STATE_READY,
            replicas=[replica],
            latency=latency,
        )


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    """The adapter answers the cipher; the base model does not."""

    async def Generate(self, request, context):
        answers = dict(DEMO_PROMPTS["builtin:cipher"])
        text = answers[request.prompt] if request.adapter else " the module"
        served = "demo-cipher@v3" if request.adapter else "builtin:tiny"
        return inference_pb2.GenerateResponse(text=text, served_model=served, latency_ms=30.0)


def fakes(jobs: FakeJobs | None = None) -> Servicers:
    return Servicers(
        layer_card=FakeCards(),
        placement=FakePlacement(),
        tuning=jobs or FakeJobs(),
        adapter=FakeAdapters(),
        inference=FakeInference(),
    )


def test_demo_shows_the_deployment_and_the_answers_with_and_without_the_adapter(capsys):
    with ServerThread(servicers=fakes()) as server:
        code, out, err = run(capsys, "--address", server.address, "demo", "--steps", "4")
    assert code == 0, err
    assert "5/5 generate" in out and "demo finished" in out
    assert "demo-cipher@v3" in out and "http://127.0.0.1:8000" in out and "ready" in out
    assert "time to first token" in out and "10.0 ms" in out and "12.0 ms" in out and "+20.0%" in out
    assert "measured / predicted 1.10" in out
    assert "exact match: base 0/3, with the adapter 3/3" in out
    for prompt, expected in DEMO_PROMPTS["builtin:cipher"]:
        assert prompt in out and expected.strip() in out


def test_demo_json_prints_each_steps_response(capsys):
    with ServerThread(servicers=fakes()) as server:
        code, out, _ = run(capsys, "--address", server.address, "--json", "demo", "--steps", "4")
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert documents[0]["name"] == CARD and documents[1]["layers"] == [1]
    assert documents[3]["result"]["adapterVersion"] == VERSION
    assert documents[4]["servedName"] == "demo-cipher@v3"
    assert len(documents) == 5 + 2 * len(DEMO_PROMPTS["builtin:cipher"])  # card, plan, job x2, deployment, answers


def test_demo_exits_21_when_the_job_fails(capsys):
    with ServerThread(servicers=fakes(FakeJobs(STATE.TUNING_JOB_STATE_FAILED))) as server:
        code, out, err = run(capsys, "--address", server.address, "demo", "--steps", "4")
    assert code == 21
    assert "the demo stopped at step 3 (tuning): the job ended failed" in err
    assert "4/5 deploy" not in out


class RecordingCards(FakeCards):
    def __init__(self) -> None:
        self.requests: list[layer_card_pb2.ComputeLayerCardRequest] = []

    async def ComputeLayerCard(self, request, context):
        self.requests.append(request)
        async for response in super().ComputeLayerCard(request, context):
            yield response


class RecordingJobs(FakeJobs):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuning_pb2.CreateTuningJobRequest] = []

    async def CreateTuningJob(self, request, context):
        self.requests.append(request)
        return tuning_pb2.TuningJob(name="tuningJobs/fake", adapter_id=request.adapter_id, total_steps=4)


def test_demo_on_an_instruct_model_runs_the_chat_task_with_its_probe_and_steps(capsys):
    cards, jobs = RecordingCards(), RecordingJobs()
    servicers = Servicers(layer_card=cards, placement=FakePlacement(), tuning=jobs)
    with ServerThread(servicers=servicers) as server:
        argv = ("--address", server.address, "demo", "--model", "builtin:smollm2-135m", "--skip-deploy")
        code, _, err = run(capsys, *argv)
    assert code == 0, err
    (card,) = cards.requests
    assert (card.model, card.dataset.builtin, card.probe_size) == ("builtin:smollm2-135m", "builtin:facts", 16)
    (job,) = jobs.requests
    assert (job.model, job.training_data.builtin, job.adapter_id) == (
        "builtin:smollm2-135m",
        "builtin:facts",
        "demo-facts",
    )
    assert job.hyperparameters.steps == 40
