"""Can this fleet serve this adapter? Checked before anything is loaded, so a bad deploy changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layercard_service.data.sources import check_tree_within_roots
from layercard_service.errors import FailedPrecondition
from layercard_service.persistence.adapter_versions import AdapterVersion
from layercard_service.serving.fleet import FleetSettings, Observation
from layercard_service.trainer.artifact import vllm_problems

__all__ = ["adapter_config", "adapter_problems", "replica_problems"]


def adapter_problems(adapter_config: dict[str, Any], model: str, settings: FleetSettings) -> list[str]:
    """Why the fleet's servers would refuse the adapter or serve the base model in its place."""
    problems = vllm_problems(adapter_config, settings.max_lora_rank)
    if model != settings.model:
        problems.append(f"it was trained on {model!r} but the vLLM fleet serves {settings.model!r}")
    targets = adapter_config.get("target_modules")
    if settings.target_modules and isinstance(targets, list):
        unwrapped = sorted(set(targets) - set(settings.target_modules))
        if unwrapped:  # vLLM would load it and silently ignore these weights
            problems.append(
                f"it adapts {', '.join(unwrapped)}, which the servers do not wrap "
                f"(--lora-target-modules {' '.join(settings.target_modules)})"
            )
    return problems


def replica_problems(observation: Observation) -> list[str]:
    """Why one reachable replica cannot take a deploy."""
    if observation.base_model is None:
        return [f"{observation.url} serves no base model"]
    return []


def adapter_config(version: AdapterVersion) -> dict:
    """The artifact's peft config. vLLM reads the whole folder, so a symlink in it that leaves it is refused
    first (peft writes none); errors name the file, never what it holds."""
    folder = Path(version.path)
    path = folder / "adapter_config.json"
    try:
        resolved = folder.resolve(strict=True)
        check_tree_within_roots(resolved, (resolved,), "adapter", "artifact")
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise _unreadable(version, path, problem) from exc
    except json.JSONDecodeError as exc:
        raise _unreadable(version, path, f"adapter_config.json is not valid JSON (line {exc.lineno})") from exc
    if not isinstance(config, dict):
        raise _unreadable(version, path, "adapter_config.json is not a JSON object")
    return config


def _unreadable(version: AdapterVersion, path: Path, problem: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the artifact of adapters/{version.adapter_id} version {version.version} is unreadable: {problem}",
        reason="ARTIFACT_MISSING",
        metadata={"path": str(path)},
    )
