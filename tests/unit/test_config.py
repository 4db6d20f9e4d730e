from pathlib import Path

import pytest

from layercard_service.config import ConfigError, ServiceConfig


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
