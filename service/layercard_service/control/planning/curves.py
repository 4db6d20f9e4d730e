"""Learning curves: how a placement's loss gain grows with training steps, fitted from pilot runs.

A curve is g(n) = A · (1 − exp(−(n/τ)^β)): gain A approached with time scale τ steps and shape β (β < 1: fast
then slow; β > 1: a slow start, then a rise, as a run that must first find the task). It replaces the planner's
old assumption that a run of n steps gets n/N of its set's gain.

``fit_curve`` fits A, τ, β to measured (steps, gain) points by least squares: τ and β on a grid, A in closed form
and bounded to [0, max_gain] (a gain cannot exceed the loss it comes out of). Its uncertainty comes from the
fits the points cannot tell apart: every grid fit whose squared error is within 3.5 σ² of the best (a 68% region
for three parameters), σ the points' noise (the residual, never under 2% of the largest gain); the curve's
``low`` and ``high`` are their range at each step.

A set's curve combines its layers' curves as independent shares of the loss ℓ₀ it starts from:
g_S(n) = ℓ₀ · (1 − Π_{ℓ∈S} (1 − g_ℓ(n)/ℓ₀)). It never exceeds ℓ₀, is additive where the shares are small and
saturates where they are not; whether it ranks sets right is what the placement benchmark measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Curve", "CurveFit", "SetCurve", "fit_curve", "steps_to_reach"]

_TAU_GRID = 48  # log-spaced time scales from a quarter of the first point's steps to 50x the last's
_BETAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
NOISE_FLOOR = 0.02  # of the largest measured gain
BAND_CHI2 = 3.5  # Δ(squared error)/σ² of a 68% region for three parameters


@dataclass(frozen=True)
class Curve:
    asymptote: float  # A, nats
    tau: float  # steps
    beta: float

    def gain(self, steps: float) -> float:
        if steps <= 0 or self.asymptote <= 0:
            return 0.0
        return self.asymptote * -math.expm1(-((steps / self.tau) ** self.beta))


@dataclass(frozen=True)
class CurveFit:
    best: Curve
    band: tuple[Curve, ...]  # every fit the points cannot tell from the best (the best included)
    rms_error: float  # of the best fit, nats
    points: int

    def gain(self, steps: float) -> float:
        return self.best.gain(steps)

    def low(self, steps: float) -> float:
        return min(c.gain(steps) for c in self.band)

    def high(self, steps: float) -> float:
        return max(c.gain(steps) for c in self.band)


def _asymptote(shape: Sequence[float], gains: Sequence[float], max_gain: float) -> float:
    """The least-squares A for fixed τ, β (gain = A · shape), clamped to [0, max_gain]."""
    denom = sum(s * s for s in shape)
    if denom <= 0:
        return 0.0
    return min(max(sum(s * g for s, g in zip(shape, gains)) / denom, 0.0), max_gain)


def fit_curve(steps: Sequence[int], gains: Sequence[float], max_gain: float) -> CurveFit:
    """Fits g(n) = A(1 − exp(−(n/τ)^β)) to (steps, gains); A in [0, max_gain]. Needs at least one point."""
    if not steps or len(steps) != len(gains):
        raise ValueError("fit_curve needs as many gains as steps, at least one")
    if any(n <= 0 for n in steps):
        raise ValueError("steps must be positive")
    lo, hi = min(steps) / 4, max(steps) * 50
    taus = [lo * (hi / lo) ** (i / (_TAU_GRID - 1)) for i in range(_TAU_GRID)]
    fits: list[tuple[float, Curve]] = []
    for tau in taus:
        for beta in _BETAS:
            shape = [-math.expm1(-((n / tau) ** beta)) for n in steps]
            a = _asymptote(shape, gains, max_gain)
            sse = sum((a * s - g) ** 2 for s, g in zip(shape, gains))
            fits.append((sse, Curve(a, tau, beta)))
    fits.sort(key=lambda f: (f[0], -f[1].tau))
    best_sse, best = fits[0]
    # The points' noise: the best fit's residual where there are more points than parameters, and never under
    # NOISE_FLOOR of the gains' scale (held-out losses of short runs are noisy; few points say nothing of it).
    scale = max(abs(g) for g in gains)
    sigma2 = max(best_sse / max(1, len(steps) - 3), (NOISE_FLOOR * scale) ** 2)
    cutoff = best_sse + BAND_CHI2 * sigma2
    band = tuple(c for sse, c in fits if sse <= cutoff)
    return CurveFit(best, band, math.sqrt(best_sse / len(steps)), len(steps))


@dataclass(frozen=True)
class SetCurve:
    """A layer set's predicted curve from its layers' fits, as independent shares of the starting loss."""

    fits: tuple[CurveFit, ...]
    start_loss: float  # ℓ₀: the loss the run starts from (the card's probe loss)

    def _combine(self, gains: Sequence[float]) -> float:
        if self.start_loss <= 0:
            return 0.0
        kept = 1.0
        for g in gains:
            kept *= 1.0 - min(max(g, 0.0), self.start_loss) / self.start_loss
        return self.start_loss * (1.0 - kept)

    def gain(self, steps: float) -> float:
        return self._combine([f.gain(steps) for f in self.fits])

    def low(self, steps: float) -> float:
        return self._combine([f.low(steps) for f in self.fits])

    def high(self, steps: float) -> float:
        return self._combine([f.high(steps) for f in self.fits])

    def asymptote(self) -> float:
        return self._combine([f.best.asymptote for f in self.fits])


def steps_to_reach(curve, target: float, max_steps: int) -> int | None:
    """The fewest steps (≤ max_steps) at which ``curve.gain`` reaches ``target``; None when it does not."""
    if curve.gain(max_steps) < target:
        return None
    lo, hi = 0, max_steps  # gain(lo) < target <= gain(hi); curves rise monotonically
    if target <= 0:
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if curve.gain(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi
