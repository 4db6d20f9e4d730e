"""``layercard demo``: the dataset it tunes a model on, and the probe, steps and questions that come with it."""

from __future__ import annotations

import pytest

from layercard_client.cli import demo
from layercard_client.cli.parser import build_parser
from layercard_service import launch
from layercard_service.models.builtin import BUILTIN_MODELS, BUILTIN_PREFIX


def _settings(*argv: str) -> demo.DemoSettings:
    return demo.demo_settings(build_parser().parse_args(["demo", *argv]))


@pytest.mark.parametrize(
    ("model", "dataset"),
    [("builtin:tiny", "builtin:cipher"), ("builtin:smollm2-135m", "builtin:facts"), ("/models/any", "builtin:cipher")],
)
def test_the_dataset_follows_the_model(model, dataset):
    assert demo.default_dataset(model) == dataset


def test_the_client_knows_the_same_instruct_builtins_as_the_service():
    assert {BUILTIN_PREFIX + name for name, m in BUILTIN_MODELS.items() if m.chat} == demo.CHAT_BUILTIN_MODELS


def test_launch_and_the_demo_name_the_same_tasks():
    assert (launch.DEMO_DATASET, launch.CHAT_DEMO_DATASET) == (demo.DEFAULT_DATASET, demo.CHAT_DATASET)


def test_tiny_keeps_todays_demo():
    s = _settings()
    assert (s.model, s.dataset, s.probe_size, s.steps, s.adapter_id) == (
        "builtin:tiny",
        "builtin:cipher",
        64,
        600,
        "demo-cipher",
    )
    assert s.questions == demo.DEMO_PROMPTS["builtin:cipher"] and not s.task.chat


def test_an_instruct_model_gets_the_chat_task_with_a_small_probe_and_a_short_job():
    s = _settings("--model", "builtin:smollm2-135m")
    assert (s.dataset, s.adapter_id) == ("builtin:facts", "demo-facts") and s.task.chat
    assert s.probe_size < 64 and s.steps < 100


def test_flags_win_over_the_tasks_defaults():
    s = _settings("--model", "builtin:smollm2-135m", "--dataset", "builtin:cipher", "--steps", "5", "--probe-size", "8")
    assert (s.dataset, s.steps, s.probe_size, s.adapter_id) == ("builtin:cipher", 5, 8, "demo-cipher")
    s = _settings("--dataset", "/data/mine.jsonl", "--adapter-id", "mine", "--learning-rate", "0.01")
    assert (s.adapter_id, s.learning_rate, s.questions) == ("mine", 0.01, ())


def test_one_function_builds_every_generate_call_greedy():
    task = demo.DEMO_TASKS["builtin:facts"]
    call = demo.generate_call(task, "Who?", "demo-facts")
    greedy = {"max_tokens": 32, "temperature": 0.0}
    assert call == {"messages": [("user", "Who?")], "adapter": "demo-facts", "sampling": greedy}  # a chat task: chat
    raw = demo.generate_call(demo.DEMO_TASKS["builtin:cipher"], "x", None)
    assert raw["prompt"] == "x" and "messages" not in raw and raw["sampling"]["max_tokens"] == 8
