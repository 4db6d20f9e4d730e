"""Architecture detection: where a causal LM keeps its blocks, and which linear modules LoRA can adapt.

Works for any transformers causal LM whose blocks sit in one ``nn.ModuleList`` (Llama, Qwen2/3, Mistral,
Phi-3, GPT-2, GPT-NeoX, Gemma, ...). Module types are leaf names (``q_proj``, ``c_attn``) of linear-like
modules inside a block: ``nn.Linear``, and GPT-2's ``Conv1D`` (a linear layer with a transposed weight).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["ModelLayout", "detect_layout", "find_blocks", "linear_shape"]

# Known homes of the block list, tried first; anything else falls back to the largest ModuleList of one class.
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module, or None when it is not one LoRA can adapt."""
    if type(module).__name__.endswith("Router"):
        # An MoE router that subclasses nn.Linear (PhiMoE, Llama 4) returns (weights, indices), which peft's
        # LoRA wrapper cannot add to; and an adapter on expert choice is not one vLLM serves.
        return None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape  # Conv1D stores (in, out)
        return int(d_in), int(d_out)
    return None


@dataclass(frozen=True)
class ModelLayout:
    """Where the blocks are and what each block offers to adapt."""

    blocks_path: str  # dotted path of the ModuleList, e.g. "model.layers"
    num_layers: int
    module_types: tuple[str, ...]  # leaf names present in every block, in first-seen order
    shapes: dict[str, tuple[int, int]]  # path inside a block ("mlp.c_proj") -> (d_in, d_out), from block 0

    def adapter_parameters(self, module_types: tuple[str, ...] | list[str], rank: int) -> int:
        """LoRA parameters one layer adds: r (d_in + d_out) for every module whose leaf name is targeted."""
        return sum(
            rank * (d_in + d_out)
            for path, (d_in, d_out) in self.shapes.items()
            if path.rsplit(".", 1)[-1] in module_types
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def select(self, requested: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """Validates a requested set of module types; empty means all of them."""
        if not requested:
            return self.module_types
        unknown = [name for name in requested if name not in self.module_types]
        if unknown:
            raise InvalidArgument.field(
                "lora.target_modules",
                f"unknown module type(s) {unknown}; this model has {list(self.module_types)}",
            )
        return tuple(dict.fromkeys(requested))


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for path in _BLOCK_PATHS:
        try:
            candidate = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return path, candidate
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        uniform = isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise FailedPrecondition(
            f"unsupported model {type(model).__name__}: no list of transformer blocks found (looked for "
            f"{', '.join(_BLOCK_PATHS)}, then for any nn.ModuleList of two or more blocks of one class)",
            reason="UNSUPPORTED_ARCHITECTURE",
            metadata={"architecture": type(model).__name__, "missing": "blocks"},
        )
    return best


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, the block list) of any causal LM, LoRA-wrapped or not (the trainer's prefix cache)."""
    return _find_blocks(model)


def detect_layout(model: nn.Module) -> ModelLayout:
    path, blocks = _find_blocks(model)
    per_block: list[dict[str, tuple[int, int]]] = []
    for block in blocks:
        found: dict[str, tuple[int, int]] = {}
        for name, module in block.named_modules():
            shape = linear_shape(module)
            if shape is not None:
                found[name] = shape
        per_block.append(found)
    leaves = [{path.rsplit(".", 1)[-1] for path in found} for found in per_block]
    common = list(
        dict.fromkeys(p.rsplit(".", 1)[-1] for p in per_block[0] if all(p.rsplit(".", 1)[-1] in lv for lv in leaves))
    )
    if not common:
        raise FailedPrecondition(
            f"unsupported model {type(model).__name__}: its blocks ({path}) have no linear modules LoRA can adapt "
            "(nn.Linear or transformers' Conv1D, under the same name in every block)",
            reason="UNSUPPORTED_ARCHITECTURE",
            metadata={"architecture": type(model).__name__, "blocks_path": path, "missing": "linear_modules"},
        )
    return ModelLayout(path, len(blocks), tuple(common), per_block[0])
