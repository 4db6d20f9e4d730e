"""Layer coupling: the function-space cosine of the layers' whitened steps (METHOD.md).

For layer ℓ, Δ_ℓ is the derivative of the per-token target log-likelihood on a fixed probe batch along
B = -δ_ℓ on all of the layer's modules (others at B = 0): a vector over the batch's completion tokens.
ρ_ℓm = cos(Δ_ℓ, Δ_m). The engine takes Δ by a one-sided finite difference (one forward per layer);
``directional_jvp`` gives the same derivative by forward-mode autodiff, as an independent check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp

from layercard_service.card_engine.probe import ADAPTER, ModuleKey
from layercard_service.models.head import labelled_logits

__all__ = ["token_loglik", "finite_difference", "directional_jvp", "cosine_matrix"]

# Size of the finite-difference step, as the first-order loss change it causes (nats): small enough to stay
# linear, large enough to rise far above float32 rounding of the log-likelihoods.
FD_LOSS_CHANGE = 3e-3


def token_loglik(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-likelihood of each completion token of ``batch`` [n_completion_tokens], float64."""
    # [N, V], [N]: the head only at the positions whose next token is a completion token
    logits, targets = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logp = torch.log_softmax(logits, dim=-1)  # [N, V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()


def _set_b(lora: dict[ModuleKey, nn.Module], values: dict[ModuleKey, torch.Tensor] | None) -> None:
    with torch.no_grad():
        for key, layer in lora.items():
            weight = layer.lora_B[ADAPTER].weight
            weight.zero_() if values is None or key not in values else weight.copy_(values[key])


@torch.no_grad()
def finite_difference(
    model: nn.Module,
    lora: dict[ModuleKey, nn.Module],
    steps_by_layer: dict[int, dict[ModuleKey, torch.Tensor]],
    decrease_by_layer: dict[int, float],
    batch: dict[str, torch.Tensor],
    on_layer: Callable[[int, int], None] = lambda done, total: None,
) -> dict[int, torch.Tensor]:
    """Δ_ℓ for every layer: (loglik(B = -ε δ_ℓ) - loglik(0)) / ε, with ε giving a loss change of FD_LOSS_CHANGE.

    ``decrease_by_layer[ℓ]`` is tr(G S⁻¹ Gᵀ) summed over the layer's modules: the first-order loss decrease per
    unit of ε along -δ_ℓ.
    """
    base = token_loglik(model, batch)
    deltas: dict[int, torch.Tensor] = {}
    try:
        for done, (layer, steps) in enumerate(sorted(steps_by_layer.items()), start=1):
            rate = decrease_by_layer[layer]
            if rate <= 0:
                deltas[layer] = torch.zeros_like(base)
                continue
            eps = FD_LOSS_CHANGE / rate
            dtype = next(iter(lora.values())).lora_B[ADAPTER].weight.dtype
            _set_b(lora, {key: (-eps * step).to(dtype) for key, step in steps.items()})
            deltas[layer] = (token_loglik(model, batch) - base) / eps
            on_layer(done, len(steps_by_layer))
    finally:
        _set_b(lora, None)
    return deltas


def directional_jvp(
    model: nn.Module,
    lora: dict[ModuleKey, nn.Module],
    steps: dict[ModuleKey, torch.Tensor],
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """d loglik / dε at ε = 0 along B = -ε δ, by forward-mode autodiff (torch.func.jvp)."""
    owner = {id(module): name for name, module in model.named_modules()}
    names = {key: f"{owner[id(lora[key])]}.lora_B.{ADAPTER}.weight" for key in steps}
    primals = {names[key]: lora[key].lora_B[ADAPTER].weight.detach() for key in steps}
    tangents = {names[key]: (-step).to(primals[names[key]].dtype) for key, step in steps.items()}

    def loglik_of(b_weights: dict[str, torch.Tensor]) -> torch.Tensor:
        class _Wrapped(nn.Module):
            def forward(self, **batch_kwargs):
                return functional_call(model, b_weights, args=(), kwargs=batch_kwargs, strict=False)

        return token_loglik(_Wrapped(), batch)

    # Fused SDPA kernels have no forward-mode derivative: use the plain attention maths for the check.
    inner = model.base_model.model if hasattr(model, "base_model") else model
    previous = inner.config._attn_implementation
    inner.set_attn_implementation("eager")
    try:
        _, derivative = jvp(loglik_of, (primals,), (tangents,))
    finally:
        inner.set_attn_implementation(previous)
    return derivative


def cosine_matrix(deltas: dict[int, torch.Tensor]) -> torch.Tensor:
    """ρ [L, L]: cosine of the Δ vectors; a zero Δ (no signal) is uncoupled from everything but itself."""
    layers = sorted(deltas)
    stacked = torch.stack([deltas[layer] for layer in layers])  # [L, n_tokens]
    norms = stacked.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, stacked / norms.clamp_min(1e-300), torch.zeros_like(stacked))
    rho = unit @ unit.T
    rho.fill_diagonal_(1.0)
    return rho
