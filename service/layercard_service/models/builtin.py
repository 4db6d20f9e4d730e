"""Built-in base models: names like ``builtin:tiny`` that resolve to a model directory shipped in the package.

Why built-ins exist: the service runs where there is no model hub (CI, air-gapped clusters, this machine), yet
every feature (cards, tuning, vLLM serving) needs a real pretrained causal LM. ``builtin:tiny`` is an 8-block
Llama that ``pretrain.py`` trained on CPython's own documentation; its weights are committed beside the script,
so resolving the name is a path lookup with no download and no training at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from layercard_service.errors import NotFound

__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "builtin_model_path", "builtin_name", "is_builtin"]

BUILTIN_PREFIX = "builtin:"

_MODELS_DIR = Path(__file__).resolve().parent

# name -> directory holding config.json, model.safetensors, tokenizer files and pretrain_report.json.
# Read-only, so no caller can register a model by mutating the module state.
BUILTIN_MODELS: Mapping[str, Path] = MappingProxyType(
    {
        "tiny": _MODELS_DIR / "builtin_tiny",
    }
)


def is_builtin(spec: str) -> bool:
    """True for model specs that name a built-in (``builtin:tiny``), whether or not the name exists."""
    return spec.startswith(BUILTIN_PREFIX)


def builtin_name(spec: str) -> str:
    """``builtin:tiny`` -> ``tiny``; a bare name is returned unchanged."""
    return spec[len(BUILTIN_PREFIX) :] if is_builtin(spec) else spec


def builtin_model_path(name: str) -> Path:
    """The directory of built-in model ``name`` (``tiny`` or ``builtin:tiny``).

    Raises NotFound for unknown names, and also when the directory is missing (a broken install is the
    caller's problem to report, not a reason to fall through to a hub download).
    """
    key = builtin_name(name)
    path = BUILTIN_MODELS.get(key)
    if path is None:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise NotFound(
            f"unknown built-in model {name!r}; known: {known}",
            reason="BUILTIN_MODEL_NOT_FOUND",
            metadata={"model": name},
        )
    if not (path / "config.json").is_file():
        raise NotFound(
            f"built-in model {name!r} is not installed at {path}",
            reason="BUILTIN_MODEL_MISSING",
            metadata={"model": name, "path": str(path)},
        )
    return path
