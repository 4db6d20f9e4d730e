"""The planner's learning-curve model: a layer set's predicted gain after n steps, and its basis.

Two sources, by what the card holds:
- **pilots** (the card's performance column with its pilot curves): each layer's held-out gain at a quarter, half,
  three quarters and the end of its short single-layer run is fitted with a curve (curves.fit_curve); a set's
  curve combines its layers' as independent shares of the probe loss (curves.SetCurve). Other ranks and module
  sets scale each layer's curve by the ratio of the card score for that shape to the card's own.
- **learning rates** (the card's all-layer pilots, one per rate of its grid): a set's curve at rate η is its curve
  at the single-layer pilots' rate η₀ times the ratio of the all-layer fits, F_η(n) / F_η₀(n), saturated at the
  probe loss. So a rate that speeds full-layer LoRA up speeds every set up alike, and one that spoils it is never
  chosen; whether small sets want more than that is not measured. Without those pilots, every plan is at η₀.
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


class _RateScaled:
    """A set's curve at another learning rate: its curve at η₀ times F_η(n) / F_η₀(n), the all-layer fits' ratio."""

    def __init__(self, curve, fit: CurveFit, reference: CurveFit, cap: float) -> None:
        self.inner, self.fit, self.reference, self.cap = curve, fit, reference, cap

    def _ratio(self, n: float) -> float:
        floor = 1e-9 * max(self.cap, 1e-12)  # where F_η₀ has not started, the ratio is F_η's start over a floor
        return max(self.fit.gain(n), 0.0) / max(self.reference.gain(n), floor)

    def _scaled(self, gain: float, n: float) -> float:
        return min(gain * self._ratio(n), self.cap)

    def gain(self, n: float) -> float:
        return self._scaled(self.inner.gain(n), n)

    def low(self, n: float) -> float:
        return self._scaled(self.inner.low(n), n)

    def high(self, n: float) -> float:
        return self._scaled(self.inner.high(n), n)


@dataclass(frozen=True)
class _PriorCurve:
    asymptote: float
    tau: float

    def gain(self, n: float) -> float:
        return self.asymptote * -math.expm1(-max(n, 0.0) / self.tau)

    low = high = gain


class CurveModel:
    """``curve(layers, scores, own_scores, coupling, learning_rate)`` gives an object with gain(n), low(n), high(n):
    the set's predicted learning curve; ``learning_rates`` are the rates it can predict (0.0 alone: a prior)."""

    def __init__(self, card: LayerCardData, reference_steps: int) -> None:
        self.card, self.reference_steps = card, reference_steps
        rows = card.layers
        self.pilots = bool(rows) and all(len(r.measured_gain_curve) > 0 for r in rows)
        self.learning_rates: tuple[float, ...] = (PERFORMANCE_LEARNING_RATE,) if self.pilots else (0.0,)
        self.rate_fits: dict[float, CurveFit] = {}
        if self.pilots:
            steps = performance_checkpoints(card.settings.performance_steps)
            cap = max(card.probe_loss, 0.0)
            self.fits = [fit_curve(steps, r.measured_gain_curve, cap) for r in rows]
            self.basis = (
                f"learning curves fitted to the card's pilot runs (one per layer, {card.settings.performance_steps} "
                f"steps at learning rate {PERFORMANCE_LEARNING_RATE:g}, held-out gain at steps {steps}), combined as "
                "independent shares of the probe loss; band: the fits the pilot points cannot tell apart"
            )
            pilots = {
                p.learning_rate: p.gain_curve for p in card.learning_rate_pilots if len(p.gain_curve) == len(steps)
            }
            if PERFORMANCE_LEARNING_RATE in pilots and len(pilots) > 1:
                self.rate_fits = {rate: fit_curve(steps, curve, cap) for rate, curve in pilots.items()}
                self.learning_rates = tuple(sorted(pilots))
                self.basis += (
                    f"; at learning rate η, scaled by the ratio of all-layer pilot fits at η and "
                    f"{PERFORMANCE_LEARNING_RATE:g} (rates {', '.join(f'{r:g}' for r in self.learning_rates)})"
                )
        else:
            self.basis = (
                f"prior curve: the calibrated card gain approached as 1 − exp(−n/τ), τ = {reference_steps / 3:.4g} "
                "steps (a third of the reference steps); no pilot runs on the card, so no measured learning speed"
            )

    def curve(
        self,
        layers: Sequence[int],
        scores: Sequence[float],
        own_scores: Sequence[float],
        coupling=None,
        learning_rate: float | None = None,
    ):
        """The set's curve at ``learning_rate`` (one of ``learning_rates``; None: the first); ``scores`` are the
        candidate shape's per-layer scores, ``own_scores`` the card shape's."""
        if self.pilots:
            factors = [s / o if o > 0 else 1.0 for s, o in zip(scores, own_scores)]
            fits = [
                self.fits[i] if abs(factors[i] - 1.0) < 1e-12 else _Scaled(self.fits[i], factors[i]) for i in layers
            ]
            curve = SetCurve(tuple(fits), max(self.card.probe_loss, 0.0))
            if learning_rate is None or learning_rate == PERFORMANCE_LEARNING_RATE or not self.rate_fits:
                return curve
            if learning_rate not in self.rate_fits:
                raise ValueError(f"no all-layer pilot at learning rate {learning_rate:g}")
            reference = self.rate_fits[PERFORMANCE_LEARNING_RATE]
            return _RateScaled(curve, self.rate_fits[learning_rate], reference, max(self.card.probe_loss, 0.0))
        gain = calibrated_gain(set_gain(scores, layers, coupling), self.card.probe_loss)
        return _PriorCurve(gain, max(self.reference_steps / 3, 1e-9))
