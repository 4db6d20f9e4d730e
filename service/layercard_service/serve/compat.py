"""Can this fleet serve this adapter? Checked before anything is loaded, so a bad deploy changes nothing."""

from __future__ import annotations

from typing import Any

from layercard_service.serve.fleet import FleetSettings, Observation
from layercard_service.tune.artifact import vllm_problems

__all__ = ["adapter_problems", "replica_problems"]


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
