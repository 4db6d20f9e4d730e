"""Loading a transformers causal LM and its tokenizer from a local directory, with errors callers understand."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["load_model", "pick_device", "pick_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(
            "device CUDA was requested but this server has no CUDA device", reason="NO_CUDA_DEVICE"
        )
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested:
        if requested not in _DTYPES:
            raise InvalidArgument.field("precision", f"unknown precision {requested!r}")
        return _DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(path: Path, device: str = "", precision: str = "") -> tuple[nn.Module, object]:
    """Returns (model in eval mode on its device, tokenizer). Corrupt or unloadable files: FAILED_PRECONDITION."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = pick_device(device)
    dtype = pick_dtype(precision, target)
    part = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        part = "weights"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers, tokenizers and safetensors each raise their own kinds
        # Their messages may quote what a file holds (a model_type, a JSON fragment): that stays in the log.
        log.warning("model load failed", extra={"path": str(path), "part": part, "error": str(exc)[:1000]})
        raise FailedPrecondition(
            f"cannot load model from {path}: its {part} failed to load ({type(exc).__name__}); "
            "the server log has the details",
            reason="MODEL_LOAD_FAILED",
            metadata={"path": str(path), "part": part},
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere it is used
    model.to(target).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer
