import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from layercard_service import config as config_module
from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.runners.kubernetes.settings import KubernetesSettings


def test_defaults():
    config = ServiceConfig.load([], environ={})
    assert config.port == 50051
    assert config.metrics_port == -1
    assert config.bearer_token is None


def test_flags_override_environment():
    env = {"LAYERCARD_PORT": "7000", "LAYERCARD_METRICS_PORT": "9000", "LAYERCARD_MODEL_ROOTS": "/a,/b"}
    config = ServiceConfig.load(["--port", "7001"], environ=env)
    assert config.port == 7001
    assert config.metrics_port == 9000
    assert config.model_roots == (Path("/a"), Path("/b"))


def test_lists_and_urls():
    config = ServiceConfig.load(["--vllm-urls", "http://127.0.0.1:8000, http://127.0.0.1:8001"], environ={})
    assert config.vllm_urls == ("http://127.0.0.1:8000", "http://127.0.0.1:8001")
    with pytest.raises(ConfigError, match="http"):
        ServiceConfig.load(["--vllm-urls", "127.0.0.1:8000"], environ={})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "abc"], "cannot parse"),
        (["--port", "-5"], "port must be"),
        (["--metrics-port", "-2"], "metrics_port"),
        (["--max-message-bytes", "10"], "at least 1024"),
        (["--tls-cert-file", "/x.crt"], "go together"),
        (["--log-format", "xml"], "log_format"),
        (["--prefix-cache-memory-bytes", "-1"], "prefix_cache_memory_bytes must be >= 0"),
        (["--auth-token", "a", "--auth-token-file", "/f"], "not both"),
    ],
)
def test_bad_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        ServiceConfig.load(argv, environ={})


def test_token_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        _ = ServiceConfig(auth_token_file=empty).bearer_token
    with pytest.raises(ConfigError, match="cannot read"):
        _ = ServiceConfig(auth_token_file=tmp_path / "missing").bearer_token


def test_tuning_settings_defaults_flags_and_environment():
    config = ServiceConfig.load([], environ={})
    assert (config.max_concurrent_jobs, config.job_queue_size, config.max_lora_rank) == (1, 16, 16)
    assert config.job_threads == 0  # automatic
    env = {"LAYERCARD_MAX_LORA_RANK": "64", "LAYERCARD_JOB_QUEUE_SIZE": "3"}
    config = ServiceConfig.load(["--max-concurrent-jobs", "2", "--max-lora-rank", "32"], environ=env)
    assert (config.max_concurrent_jobs, config.job_queue_size, config.max_lora_rank) == (2, 3, 32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-concurrent-jobs", "0"], "max_concurrent_jobs"),
        (["--job-queue-size", "-1"], "job_queue_size"),
        (["--max-lora-rank", "0"], "max_lora_rank"),
        (["--max-lora-rank", "big"], "cannot parse"),
        (["--job-threads", "-1"], "job_threads"),
    ],
)
def test_bad_tuning_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        ServiceConfig.load(argv, environ={})


# --- one place for every setting: help text, flags, environment, and the Kubernetes runner's own -------------

K8S_FLAGS = {  # every Kubernetes runner setting: flag -> (value, where it lands in config.kubernetes, parsed)
    "--k8s-namespace": ("team-ml", "namespace", "team-ml"),
    "--k8s-trainer-image": ("trainer:1", "trainer_image", "trainer:1"),
    "--k8s-data-claim": ("layercard-data", "data_claim", "layercard-data"),
    "--k8s-service-account": ("trainer", "service_account", "trainer"),
    "--k8s-gpus": ("2", "gpus", 2),
    "--k8s-gpu-resource": ("amd.com/gpu", "gpu_resource", "amd.com/gpu"),
    "--k8s-cpu-request": ("2", "cpu_request", "2"),
    "--k8s-cpu-limit": ("4", "cpu_limit", "4"),
    "--k8s-memory-request": ("8Gi", "memory_request", "8Gi"),
    "--k8s-memory-limit": ("16Gi", "memory_limit", "16Gi"),
    "--k8s-node-selector": ("pool=gpu,zone=a", "node_selector", {"pool": "gpu", "zone": "a"}),
    "--k8s-tolerations": ("spot,gpu=yes:NoSchedule", "tolerations",
                          ({"key": "spot", "operator": "Exists"},
                           {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"})),
    "--k8s-read-only-claims": ("models=/models", "read_only_claims", (("models", Path("/models")),)),
    "--k8s-service-address": ("layercard.ns.svc:50051", "service_address", "layercard.ns.svc:50051"),
    "--k8s-run-as-user": ("2000", "run_as_user", 2000),
    "--k8s-active-deadline-seconds": ("3600", "active_deadline_seconds", 3600),
    "--k8s-ttl-seconds-after-finished": ("60", "ttl_seconds_after_finished", 60),
    "--k8s-poll-seconds": ("0.5", "poll_seconds", 0.5),
}  # fmt: skip


def _help_entries() -> dict[str, str]:
    """``layercard-server --help``, as {flag: its help text}, wrapped lines joined."""
    out = subprocess.run(
        [sys.executable, "-m", "layercard_service.server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    entries: dict[str, str] = {}
    flag = None
    for line in out.splitlines():
        match = re.match(r"  (--[a-z0-9-]+)(?: [A-Z0-9_]+)?(.*)", line)
        if match:
            flag = match[1]
            entries[flag] = match[2].strip()
        elif flag and line.startswith("    ") and line.strip():
            entries[flag] = f"{entries[flag]} {line.strip()}".strip()
        else:
            flag = None
    entries.pop("--help", None)
    return entries


def test_help_explains_every_setting():
    entries = _help_entries()
    flags = {f"--{name.replace('_', '-')}" for name in _all_setting_names()}
    assert set(entries) == flags and len(flags) > 40
    for flag, text in entries.items():
        env = "LAYERCARD_" + flag[2:].replace("-", "_").upper()
        assert text.endswith(f"env {env}"), flag
        assert len(text) - len(f". env {env}") > 15, f"{flag} has no help text: {text!r}"  # more than "env X"
    assert "-1 turns it off" in entries["--metrics-port"] and "(default: 50051)" in entries["--port"]
    assert "key=value:Effect" in entries["--k8s-tolerations"]


def _all_setting_names() -> list[str]:
    return [prefix + f.name for prefix, f in config_module._settings()]


def test_every_kubernetes_flag_lands_in_the_nested_settings():
    argv = [part for flag, (value, _, _) in K8S_FLAGS.items() for part in (flag, value)]
    settings = ServiceConfig.load(argv, environ={}).kubernetes
    assert isinstance(settings, KubernetesSettings)
    for flag, (_, name, expected) in K8S_FLAGS.items():
        assert getattr(settings, name) == expected, flag
    assert len(K8S_FLAGS) == len(fields(KubernetesSettings)) == 18  # every one of them


def test_every_kubernetes_environment_variable_lands_in_the_nested_settings():
    env = {"LAYERCARD_" + flag[2:].replace("-", "_").upper(): value for flag, (value, _, _) in K8S_FLAGS.items()}
    assert "LAYERCARD_K8S_TRAINER_IMAGE" in env and "LAYERCARD_K8S_TTL_SECONDS_AFTER_FINISHED" in env
    settings = ServiceConfig.load([], environ=env).kubernetes
    for flag, (_, name, expected) in K8S_FLAGS.items():
        assert getattr(settings, name) == expected, flag
    flags_win = ServiceConfig.load(["--k8s-gpus", "1"], environ=env).kubernetes
    assert (flags_win.gpus, flags_win.memory_limit) == (1, "16Gi")


def test_the_kubernetes_runner_is_checked_with_the_nested_settings():
    base = ["--job-runner", "kubernetes", "--data-dir", "/data", "--k8s-trainer-image", "trainer:1",
            "--k8s-service-address", "layercard.ml.svc:50051"]  # fmt: skip
    config = ServiceConfig.load([*base, "--k8s-data-claim", "layercard-data"], environ={})
    assert config.kubernetes.trainer_image == "trainer:1" and config.kubernetes.namespace == ""
    with pytest.raises(ConfigError, match="job_runner 'kubernetes' needs k8s_data_claim"):
        ServiceConfig.load(base, environ={})
    with pytest.raises(ConfigError, match="k8s_namespace must be a valid Kubernetes name, got 'Team_ML'"):
        bad = KubernetesSettings(namespace="Team_ML", trainer_image="t:1", data_claim="c", service_address="s:1")
        ServiceConfig(job_runner="kubernetes", data_dir=Path("/data"), kubernetes=bad)


def test_the_kubernetes_settings_do_not_import_the_service_config():
    """No cycle: the runner's settings stand alone, and config.py reads them without the runner's modules."""
    code = (
        "import sys; import layercard_service.runners.kubernetes.settings;"
        "assert 'layercard_service.config' not in sys.modules, 'k8s_settings imports config';"
        "import layercard_service.config;"
        "loaded = [m for m in ('layercard_service.runners.kubernetes.manifest', "
        "'layercard_service.runners.kubernetes.runner') "
        "if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())
    source = Path(config_module.__file__).read_text()
    assert "k8s_manifest" not in source  # not even lazily, as it once did inside __post_init__
