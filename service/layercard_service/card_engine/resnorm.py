"""The card's algebra on r x r matrices: resnorm (plain and split-half), the whitened step, conditioning.

With S = Σ_z + λI (λ = damping · tr(Σ_z)/r) and s the LoRA scaling (METHOD.md):
  Res²        = tr(G S⁻¹ Gᵀ) / s²       ½Res² is the Newton decrement of the local quadratic model
                                          q(B) = <G, B> + ½ s² tr(B S Bᵀ)
  Res²_split  = tr(G¹ S⁻¹ G²ᵀ) / s²     halves are independent, so this is unbiased for the signal part
  δ           = G S⁻¹                   the whitened step (the Newton step is B* = -δ / s²)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layercard_service.card_engine.probe import ModuleProbe

__all__ = ["ModuleFigures", "module_figures"]


@dataclass
class ModuleFigures:
    resnorm_sq: float
    resnorm_sq_split_half: float
    activation_energy: float
    effective_rank: float
    condition_number: float
    step: torch.Tensor  # δ = G S⁻¹ [d_out, r], float64
    grad: torch.Tensor  # G [d_out, r], float64
    damped_cov: torch.Tensor  # S [r, r], float64


def module_figures(probe: ModuleProbe, half_tokens: tuple[int, int], scaling: float, damping: float) -> ModuleFigures:
    n1, n2 = half_tokens
    g1, g2 = probe.grad_halves  # gradients of each half's mean loss
    grad = (n1 * g1 + n2 * g2) / max(n1 + n2, 1)  # gradient of the whole probe's mean loss
    cov = probe.feature_cov_sum / max(probe.tokens, 1)  # Σ_z [r, r]
    rank = cov.shape[0]
    trace = float(torch.trace(cov))
    lam = damping * trace / rank if trace > 0 else damping
    damped = cov + lam * torch.eye(rank, dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(damped)  # S = L Lᵀ
    # G S⁻¹ Gᵀ = (G L⁻ᵀ)(G L⁻ᵀ)ᵀ: solve L Y = Gᵀ, then Y = L⁻¹ Gᵀ.
    w = torch.linalg.solve_triangular(chol, grad.T, upper=False)  # [r, d_out]
    w1 = torch.linalg.solve_triangular(chol, g1.T, upper=False)
    w2 = torch.linalg.solve_triangular(chol, g2.T, upper=False)
    s2 = scaling * scaling
    eig = torch.linalg.eigvalsh(cov).clamp_min(0.0)
    eff_rank = float(eig.sum() ** 2 / (eig.pow(2).sum())) if float(eig.sum()) > 0 else 0.0
    smallest = float(eig.min())
    cond = float(eig.max() / smallest) if smallest > 0 else float("inf")
    return ModuleFigures(
        resnorm_sq=float(w.pow(2).sum()) / s2,
        resnorm_sq_split_half=float((w1 * w2).sum()) / s2,
        activation_energy=probe.energy_sum / max(probe.tokens, 1),
        effective_rank=eff_rank,
        condition_number=cond,
        step=torch.cholesky_solve(grad.T, chol).T,  # G S⁻¹ [d_out, r]
        grad=grad,
        damped_cov=damped,
    )
