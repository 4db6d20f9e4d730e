"""Predicted costs of any layer set, for any rank and module types, from a stored Layer Card.

The card calibrates one adapter shape (its rank r and module types T) per block, in three regimes: adapted,
gradient pass-through, and below the lowest adapted block (no graph). A different shape (r', T') changes only
the adapter's own share of an adapted block, so that share is scaled by the ratio of adapter parameters;
the pass-through and no-graph figures do not depend on the adapter. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layercard_service.domain.cards import LayerCardData
from layercard_service.errors import FailedPrecondition, InvalidArgument

__all__ = ["Shape", "ShapeCosts", "shape_costs"]


@dataclass(frozen=True)
class Shape:
    rank: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class ShapeCosts:
    """Per-block cost figures of one adapter shape; every list has one entry per block."""

    shape: Shape
    fixed_seconds: float
    nograd_seconds: list[float]  # forward below the lowest adapted block
    pass_seconds: list[float]  # forward + backward when the block only passes the gradient through
    adapter_seconds: list[float]  # extra forward + backward when the block is adapted
    pass_bytes: list[int]
    adapter_activation_bytes: list[int]
    static_bytes: int
    parameters: list[int]  # adapter parameters per block
    param_bytes: int  # bytes per adapter parameter as stored
    peft_serving_ms: list[float]  # unmerged peft: added ms per generated token per adapted block
    peft_base_ms: float
    vllm_fraction: float | None  # measured on the serving vLLM; None until measured
    vllm_basis: str
    vllm_base_ms: float | None  # the serving vLLM's measured base ms per token; None: the card's peft one
    scale: float  # adapter parameters of this shape / the card's

    @property
    def num_layers(self) -> int:
        return len(self.parameters)

    def step_seconds(self, layers: Sequence[int]) -> float:
        if not layers:
            return self.fixed_seconds + sum(self.nograd_seconds)
        low = min(layers)
        return (
            self.fixed_seconds
            + sum(self.nograd_seconds[:low])
            + sum(self.pass_seconds[low:])
            + sum(self.adapter_seconds[i] for i in layers)
        )

    def peak_bytes(self, layers: Sequence[int]) -> int:
        if not layers:
            return self.static_bytes
        low = min(layers)
        return (
            self.static_bytes
            + sum(self.pass_bytes[low:])
            + sum(self.adapter_activation_bytes[i] for i in layers)
            # weights, gradient and AdamW's two moments
            + sum(4 * self.parameters[i] * self.param_bytes for i in layers)
        )

    def adapter_parameters(self, layers: Sequence[int]) -> int:
        return sum(self.parameters[i] for i in layers)

    def adapter_bytes(self, layers: Sequence[int]) -> int:
        return self.adapter_parameters(layers) * self.param_bytes

    def serving_ms(self, layers: Sequence[int], engine: str) -> float | None:
        if engine == "peft":
            return sum(self.peft_serving_ms[i] for i in layers)
        if self.vllm_fraction is None:
            return None
        base = self.vllm_base_ms if self.vllm_base_ms is not None else self.peft_base_ms
        return self.vllm_fraction * base if layers else 0.0  # vLLM: independent of the layers

    def serving_fraction(self, layers: Sequence[int], engine: str) -> float | None:
        if engine == "peft":
            return sum(self.peft_serving_ms[i] for i in layers) / self.peft_base_ms if self.peft_base_ms else 0.0
        if self.vllm_fraction is None:
            return None
        return self.vllm_fraction if layers else 0.0


def _module_params(card: LayerCardData, layer: int, modules: tuple[str, ...]) -> int:
    by_type = {m.module_type: m.adapter_parameters for m in card.layers[layer].modules}
    return sum(by_type[m] for m in modules)


def check_modules(card: LayerCardData, modules: tuple[str, ...]) -> None:
    unknown = sorted(set(modules) - set(card.module_types))
    if unknown:
        raise InvalidArgument.field(
            "candidate_module_sets",
            f"the card has no figures for {unknown}; it covers {card.module_types} "
            "(compute a card with those module types)",
        )


def shape_costs(card: LayerCardData, shape: Shape) -> ShapeCosts:
    check_modules(card, shape.modules)
    tc, rows, L = card.training_cost, card.layers, card.num_layers
    if not tc.forward_pass_seconds or not tc.backward_pass_seconds or not tc.forward_nograd_seconds:
        raise FailedPrecondition(
            "the card predates per-block pass-through calibration; recompute it with force_recompute",
            reason="CARD_TOO_OLD",
        )
    card_rank = card.settings.rank
    card_params = [max(1, _module_params(card, i, tuple(card.module_types))) for i in range(L)]
    params = [_module_params(card, i, shape.modules) * shape.rank // card_rank for i in range(L)]
    scale = [p / c for p, c in zip(params, card_params)]
    adapted = [r.forward_seconds + r.backward_seconds for r in rows]
    passing = [f + b for f, b in zip(tc.forward_pass_seconds, tc.backward_pass_seconds)]
    if tc.calibration is not None:
        # Fitted figures: adapted = pass-through + a non-negative adapter share, block 0 included.
        extra = [a - p for a, p in zip(adapted, passing)]
    else:
        # One hooked step per block. Block 0 has no pass-through regime: its adapted figure stands for both, so
        # its adapter share is unknown; borrow block 1's relative share.
        extra = [max(a - p, 0.0) for a, p in zip(adapted, passing)]
        if L > 1 and extra[0] == 0.0 and passing[1] > 0:
            extra[0] = adapted[0] * extra[1] / adapted[1]
            passing[0] = adapted[0] - extra[0]
    extra_bytes = [max(r.activation_bytes - p, 0) for r, p in zip(rows, tc.pass_activation_bytes)]
    param_bytes = rows[0].adapter_bytes // max(1, rows[0].adapter_parameters) or 4
    return ShapeCosts(
        shape=shape,
        fixed_seconds=tc.fixed_seconds,
        nograd_seconds=list(tc.forward_nograd_seconds),
        pass_seconds=passing,
        adapter_seconds=[e * s for e, s in zip(extra, scale)],
        pass_bytes=list(tc.pass_activation_bytes),
        adapter_activation_bytes=[int(b * s) for b, s in zip(extra_bytes, scale)],
        static_bytes=tc.base_memory_bytes,
        parameters=params,
        param_bytes=param_bytes,
        peft_serving_ms=[r.peft_serving_overhead_ms_per_token * s for r, s in zip(rows, scale)],
        peft_base_ms=card.serving_cost.peft_base_ms_per_token,
        vllm_fraction=card.serving_cost.vllm_overhead_fraction,
        vllm_basis=card.serving_cost.vllm_basis,
        vllm_base_ms=card.serving_cost.vllm_base_ms_per_token,
        scale=sum(params) / sum(card_params),
    )
