"""``make run MODEL=...``: which model launch serves, how vLLM is started for it, and the demo's task for it.

Nothing here starts vLLM: the settings' argv is checked instead (the real server on the real model is in
tests/e2e). Directories are tiny random configs written by transformers itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from layercard_service import launch
from layercard_service.errors import FailedPrecondition, InvalidArgument, NotFound
from layercard_service.models.builtin import MANIFEST_NAME, builtin_model
from layercard_service.models.resolve import CPU_MAX_MODEL_LEN, resolve_model

REPO = Path(__file__).resolve().parents[2]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _hf_dir(root: Path, *, positions: int = 4096, chat_template: str | None = None, name: str = "m") -> Path:
    """A Llama config of a few hundred parameters and a tokenizer config, as an HF directory holds them."""
    from transformers import LlamaConfig

    path = root / name
    LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=positions,
    ).save_pretrained(path)
    tokenizer = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        tokenizer["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return path


def _fake_smollm2_cache(root: Path) -> Path:
    """A cache entry builtin_model_path accepts as a whole import of builtin:smollm2-135m (no weights)."""
    folder = root / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    manifest = {"source_sha256": builtin_model("smollm2-135m").gguf.sha256, "files": []}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def _args(*argv: str):
    return launch._parse(["--port", "0", "--data-dir", "/tmp/unused", *argv])


# --- arguments ----------------------------------------------------------------------------------------------------


def test_the_model_defaults_to_builtin_tiny_and_takes_a_length():
    assert launch._parse([]).model == "builtin:tiny" and launch._parse([]).max_model_len is None
    args = launch._parse(["--model", "/models/x", "--max-model-len", "128"])
    assert args.model == "/models/x" and args.max_model_len == 128


@pytest.mark.parametrize(
    ("make_args", "expected"), [((), None), (("MODEL=builtin:smollm2-135m",), "builtin:smollm2-135m")]
)
def test_make_run_passes_model_to_launch(make_args, expected):
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), "run", *make_args, "ARGS=--no-demo"], capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in dry.splitlines() if "layercard_service.launch" in line)
    if expected is None:
        assert "--model" not in line and line.endswith("--no-demo")
    else:
        assert f"--model '{expected}' --no-demo" in line


# --- per model kind: vLLM's settings, the service's, the demo's task ----------------------------------------------


def test_builtin_tiny_is_served_as_its_name_with_its_length():
    model = resolve_model("builtin:tiny")
    argv = launch.vllm_settings(model, 8123).command(8123)
    assert _flag(argv, "--served-model-name") == "builtin:tiny" and _flag(argv, "--max-model-len") == "256"
    assert _flag(argv, "--dtype") == "float32" and "--enable-lora" in argv
    assert _flag(argv, "--max-lora-rank") == str(launch.VLLM_MAX_LORA_RANK)
    config = launch.service_config(_args(), model, "http://127.0.0.1:8123")
    assert config.vllm_model == "builtin:tiny" and config.max_lora_rank == launch.VLLM_MAX_LORA_RANK
    assert config.model_roots == () and config.vllm_urls == ("http://127.0.0.1:8123",)
    assert launch.demo_dataset(model) == "builtin:cipher"


def test_builtin_smollm2_gets_its_length_and_a_chat_task(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_MODEL_CACHE", str(tmp_path))
    folder = _fake_smollm2_cache(tmp_path)
    model = resolve_model("builtin:smollm2-135m", notify=pytest.fail)  # already materialized: nothing to say
    argv = launch.vllm_settings(model, 8123).command(8123)
    assert _flag(argv, "--model") == str(folder) and _flag(argv, "--served-model-name") == "builtin:smollm2-135m"
    assert _flag(argv, "--max-model-len") == str(builtin_model("smollm2-135m").max_model_len)
    assert launch.service_config(_args(), model, None).vllm_model == "builtin:smollm2-135m"
    assert launch.demo_dataset(model) == launch.CHAT_DEMO_DATASET == "builtin:facts"


def test_an_imported_builtin_not_yet_in_the_cache_is_materialized_first_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_MODEL_CACHE", str(tmp_path))
    calls, heard = [], []

    def materialize(name: str) -> Path:
        calls.append(name)
        return _fake_smollm2_cache(tmp_path)

    model = resolve_model("builtin:smollm2-135m", notify=heard.append, materialize=materialize)
    assert calls == ["smollm2-135m"] and model.path == tmp_path / "smollm2-135m"
    assert heard[0].startswith("materializing builtin:smollm2-135m into") and "materialized" in heard[1]
    assert heard[1].endswith(" s")  # how long it took


def test_a_directory_is_served_as_its_path_capped_for_cpu_and_its_parent_is_a_model_root(tmp_path):
    path = _hf_dir(tmp_path, positions=8192)
    model = resolve_model(str(path))
    assert model.spec == str(path.resolve()) and model.max_model_len == CPU_MAX_MODEL_LEN
    argv = launch.vllm_settings(model, 8123).command(8123)
    assert _flag(argv, "--served-model-name") == str(path) and _flag(argv, "--max-model-len") == "1024"
    config = launch.service_config(_args(), model, None)
    assert config.model_roots == (tmp_path,) and config.vllm_model == str(path)
    # The service resolves the name the demo and the banner use (the launch checks this before starting).
    assert launch.prepare_model(_args("--model", str(path))) == model


@pytest.mark.parametrize(("positions", "given", "expected"), [(128, None, 128), (8192, 2048, 2048), (128, 64, 64)])
def test_a_directory_keeps_a_shorter_context_and_a_given_length(tmp_path, positions, given, expected):
    assert resolve_model(str(_hf_dir(tmp_path, positions=positions)), max_model_len=given).max_model_len == expected


def test_a_length_past_the_models_context_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="longer than the model's context") as caught:
        resolve_model(str(_hf_dir(tmp_path, positions=128)), max_model_len=200)
    assert caught.value.violations[0].field == "max_model_len"


@pytest.mark.parametrize(("template", "dataset"), [("{{ messages }}", "builtin:facts"), (None, "builtin:cipher")])
def test_a_directory_with_a_chat_template_gets_the_chat_task(tmp_path, template, dataset):
    assert launch.demo_dataset(resolve_model(str(_hf_dir(tmp_path, chat_template=template)))) == dataset


def _no_config(root: Path) -> Path:
    (root / "m").mkdir()
    return root / "m"


def _unknown_type(root: Path) -> Path:
    path = _no_config(root)
    (path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    return path


def _not_causal(root: Path) -> Path:
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(root / "m")
    return root / "m"


def _no_tokenizer(root: Path) -> Path:
    path = _hf_dir(root)
    (path / "tokenizer_config.json").unlink()
    return path


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [
        (lambda root: root / "missing", NotFound, "MODEL_NOT_FOUND"),
        (_no_config, FailedPrecondition, "MODEL_CONFIG_MISSING"),
        (_unknown_type, FailedPrecondition, "MODEL_CONFIG_INVALID"),
        (_not_causal, FailedPrecondition, "MODEL_NOT_CAUSAL_LM"),
        (_no_tokenizer, FailedPrecondition, "MODEL_TOKENIZER_MISSING"),
    ],
)
def test_a_directory_vllm_could_not_serve_is_a_clear_error(tmp_path, make, error, reason):
    with pytest.raises(error) as caught:
        resolve_model(str(make(tmp_path)))
    assert caught.value.reason == reason


def test_launch_refuses_a_bad_model_before_starting_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "_run", pytest.fail)  # nothing may start
    # main() points the root logger at this test's captured stderr, which closes after it: later tests would log
    # into a closed file. The root logger's handlers are put back as they were.
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    assert launch.main(["--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "data")]) == 2
    assert "no such directory" in capsys.readouterr().err


# --- the demo and the banner name the model and its task --------------------------------------------------------


def test_the_demo_and_the_banner_use_the_model_and_its_dataset(tmp_path):
    model = resolve_model(str(_hf_dir(tmp_path, chat_template="{{ messages }}")))
    dataset = launch.demo_dataset(model)
    demo = launch._demo_command("127.0.0.1:1", model=model.spec, dataset=dataset, skip_deploy=False)
    assert demo[launch._CLI :] == ["--address", "127.0.0.1:1", "demo", "--model", model.spec, "--dataset", dataset]
    banner = launch._banner("127.0.0.1:1", None, "http://vllm", model, dataset, demo)
    assert f"demo --model {model.spec} --dataset builtin:facts" in banner
    assert f"card compute --model {model.spec} --dataset builtin:facts" in banner
    assert f"jobs create --model {model.spec} --dataset builtin:facts" in banner and "--card layerCards/ID" in banner
    assert "builtin:tiny" not in banner and "builtin:cipher" not in banner


def test_the_tiny_banner_keeps_todays_commands():
    model = resolve_model("builtin:tiny")
    demo = launch._demo_command("127.0.0.1:1", model=model.spec, dataset="builtin:cipher", skip_deploy=True)
    assert demo[-1] == "--skip-deploy"
    banner = launch._banner("127.0.0.1:1", 9464, None, model, "builtin:cipher", demo)
    assert "card compute --model builtin:tiny --dataset builtin:cipher --probe-size 64" in banner
    assert "--layers 4,5,6,7 --steps 300" in banner and "generate" not in banner  # no vLLM: nothing to generate
