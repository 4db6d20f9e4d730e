"""Predicted gain of a layer set: per-layer scores from the card, summed with a coupling correction.

Scores (per layer, per module type, nats of loss in the local quadratic model):
- ``resnorm``: ½ Res², the paper's projected residual norm (METHOD.md).
- ``split_half``: ½ of the split-half estimate, which removes the probe's gradient noise from Res².
- ``stream_normalized``: ½ Res² times the mean square of the residual stream entering the block, relative to
  the deepest block's. The gradient reaching a block through the next RMSNorm scales as 1/rms(stream), so
  Res² of shallow blocks (whose stream is the small raw embedding) is inflated by the norm's amplification,
  not by what their adapter can learn. Needs the card's ``residual_mean_square`` column.
- ``type_normalized``: per module type, the layer's share of that type's Res² over all layers, summed over the
  types and scaled to the card's total ½Res². One module type's spike (block 0's o_proj carries most of the
  model's Res² on the built-in and the real model) then counts as one type's share, not as the whole card.
A different rank scales a layer's score by r'/r: the card's adapter sees the gradient through r random
directions, and a random subspace of rank r' captures a share proportional to r' (an assumption, stated as such).
"""

from __future__ import annotations

from collections.abc import Sequence

from layercard_service.domain.cards import LayerCardData
from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["SCORES", "DEFAULT_SCORE", "layer_scores", "set_gain", "score_basis"]

SCORES = ("resnorm", "split_half", "stream_normalized", "type_normalized")
DEFAULT_SCORE = "resnorm"

_BASIS = {
    "resnorm": "½·Res² per layer (paper's resnorm, local quadratic model)",
    "split_half": "½·split-half Res² per layer (probe noise removed)",
    "stream_normalized": "½·Res² per layer scaled by the residual stream's mean square entering it",
    "type_normalized": "per module type, the layer's share of the type's Res², summed over types, at the card's ½Res²",
}


def score_basis(score: str, coupled: bool, rank_scaled: bool) -> str:
    parts = [_BASIS[score]]
    parts.append("coupling-corrected greedy sum" if coupled else "summed over layers (no coupling matrix)")
    if rank_scaled:
        parts.append("scaled by rank / card rank")
    return ", ".join(parts)


def layer_scores(card: LayerCardData, score: str, modules: Sequence[str], rank: int) -> list[float]:
    if score not in SCORES:
        raise InvalidArgument.field("gain_score", f"must be one of {SCORES}, got {score!r}")
    chosen = set(modules)
    stream = None
    if score == "stream_normalized":
        stream = [row.residual_mean_square for row in card.layers]
        if not all(s > 0 for s in stream):
            raise FailedPrecondition(
                "the card has no residual_mean_square column; recompute it with force_recompute",
                reason="CARD_TOO_OLD",
            )
    if score == "type_normalized":
        return _type_normalized(card, chosen, rank)
    values = []
    for index, row in enumerate(card.layers):
        field = "resnorm_sq_split_half" if score == "split_half" else "resnorm_sq"
        res = sum(max(getattr(m, field), 0.0) for m in row.modules if m.module_type in chosen)
        if stream is not None:
            res *= stream[index] / stream[-1]
        values.append(0.5 * res * rank / card.settings.rank)
    return values


def _type_normalized(card: LayerCardData, chosen: set[str], rank: int) -> list[float]:
    totals: dict[str, float] = {}
    for row in card.layers:
        for m in row.modules:
            if m.module_type in chosen:
                totals[m.module_type] = totals.get(m.module_type, 0.0) + max(m.resnorm_sq, 0.0)
    scale = 0.5 * sum(totals.values()) / max(len(totals), 1)  # equal shares of the card's ½Res² per type
    return [
        scale
        * sum(max(m.resnorm_sq, 0.0) / totals[m.module_type] for m in row.modules if totals.get(m.module_type, 0) > 0)
        * rank
        / card.settings.rank
        for row in card.layers
    ]


def set_gain(scores: Sequence[float], layers: Sequence[int], coupling: list[list[float]] | None) -> float:
    """Σ gains, each layer discounted by its strongest coupling with a higher-scoring layer already counted:
    the greedy marginal ½Res²_ℓ (1 − max_m ρ²_ℓm) of METHOD.md, taken in descending score order."""
    if coupling is None:
        return sum(scores[i] for i in layers)
    total, taken = 0.0, []
    for i in sorted(layers, key=lambda j: -scores[j]):
        overlap = max((coupling[i][m] ** 2 for m in taken), default=0.0)
        total += scores[i] * (1.0 - min(overlap, 1.0))
        taken.append(i)
    return total
