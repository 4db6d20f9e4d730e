"""The planner's learning-curve model: a layer set's predicted gain after n steps, and its basis.

Two sources, by what the card holds:
- **pilots** (the card's performance column with its pilot curves): each layer's held-out gain at a quarter, half,
  three quarters and the end of its short single-layer run is fitted with a curve (curves.fit_curve); a set's
  curve combines its layers' as independent shares of the probe loss (curves.SetCurve). Other ranks and module
  sets scale each layer's curve by the ratio of the card score for that shape to the card's own.
- **prior** (no pilot curves): the set's calibrated card gain (½·Res², coupling-corrected, saturated at the probe
  loss) approached as 1 − exp(−n/τ) with τ a third of the reference steps: a full run reaches 95% of it. It says
  which sets are worth more, not how fast any of them learns; the plan's basis says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from layercard_service.control.planning.curves import Curve, CurveFit, SetCurve, fit_curve
from layercard_service.control.planning.gains import set_gain
from layercard_service.domain.cards import (
    PERFORMANCE_LEARNING_RATE,
    LayerCardData,
    calibrated_gain,
    performance_checkpoints,
)

__all__ = ["CurveModel"]


class _Scaled:
    """A layer's pilot fit with its gains scaled (another rank or module set than the pilots ran)."""

    def __init__(self, fit: CurveFit, factor: float) -> None:
        self.fit, self.factor = fit, factor
        self.best = Curve(fit.best.asymptote * factor, fit.best.tau, fit.best.beta)

    def gain(self, n: float) -> float:
        return self.fit.gain(n) * self.factor

    def low(self, n: float) -> float:
        return self.fit.low(n) * self.factor

    def high(self, n: float) -> float:
        return self.fit.high(n) * self.factor


@dataclass(frozen=True)
class _PriorCurve:
    asymptote: float
    tau: float

    def gain(self, n: float) -> float:
        return self.asymptote * -math.expm1(-max(n, 0.0) / self.tau)

    low = high = gain


class CurveModel:
    """``curve(layers, scores)`` gives an object with gain(n), low(n), high(n): the set's predicted learning curve."""

    def __init__(self, card: LayerCardData, reference_steps: int) -> None:
        self.card, self.reference_steps = card, reference_steps
        rows = card.layers
        self.pilots = bool(rows) and all(len(r.measured_gain_curve) > 0 for r in rows)
        self.learning_rate = PERFORMANCE_LEARNING_RATE if self.pilots else 0.0
        if self.pilots:
            steps = performance_checkpoints(card.settings.performance_steps)
            self.fits = [fit_curve(steps, r.measured_gain_curve, max(card.probe_loss, 0.0)) for r in rows]
            self.basis = (
                f"learning curves fitted to the card's pilot runs (one per layer, {card.settings.performance_steps} "
                f"steps at learning rate {PERFORMANCE_LEARNING_RATE:g}, held-out gain at steps {steps}), combined as "
                "independent shares of the probe loss; band: the fits the pilot points cannot tell apart"
            )
        else:
            self.basis = (
                f"prior curve: the calibrated card gain approached as 1 − exp(−n/τ), τ = {reference_steps / 3:.4g} "
                "steps (a third of the reference steps); no pilot runs on the card, so no measured learning speed"
            )

    def curve(self, layers: Sequence[int], scores: Sequence[float], own_scores: Sequence[float], coupling=None):
        """The set's curve; ``scores`` are the candidate shape's per-layer scores, ``own_scores`` the card shape's."""
        if self.pilots:
            factors = [s / o if o > 0 else 1.0 for s, o in zip(scores, own_scores)]
            fits = [
                self.fits[i] if abs(factors[i] - 1.0) < 1e-12 else _Scaled(self.fits[i], factors[i]) for i in layers
            ]
            return SetCurve(tuple(fits), max(self.card.probe_loss, 0.0))
        gain = calibrated_gain(set_gain(scores, layers, coupling), self.card.probe_loss)
        return _PriorCurve(gain, max(self.reference_steps / 3, 1e-9))
