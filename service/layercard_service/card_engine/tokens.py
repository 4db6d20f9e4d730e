"""Mapping a module's input or output back to the batch's tokens, so padding stays out of every per-token figure.

Transformers models hand their linear layers several layouts of the same tokens: [B, T, d] (Llama, GPT-2),
[B·T, d] (OPT's fc1/fc2, the shared expert of Qwen2-MoE: the token dimensions flattened), [1, B·T, d], or more
than one row per token ([B, T, k, d]). All of these keep the tokens in batch-major order, so a tensor whose
leading dimensions hold a whole number k of rows per token reshapes to [B·T, k, d], and the attention mask picks
the real tokens' rows. A layout that does not (a module seeing a subset of the tokens, such as a routed expert)
cannot be mapped back: FAILED_PRECONDITION naming the module, not a wrong figure.
"""

from __future__ import annotations

import torch

from layercard_service.errors import FailedPrecondition

__all__ = ["block_input", "real_token_rows"]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden states a block is called with: positional (GPT-2, OPT) or ``hidden_states=`` (Llama in 5.x)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def real_token_rows(tensor: torch.Tensor, mask: torch.Tensor, where: str) -> torch.Tensor:
    """The rows of ``tensor`` [..., d] that belong to real tokens: [N·k, d] for N real tokens, k rows each.

    ``mask`` is the batch's attention mask [B, T] (bool); ``where`` names the module for the error.
    """
    batch, seq = mask.shape
    width = tensor.shape[-1] if tensor.dim() > 0 else 0
    rows = tensor.numel() // width if width else 0
    if tensor.dim() < 2 or rows == 0 or rows % (batch * seq) != 0:
        raise FailedPrecondition(
            f"unsupported model: {where} sees inputs of shape {list(tensor.shape)}, which do not map to the "
            f"batch's {batch} x {seq} tokens (a module that sees only some of the tokens cannot be probed)",
            reason="UNSUPPORTED_ARCHITECTURE",
            metadata={"module": where, "shape": "x".join(str(s) for s in tensor.shape)},
        )
    per_token = tensor.reshape(batch * seq, rows // (batch * seq), width)  # [B·T, k, d]
    return per_token[mask.reshape(-1)].reshape(-1, width)  # [N·k, d]
