"""The probe pass: one LoRA forward+backward over the probe set, with B = 0, collecting what the card needs.

For every adapted module (layer ℓ, type m) with input x (d_in) and LoRA features z = A x (r):
  G¹, G²  dL/dB (d_out x r) of the mean completion-token loss of each half of the probe set
  Σ_z     Σ_t z_t z_tᵀ over probe tokens (r x r), and the token count
  E_act   Σ_t ‖x_t‖² over probe tokens
B = 0 leaves the model's output unchanged, so every figure is taken at the base model (METHOD.md).
Peft's own LoRA layers are used, so this pass costs what a real LoRA step costs, plus the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from layercard_service.card_engine.arch import ModelLayout
from layercard_service.card_engine.tokens import block_input, real_token_rows
from layercard_service.data.encode import IGNORE_INDEX
from layercard_service.errors import FailedPrecondition
from layercard_service.models.head import completion_loss, head_plan

__all__ = ["ModuleKey", "ModuleProbe", "ProbeResult", "attach_lora", "lora_modules", "module_type", "run_probe"]

ADAPTER = "default"
ModuleKey = tuple[int, str]  # (layer index, module path inside the block, e.g. "self_attn.q_proj")


@dataclass
class ModuleProbe:
    """Accumulators of one adapted module (float64: sums over many tokens)."""

    grad_halves: list[torch.Tensor]  # two of [d_out, r]
    feature_cov_sum: torch.Tensor  # Σ_t z zᵀ [r, r]
    energy_sum: float  # Σ_t ‖x‖²
    tokens: int


@dataclass
class ProbeResult:
    modules: dict[ModuleKey, ModuleProbe]
    loss: float  # mean completion-token CE of the base model over the probe set
    examples: int
    tokens: int  # non-pad tokens the modules saw
    completion_tokens: int
    half_completion_tokens: tuple[int, int]
    batch_size: int
    seq_len: int
    stream_mean_square: list[float]  # per block: E over tokens of mean_i h_i² of the residual stream entering it
    # What the frozen-prefix cache keeps per token: the hidden states entering a block (width x bytes per value, in
    # the dtype the blocks see, as trainer/prefix_cache.py stores them).
    hidden_bytes_per_token: int = 0


def attach_lora(
    model: nn.Module, layout: ModelLayout, module_types: Sequence[str], rank: int, alpha: float, seed: int
) -> nn.Module:
    """Wraps ``model`` with LoRA on every layer's ``module_types``: A from a fixed seed, B = 0 (peft's default)."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(module_types),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    try:
        peft_model = get_peft_model(model, config)
    except Exception:
        _strip_lora(model)  # peft may fail after wrapping some modules: the caller's (cached) model stays clean
        raise
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)  # A is the fixed random projection; only dL/dB is needed
    peft_model.eval()  # no dropout in the base model: the card describes it as it serves
    return peft_model


def _strip_lora(model: nn.Module) -> None:
    """Puts every LoRA-wrapped module of ``model`` back to its base layer and drops peft's bookkeeping."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def module_type(key: ModuleKey) -> str:
    """The leaf name peft targets; a type can occur more than once in a block (the card sums them)."""
    return key[1].rsplit(".", 1)[-1]


def lora_modules(peft_model: nn.Module, layout: ModelLayout) -> dict[ModuleKey, LoraLayer]:
    """Peft's LoRA layers by (layer, path in block), in depth order."""
    blocks = peft_model.base_model.model.get_submodule(layout.blocks_path)
    found: dict[ModuleKey, LoraLayer] = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                found[(index, name)] = module
    return found


def _split_halves(batches: Sequence[dict[str, torch.Tensor]]) -> list[int]:
    """Half index (0/1) of each batch: the first half of the batches, then the second."""
    cut = max(1, len(batches) // 2)
    return [0 if i < cut else 1 for i in range(len(batches))]


def run_probe(
    peft_model: nn.Module,
    layout: ModelLayout,
    batches: Sequence[dict[str, torch.Tensor]],
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> ProbeResult:
    """One pass over ``batches`` (already on the model's device). Raises whatever ``on_batch`` raises (cancel)."""
    if len(batches) < 2:
        raise ValueError("the probe needs at least two batches (one per half for the split-half estimate)")
    modules = lora_modules(peft_model, layout)
    device = next(peft_model.parameters()).device
    halves = _split_halves(batches)
    half_tokens = [0, 0]
    for batch, half in zip(batches, halves):
        half_tokens[half] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    probes: dict[ModuleKey, ModuleProbe] = {}
    for key, layer in modules.items():
        d_out, rank = layer.lora_B[ADAPTER].weight.shape
        zeros = torch.zeros(d_out, rank, dtype=torch.float64, device=device)
        probes[key] = ModuleProbe(
            [zeros.clone(), zeros.clone()], torch.zeros(rank, rank, dtype=torch.float64, device=device), 0.0, 0
        )

    mask_holder: dict[str, torch.Tensor] = {}

    def feature_hook(key: ModuleKey):
        where = f"{layout.blocks_path}.{key[0]}.{key[1]}"

        def hook(module, args, output):
            mask = mask_holder["mask"]  # [B, T] bool, real tokens
            # [N·k, d_in] and [N·k, r]: whatever layout the model feeds this module ([B, T, d], [B·T, d], ...)
            x = real_token_rows(args[0].detach(), mask, where)
            z = real_token_rows(output.detach(), mask, where)
            probe = probes[key]
            probe.feature_cov_sum += (z.T @ z).double()  # r x r in float32, summed in float64
            probe.energy_sum += float(x.float().pow(2).sum())
            probe.tokens += int(mask.sum())  # per token: a token's k rows (k = 1 but for odd layouts) add up

        return hook

    blocks = peft_model.base_model.model.get_submodule(layout.blocks_path)
    stream_sums = [0.0] * len(blocks)
    hidden_bytes = [0]

    def stream_hook(index: int):
        where = f"{layout.blocks_path}.{index}"

        def hook(module, args, kwargs):
            hidden = block_input(args, kwargs)
            if hidden is None:
                raise FailedPrecondition(
                    f"unsupported model: block {where} is called without a hidden-states tensor",
                    reason="UNSUPPORTED_ARCHITECTURE",
                    metadata={"module": where},
                )
            rows = real_token_rows(hidden.detach().float(), mask_holder["mask"], where)  # [N, H]
            stream_sums[index] += float(rows.pow(2).mean(-1).sum())
            hidden_bytes[0] = hidden.shape[-1] * hidden.element_size()

        return hook

    head_plan(peft_model)  # its one-time check runs a forward of its own: before the hooks go on
    handles = [layer.lora_A[ADAPTER].register_forward_hook(feature_hook(key)) for key, layer in modules.items()]
    handles += [b.register_forward_pre_hook(stream_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    loss_sum, tokens, examples, seq_len = 0.0, 0, 0, 0
    try:
        for i, (batch, half) in enumerate(zip(batches, halves)):
            mask_holder["mask"] = batch["attention_mask"].bool()
            # Summed over the completion tokens, the head computed at their positions only.
            token_loss = completion_loss(
                peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum"
            )
            # Mean over the batch's half of the probe: G¹ and G² are gradients of the two halves' mean losses.
            (token_loss / max(half_tokens[half], 1)).backward()
            loss_sum += float(token_loss.detach())
            for key, layer in modules.items():
                weight = layer.lora_B[ADAPTER].weight
                if weight.grad is not None:  # None: the module is off the loss's path (no gradient reaches it)
                    probes[key].grad_halves[half] += weight.grad.double()
                weight.grad = None
            tokens += int(batch["attention_mask"].sum())
            examples += int(batch["input_ids"].shape[0])
            seq_len = max(seq_len, int(batch["input_ids"].shape[1]))
            on_batch(i + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    completion_tokens = sum(half_tokens)
    return ProbeResult(
        modules=probes,
        loss=loss_sum / max(completion_tokens, 1),
        examples=examples,
        tokens=tokens,
        completion_tokens=completion_tokens,
        half_completion_tokens=(half_tokens[0], half_tokens[1]),
        batch_size=int(batches[0]["input_ids"].shape[0]),
        seq_len=seq_len,
        stream_mean_square=[total / max(tokens, 1) for total in stream_sums],
        hidden_bytes_per_token=hidden_bytes[0],
    )
