"""Cost calibration that survives noise: real training steps of several placements, fitted, then checked on
placements the fit never saw (METHOD.md, "Cost").

One hooked step per block (the first calibration) was at the mercy of a noisy machine and of autograd's order of
work: on a 30-block model its pass-through figures came out slower than adapted blocks. Here the per-block figures
come from whole, hook-free steps of the trainer's shape (forward, backward, gradient clipping, AdamW), which is what
a plan's step time promises. The model, per block ℓ and placement S with lowest block m = min S:

    time(S) = fixed + Σ_ℓ N_ℓ + Σ_{ℓ ≥ m} G_ℓ + Σ_{ℓ ∈ S} X_ℓ

- N_ℓ, the no-graph forward, is measured directly (a no-grad forward timed per block; forward timing is exact
  with hooks, unlike backward). Every block pays it.
- G_ℓ = g·w_ℓ: a block at or above m runs inside the backward graph (graph-building forward, gradient passing
  through). w_ℓ is the block's share of the frozen weights (1 for identical blocks): exact, where a share
  measured per block would carry the machine's noise into every block's figure.
- X_ℓ = x·p_ℓ: an adapted block's extra (the adapter's forward, its weights' gradients, their AdamW update); p_ℓ is
  the block's share of the adapter parameters.
So pass-through costs N+G and adaptation N+G+X. fixed, g and x (all ≥ 0) are fitted by non-negative least squares on
relative error to the least of interleaved rounds over a few placements that exercise every regime (every block;
block 0 alone, so everything above passes the gradient through; the top block alone, so everything below has no
graph; the upper half: every regime, and two placements that share a lowest block). For identical blocks a
prediction depends on the measured N only through the sum fixed + Σ N, which the fit sets. A fitted figure at its
bound is reported in the notes, with the value the unconstrained fit wanted: nothing is clipped silently. Then
random placements, measured once each and interleaved with the rounds, give the held-out error (p50, p90) of step
time and peak memory.

Cost: (rounds x 4 + 8) training steps, most of them cheaper than a full-layer step, plus one no-grad forward a
round; 2 rounds on a quiet machine (16 steps), up to 9 on a busy one (44) while the calibration is under 3 s. A fifth
placement (a middle block alone) was measured not to improve the held-out error (bench/cost_model.py), so it is not
paid for.

Memory needs no fit: the bytes saved for backward are counted exactly, per block, in the same steps.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from layercard_service.card_engine.cost import CostModel, StepSample
from layercard_service.domain.cards import CostCalibration, PlacementTiming

__all__ = [
    "HELD_OUT_PLACEMENTS",
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "StepSample",
    "StepSource",
    "calibrate",
    "error_quantiles",
    "fit_placements",
    "held_out_placements",
    "nnls",
]

# Rounds over the fitted placements, interleaved. More than the minimum only while some placement's two least
# measurements differ by more than AGREEMENT (a busy machine), up to the maximum, and only while the calibration has
# run less than EXTRA_ROUNDS_SECONDS: cheap where steps are cheap; a deep model's steps take seconds, and each
# of its rounds averages more work already.
MIN_ROUNDS, MAX_ROUNDS, AGREEMENT, EXTRA_ROUNDS_SECONDS = 2, 9, 0.05, 3.0
HELD_OUT_PLACEMENTS = 8
NOISY_ERROR = 0.15  # a held-out p90 above this is worth a note: plans' step times are rough on this machine
METHOD = "nnls: fixed + no-graph forward (measured) + graph and adapter figures fitted to whole training steps"
CPU_CLOCK = "; timed by the thread's CPU time (one intra-op thread), x {scale:.3f} to wall time"
BUSY = 1.2  # a median wall / CPU ratio above this gets a note


class StepSource(Protocol):
    """Runs real steps of a model (cost.TrainerSteps), or a fake one in tests."""

    num_layers: int
    clock: str  # "wall", or "cpu": steps' cpu_seconds and forward_nograd() are the thread's CPU time

    def step(self, layers: frozenset[int]) -> StepSample: ...

    def forward_nograd(self) -> list[float]: ...


def fit_placements(num_layers: int) -> list[tuple[int, ...]]:
    """The fitted placements: each regime, three lowest blocks and two sizes (deduplicated for shallow models)."""
    L = num_layers
    wanted = [tuple(range(L)), (0,), tuple(range(L // 2, L)), (L - 1,)]
    return list(dict.fromkeys(wanted))


def held_out_placements(
    num_layers: int, count: int, seed: int, exclude: Sequence[tuple[int, ...]]
) -> list[tuple[int, ...]]:
    """``count`` random placements not in ``exclude``: a size uniform in 1..L, then a uniform set of that size, so
    lowest blocks and sizes both vary. Fewer when the model has fewer distinct sets."""
    rng = random.Random(seed)
    taken, chosen = set(exclude), []
    available = 2**num_layers - 1 - len(taken)
    for _ in range(100 * count):
        if len(chosen) >= min(count, available):
            break
        size = rng.randint(1, num_layers)
        layers = tuple(sorted(rng.sample(range(num_layers), size)))
        if layers not in taken:
            taken.add(layers)
            chosen.append(layers)
    return chosen


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ‖a x − b‖ with x ≥ 0, exactly, for the few columns here: the best of the least-squares fits on every
    subset of free columns whose solution is non-negative (the optimum is one of them)."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(b**2))
    for size in range(1, n + 1):
        for free in itertools.combinations(range(n), size):
            sub, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
            if np.any(sub < 0):
                continue
            x = np.zeros(n)
            x[list(free)] = sub
            residual = float(np.sum((a @ x - b) ** 2))
            if residual < best_residual - 1e-15 * max(1.0, best_residual):
                best, best_residual = x, residual
    return best


def error_quantiles(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """(p50, p90) of |predicted − measured| / measured, linearly interpolated; (0, 0) with nothing measured."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]
    if not errors:
        return 0.0, 0.0
    values = np.quantile(np.asarray(errors), [0.5, 0.9])
    return float(values[0]), float(values[1])


def _shares(values: Sequence[float]) -> np.ndarray:
    """Each block's share of the total, scaled to mean 1; all ones when the total is 0."""
    array = np.asarray(values, dtype=float)
    mean = array.mean() if array.size else 0.0
    return array / mean if mean > 0 else np.ones_like(array)


def _design(layers: Sequence[int], graph_share: np.ndarray, adapter_share: np.ndarray) -> list[float]:
    """The row of the fit's design matrix for one placement: columns fixed, g, x."""
    low = min(layers)
    return [1.0, float(graph_share[low:].sum()), float(adapter_share[list(layers)].sum())]


@dataclass
class _Measurements:
    fitted: dict[tuple[int, ...], list[StepSample]]
    held_out: dict[tuple[int, ...], StepSample]
    forward: list[list[float]]  # per round, per block
    steps: int = 0
    rounds: int = 0


def _settled(samples: dict[tuple[int, ...], list[StepSample]], cpu: bool) -> bool:
    """Whether every fitted placement's two least measurements agree: the least is then the machine's own time."""
    for values in samples.values():
        low, second = sorted(s.cpu_seconds if cpu else s.seconds for s in values)[:2]
        if second > low * (1 + AGREEMENT):
            return False
    return True


def _measure(
    source: StepSource, fitted, checks, min_rounds: int, max_rounds: int, on_step: Callable[[int, int], None]
) -> _Measurements:
    """Rounds over the fitted placements, with the held-out steps between the first two: a drifting machine
    (another process starting, a thermal limit) shifts fitted and held-out placements alike. Rounds alternate
    their order; after ``min_rounds`` they stop as soon as the least measurements have settled."""
    started = time.perf_counter()
    m = _Measurements({layers: [] for layers in fitted}, {}, [])
    half = (len(checks) + 1) // 2
    pending = [checks[:half], checks[half:]]

    def step(layers: tuple[int, ...]) -> StepSample:
        sample = source.step(frozenset(layers))
        m.steps += 1
        on_step(m.steps, max(m.steps, min_rounds * len(fitted) + len(checks)))
        return sample

    while m.rounds < max_rounds:
        m.forward.append(source.forward_nograd())
        for layers in fitted if m.rounds % 2 == 0 else reversed(fitted):
            m.fitted[layers].append(step(layers))
        m.rounds += 1
        for layers in pending.pop(0) if pending else ():
            m.held_out[layers] = step(layers)
        over_time = time.perf_counter() - started > EXTRA_ROUNDS_SECONDS
        if m.rounds >= min_rounds and not pending and (over_time or _settled(m.fitted, source.clock == "cpu")):
            break
    for layers in checks:  # a single round leaves the second half
        if layers not in m.held_out:
            m.held_out[layers] = step(layers)
    return m


def calibrate(
    source: StepSource,
    weight_bytes: int,
    block_parameters: Sequence[int],
    adapter_parameters: Sequence[int],
    adapter_bytes_per_layer: Sequence[int],
    seed: int = 0,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    held_out: int = HELD_OUT_PLACEMENTS,
    on_step: Callable[[int, int], None] = lambda done, expected: None,
) -> tuple[CostModel, CostCalibration]:
    """Measures, fits and checks the cost model; returns it with the record the card keeps.

    Per block: ``block_parameters`` its frozen weights (its share of the graph figure: exact, where a measured
    share would carry the machine's noise into every block), ``adapter_parameters`` the card's adapter (its share
    of the adapter figure) and ``adapter_bytes_per_layer`` the adapter's memory (weights, gradient, AdamW's two
    moments), as the trainer counts it. ``on_step(done, expected)`` follows every step and may raise (cancel).
    """
    started = time.perf_counter()
    L = source.num_layers
    fitted = fit_placements(L)
    checks = held_out_placements(L, held_out, seed, fitted)
    m = _measure(source, fitted, checks, max(1, min_rounds), max(min_rounds, max_rounds), on_step)
    timings = m.fitted
    own, scale, notes = _clock(source, [s for v in timings.values() for s in v] + list(m.held_out.values()))

    # On a shared machine noise only ever adds time (preemption, another process's cache traffic), and a plan's
    # steps are best priced as they run undisturbed: the full placement's least time sets the scale. A busy spell
    # slows a whole round alike, so each placement's time relative to the full placement's in the same round
    # holds still: the median of those ratios sets the shape.
    full_layers = tuple(range(L))
    base = min(own(s) for s in timings[full_layers])
    measured = {
        layers: base * statistics.median(own(s) / own(f) for s, f in zip(samples, timings[full_layers]))
        for layers, samples in timings.items()
    }
    forward = [min(values) * scale for values in zip(*m.forward)]  # N_ℓ, the least for the same reason
    graph_share, adapter_share = _shares(block_parameters), _shares(adapter_parameters)
    rows = np.asarray([_design(layers, graph_share, adapter_share) for layers in fitted])
    times = np.asarray([measured[layers] for layers in fitted])
    # Relative error: a fast placement's seconds count as much as a slow one's. The no-graph forward is known.
    a, b = rows / times[:, None], (times - sum(forward)) / times
    fixed, g, x = nnls(a, b)
    notes += _bound_notes((fixed, g, x), a, b, len(fitted))

    full, zero = timings[tuple(range(L))][-1], timings[(0,)][-1]  # bytes are exact: any sample will do
    graph = [g * w for w in graph_share]  # G_ℓ
    adapter = [x * p for p in adapter_share]  # X_ℓ
    cost = CostModel(
        # The fit sees whole steps: forward figures hold the measured forward, backward ones the fitted rest.
        forward_seconds=list(forward),
        forward_pass_seconds=list(forward),
        forward_nograd_seconds=list(forward),
        backward_adapted_seconds=[gl + xl for gl, xl in zip(graph, adapter)],
        backward_pass_seconds=list(graph),
        saved_adapted_bytes=list(full.saved_bytes),
        saved_pass_bytes=[full.saved_bytes[0], *zero.saved_bytes[1:]],  # block 0 never passes a gradient through
        fixed_seconds=float(fixed),
        static_bytes=weight_bytes + full.outside_saved_bytes,
        adapter_bytes_per_layer=list(adapter_bytes_per_layer),
    )

    def timing(layers: tuple[int, ...], seconds: float, sample: StepSample) -> PlacementTiming:
        saved = sum(sample.saved_bytes) + sample.outside_saved_bytes
        return PlacementTiming(
            layers=list(layers),
            measured_seconds=seconds,
            predicted_seconds=cost.step_seconds(layers),
            measured_peak_memory_bytes=weight_bytes + saved + sum(adapter_bytes_per_layer[i] for i in layers),
            predicted_peak_memory_bytes=cost.peak_bytes(layers),
        )

    fit_records = [timing(layers, measured[layers], timings[layers][-1]) for layers in fitted]
    held = [timing(layers, own(m.held_out[layers]), m.held_out[layers]) for layers in checks]
    step_p50, step_p90 = error_quantiles([h.predicted_seconds for h in held], [h.measured_seconds for h in held])
    mem_p50, mem_p90 = error_quantiles(
        [h.predicted_peak_memory_bytes for h in held], [h.measured_peak_memory_bytes for h in held]
    )
    if len(held) < held_out:
        notes.append(f"only {len(held)} held-out placements: the model has no more distinct layer sets")
    if step_p90 > NOISY_ERROR:
        notes.append(
            f"held-out step time error p90 is {step_p90:.0%}: plans' step times are rough on this machine "
            "(a noisy or shared machine, or blocks that cost differently than the model assumes)"
        )
    record = CostCalibration(
        method=METHOD + (CPU_CLOCK.format(scale=scale) if source.clock == "cpu" else ""),
        rounds=m.rounds,
        measured_steps=m.steps,
        seconds=time.perf_counter() - started,
        graph_seconds_per_block=float(g),
        adapter_seconds_per_block=float(x),
        fit=fit_records,
        held_out=held,
        step_error_p50=step_p50,
        step_error_p90=step_p90,
        memory_error_p50=mem_p50,
        memory_error_p90=mem_p90,
        notes=notes,
    )
    return cost, record


def _clock(source: StepSource, samples: list[StepSample]) -> tuple[Callable[[StepSample], float], float, list[str]]:
    """How a step's seconds are read: wall time, or the thread's CPU time scaled to wall time by the quietest
    steps' ratio (the 10th percentile of wall / CPU: 1 on an idle machine)."""
    if source.clock != "cpu":
        return (lambda sample: sample.seconds), 1.0, []
    ratios = [s.seconds / s.cpu_seconds for s in samples if s.cpu_seconds > 0]
    scale = max(1.0, float(np.quantile(ratios, 0.1))) if ratios else 1.0
    notes = []
    if ratios and float(np.median(ratios)) > BUSY:
        notes.append(
            f"the machine was busy: a step's wall time was {np.median(ratios):.1f}x its own CPU time (median); "
            "the figures are CPU time, which other processes do not inflate, scaled by the quietest steps' ratio"
        )
    return (lambda sample: sample.cpu_seconds * scale), scale, notes


_FIGURES = (
    ("fixed", "the per-step time outside the blocks (embedding, head, loss, optimizer)"),
    ("graph", "the per-block time inside the backward graph beyond the no-graph forward"),
    ("adapter", "the per-block time of an adapter"),
)


def _bound_notes(solution: Sequence[float], a: np.ndarray, b: np.ndarray, placements: int) -> list[str]:
    """A note for each fitted figure at its bound 0, with what the unconstrained fit wanted."""
    notes = []
    rank = int(np.linalg.matrix_rank(a))
    if rank < a.shape[1]:
        notes.append(
            f"{placements} distinct placements determine only {rank} of the {a.shape[1]} fitted figures: "
            "the fit is underdetermined (a model this shallow has few distinct placements)"
        )
    free, *_ = np.linalg.lstsq(a, b, rcond=None)
    for (name, what), value, wanted in zip(_FIGURES, solution, free):
        if value == 0.0:
            notes.append(f"fitted {name} figure ({what}) is at its bound 0; unconstrained it would be {wanted:.3g} s")
    return notes
