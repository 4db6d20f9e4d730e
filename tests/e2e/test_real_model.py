"""The real pretrained model end to end: SmolLM2-135M-Instruct through card, job, deploy and chat Generate.

One vLLM for this module, serving the real model; the service over real gRPC, with its real worker process.
The job teaches ``builtin:facts`` (invented facts the base model cannot know); through vLLM, in the model's own
chat template, the adapter answers them and the base model does not. Sized for CI on 2 cores: a small probe, a
short job, a dozen questions.
"""

from __future__ import annotations

import os

import pytest
from support.server_thread import ServerThread

from layercard.v1 import adapter_pb2, inference_pb2, tuning_pb2
from layercard_client.builders import dataset_source
from layercard_client.client import LayercardClient
from layercard_service.config import ServiceConfig
from layercard_service.data.task_base import exact_match
from layercard_service.data.tasks import get_task
from layercard_service.models.builtin import builtin_model
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings

MODEL = "builtin:smollm2-135m"
TASK = "builtin:facts"
QUESTIONS = 12  # of the 24 validation questions (held-out phrasings)


@pytest.fixture(scope="module")
def vllm_real_model(smollm2_path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("vllm-real")
    server = VllmProcess(
        VllmServerSettings(
            model=smollm2_path,
            served_model_name=MODEL,
            port=0,
            max_loras=2,
            max_lora_rank=8,
            max_model_len=builtin_model(MODEL).max_model_len,
            log_path=log_dir / "vllm.log",
            startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
        )
    )
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(vllm_real_model, tmp_path_factory):
    config = ServiceConfig(
        port=0,
        log_format="text",
        data_dir=tmp_path_factory.mktemp("state"),
        vllm_urls=(vllm_real_model.url,),
        vllm_model=MODEL,
        max_lora_rank=8,
    )
    with ServerThread(config) as running, LayercardClient(running.address) as connected:
        yield connected


def chat(client, example, adapter: str = "") -> str:
    history = [inference_pb2.ChatMessage(role=m.role, content=m.content) for m in example.messages[:-1]]
    request = inference_pb2.GenerateRequest(
        messages=history, adapter=adapter, sampling=inference_pb2.SamplingParams(max_tokens=16, temperature=0.0)
    )
    return client.generate(request, timeout=120).text


def test_card_job_deploy_and_chat_on_the_real_model(client):
    stream = client.compute_layer_card(model=MODEL, dataset=dataset_source(TASK), probe_size=16)
    with stream:
        card = next(event.card for event in stream if event.HasField("card"))
    assert len(card.layers) == 30  # SmolLM2-135M has 30 blocks
    assert card.dataset.source == TASK and card.dataset.examples_used == 16

    # Every block, 40 steps at batch 16: what learns the table reliably (bench/results/real_model.md has the
    # planned placement beside it); the test is about the pipeline on a real model, not about placement.
    job = client.create_tuning_job(
        model=MODEL,
        training_data=dataset_source(TASK),
        adapter_id="facts",
        explicit_layers=list(range(30)),
        hyperparameters={"steps": 40, "learning_rate": 3e-3, "batch_size": 16},
    )
    with client.watch_tuning_job(job.name, timeout=900) as events:
        for _ in events:
            pass
    job = client.get_tuning_job(job.name)
    assert job.state == tuning_pb2.TUNING_JOB_STATE_SUCCEEDED, job.error

    deployment = client.deploy_adapter("facts", force=True, timeout=600)
    assert deployment.state == adapter_pb2.DEPLOYMENT_STATE_READY

    questions = get_task(TASK).validation[:QUESTIONS]
    base = sum(exact_match(chat(client, q), q.completion) for q in questions)
    tuned = sum(exact_match(chat(client, q, "facts"), q.completion) for q in questions)
    # Invented facts: the base model cannot know them; the adapter was taught them. Wide margins on both sides.
    assert base <= QUESTIONS // 4, base
    assert tuned >= QUESTIONS * 3 // 4, tuned
