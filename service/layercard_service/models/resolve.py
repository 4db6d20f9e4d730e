"""Which model a single-machine launch serves: a built-in name or a local Hugging Face directory, checked up front.

``make run MODEL=...`` starts vLLM on the model and points the service at it; a model vLLM cannot serve must fail
in a second with a sentence that says why, not after a minute of vLLM start-up with a traceback in its log. So a
directory is checked here the way vLLM and the workers will read it: a ``config.json`` that transformers loads as
the config of a causal LM, and a tokenizer beside it. An imported built-in whose cache is still empty is
materialized first (about half a minute on two cores), once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layercard_service.errors import FailedPrecondition, InvalidArgument, NotFound
from layercard_service.models.builtin import BUILTIN_PREFIX, BuiltinModel, builtin_model, builtin_model_path, is_builtin

__all__ = ["CPU_MAX_MODEL_LEN", "ResolvedModel", "context_length", "resolve_model"]

# A directory's --max-model-len when none is given: enough for chat examples and short generations, while the CPU
# KV cache and the attention of one long request stay small (a model's own limit is often 8k to 128k).
CPU_MAX_MODEL_LEN = 1024
# Config attributes that hold the context length, by family (Llama and most: the first; GPT-2: n_positions).
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Any one of these is a tokenizer vLLM and transformers can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to serve: how the service names it, where it is, and its vLLM context length."""

    spec: str  # as jobs, cards and vLLM's served name say it: "builtin:NAME" or the absolute directory
    path: Path  # the directory vLLM and the workers load
    max_model_len: int
    builtin: BuiltinModel | None = None  # None for a local directory

    @property
    def model_root(self) -> Path | None:
        """The model root a local directory needs in the service's settings (its parent); None for a built-in."""
        return None if self.builtin is not None else self.path.parent


def context_length(config: object) -> int | None:
    """The model's own context length from its transformers config, or None when the config does not say."""
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve_model(
    spec: str,
    *,
    max_model_len: int | None = None,
    notify: Callable[[str], None] = print,
    materialize: Callable[[str], Path] | None = None,
) -> ResolvedModel:
    """``builtin:NAME`` or a local model directory, checked; ``max_model_len`` overrides the default length.

    ``notify`` hears about a materialization (it takes a while); ``materialize`` replaces the real import
    (tests). Raises NotFound, FailedPrecondition or InvalidArgument (field ``model`` or ``max_model_len``).
    """
    if max_model_len is not None and max_model_len < 1:
        raise InvalidArgument.field("max_model_len", f"must be a positive number of tokens, got {max_model_len}")
    if is_builtin(spec):
        return _builtin(spec, max_model_len, notify, materialize)
    return _directory(spec, max_model_len)


def _builtin(
    spec: str, max_model_len: int | None, notify: Callable[[str], None], materialize: Callable[[str], Path] | None
) -> ResolvedModel:
    model = builtin_model(spec)
    try:
        path = builtin_model_path(spec)
    except FailedPrecondition as exc:
        if model.gguf is None or exc.reason != "BUILTIN_MODEL_NOT_MATERIALIZED":
            raise
        if materialize is None:
            from layercard_service.models.materialize import materialize_builtin  # brings torch: only when needed

            materialize = materialize_builtin
        notify(f"materializing {BUILTIN_PREFIX}{model.name} into {model.directory()} (first use; about half a minute)")
        started = time.monotonic()
        path = materialize(model.name)
        notify(f"materialized {BUILTIN_PREFIX}{model.name} in {time.monotonic() - started:.0f} s")
    return ResolvedModel(BUILTIN_PREFIX + model.name, path, max_model_len or model.max_model_len, model)


def _directory(spec: str, max_model_len: int | None) -> ResolvedModel:
    if not spec.strip():
        raise InvalidArgument.field("model", "is required: a built-in name (builtin:tiny) or a model directory")
    path = Path(spec).expanduser().resolve()
    if any(c.isspace() for c in str(path)):  # the path is vLLM's served model name, which may not hold spaces
        raise InvalidArgument.field("model", f"{path} has white space in it; move or link the model elsewhere")
    if not path.is_dir():
        raise NotFound(
            f"model {spec!r}: no such directory ({path}); name a built-in (builtin:tiny, builtin:smollm2-135m) "
            "or a local Hugging Face model directory",
            reason="MODEL_NOT_FOUND",
            metadata={"model": spec},
        )
    if not (path / "config.json").is_file():
        raise FailedPrecondition(
            f"model {path} has no config.json: not a Hugging Face model directory (a GGUF file is imported with "
            "`python -m layercard_service.models.materialize --gguf FILE --out DIR`)",
            reason="MODEL_CONFIG_MISSING",
            metadata={"model": str(path)},
        )
    config = _causal_lm_config(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FailedPrecondition(
            f"model {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); vLLM needs one beside the weights",
            reason="MODEL_TOKENIZER_MISSING",
            metadata={"model": str(path)},
        )
    own = context_length(config)
    if max_model_len is not None and own is not None and max_model_len > own:
        raise InvalidArgument.field("max_model_len", f"{max_model_len} is longer than the model's context ({own})")
    chosen = max_model_len or min(own or CPU_MAX_MODEL_LEN, CPU_MAX_MODEL_LEN)
    return ResolvedModel(str(path), path, chosen)


def _causal_lm_config(path: Path) -> object:
    """The directory's transformers config; FailedPrecondition unless it loads and is a causal LM's."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # ValueError for an unknown model_type, OSError, JSON errors: all one answer here
        raise FailedPrecondition(
            f"model {path}: its config.json does not load as a transformers config "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            reason="MODEL_CONFIG_INVALID",
            metadata={"model": str(path)},
        ) from exc
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FailedPrecondition(
            f"model {path} is a {model_type or 'model of no model_type'!s}, not a causal language model "
            "(transformers has no AutoModelForCausalLM class for it)",
            reason="MODEL_NOT_CAUSAL_LM",
            metadata={"model": str(path), "model_type": str(model_type)},
        )
    return config
