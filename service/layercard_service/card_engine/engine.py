"""Computes a Layer Card: probe pass, per-module algebra, cost calibration, serving cost, optional coupling.

The model passed in is wrapped with LoRA for the duration and unwrapped before returning, so a caller may
keep it cached. Long phases report progress and check for cancellation between batches.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from layercard_service.card_engine import coupling as coupling_mod
from layercard_service.card_engine import performance as performance_mod
from layercard_service.card_engine.arch import detect_layout
from layercard_service.card_engine.calibration import calibrate
from layercard_service.card_engine.cost import CostModel, TrainerSteps, measure_peft_serving
from layercard_service.card_engine.probe import ModuleKey, attach_lora, lora_modules, module_type, run_probe
from layercard_service.card_engine.resnorm import ModuleFigures, module_figures
from layercard_service.data.encode import EncodeConfig, collate, encode_examples
from layercard_service.data.jsonl import Example
from layercard_service.domain.cards import (
    CardSettings,
    CostCalibration,
    LayerCardData,
    LayerCardRow,
    LearningRatePilot,
    ModuleCard,
    ServingCostCard,
    TrainingCostCard,
    calibrated_gain,
)
from layercard_service.errors import Cancelled, FailedPrecondition, InvalidArgument, LayercardError

__all__ = ["ProgressFn", "compute_card", "make_probe_batches"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float, str], None]  # (phase, fraction of the whole card, message)


def make_probe_batches(
    tokenizer, examples: Sequence[Example], settings: CardSettings, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Samples the probe set and cuts it into equal batches of one width, so every step has the same cost."""
    if len(examples) < 2:
        raise InvalidArgument.field("dataset", f"needs at least 2 examples for a probe, got {len(examples)}")
    rng = random.Random(settings.seed)
    chosen = rng.sample(list(examples), min(settings.probe_size, len(examples)))
    encoded = [
        e
        for e in encode_examples(tokenizer, chosen, EncodeConfig(max_length=settings.max_seq_len))
        if e.n_completion_tokens > 0
    ]
    if len(encoded) < 2:
        raise InvalidArgument.field("dataset", "fewer than 2 examples have completion tokens to probe with")
    batch_size = min(settings.batch_size, len(encoded) // 2)  # at least one batch per half
    usable = len(encoded) - len(encoded) % batch_size
    width = max(len(e.input_ids) for e in encoded[:usable])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, usable, batch_size):
        batch = collate(encoded[start : start + batch_size], pad)
        extra = width - batch["input_ids"].shape[1]
        if extra:
            batch = {
                "input_ids": nn.functional.pad(batch["input_ids"], (0, extra), value=pad),
                "attention_mask": nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
                "labels": nn.functional.pad(batch["labels"], (0, extra), value=-100),
            }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def compute_card(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    settings: CardSettings,
    model_name: str = "",
    progress: ProgressFn = lambda phase, fraction, message: None,
    cancel: threading.Event | None = None,
) -> LayerCardData:
    cancel = cancel or threading.Event()
    started = time.perf_counter()
    layout = detect_layout(model)
    types = layout.select(settings.target_modules)
    device = next(model.parameters()).device
    dtype_bytes = next(model.parameters()).element_size()
    num_parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = make_probe_batches(tokenizer, examples, settings, device)

    current = ["attach"]  # the phase running, for the error when the model's own code fails in it

    def check(phase: str, fraction: float, message: str) -> None:
        if cancel.is_set():
            raise Cancelled("the card computation was cancelled", reason="CANCELLED")
        current[0] = phase
        progress(phase, fraction, message)

    try:
        peft_model = attach_lora(model, layout, types, settings.rank, settings.lora_alpha, settings.seed)
    except (ValueError, TypeError, NotImplementedError) as exc:  # peft refuses a module of this architecture
        raise _unsupported(type(model).__name__, "attach", exc) from exc
    try:
        lora = lora_modules(peft_model, layout)
        blocks = peft_model.base_model.model.get_submodule(layout.blocks_path)
        check("probe", 0.0, f"probe pass over {len(batches)} batches")
        probe = run_probe(
            peft_model,
            layout,
            batches,
            on_batch=lambda done, total: check("probe", 0.8 * done / total, f"batch {done}/{total}"),
        )
        figures = {
            key: module_figures(p, probe.half_completion_tokens, settings.scaling, settings.damping)
            for key, p in probe.modules.items()
        }

        L = layout.num_layers
        per_layer_params = layout.adapter_parameters(types, settings.rank)
        check("calibrate", 0.8, "cost calibration: training steps of several placements, fitted, then held out")
        with TrainerSteps(peft_model, blocks, lora, batches[0]) as steps:
            cost, calibration = calibrate(
                steps,
                weight_bytes=weight_bytes,
                block_parameters=[
                    sum(p.numel() for name, p in block.named_parameters() if "lora_" not in name) for block in blocks
                ],
                adapter_parameters=[per_layer_params] * L,
                adapter_bytes_per_layer=[4 * per_layer_params * dtype_bytes] * L,  # weights, gradient, 2 moments
                seed=settings.seed,
                on_step=lambda done, expected: check(
                    "calibrate", 0.8 + 0.08 * min(done / expected, 1.0), f"training step {done}/{expected}"
                ),
            )

        check("serving", 0.88, "unmerged peft decoding latency")
        prompt = batches[0]["input_ids"][:1, : max(1, int(batches[0]["attention_mask"][0].sum()))]
        base_ms, adapted_ms = measure_peft_serving(peft_model, prompt)
        per_layer_ms = max(adapted_ms - base_ms, 0.0) / L

        rho = None
        coupling_end = 0.95 if settings.compute_performance else 1.0
        if settings.compute_coupling:
            check("coupling", 0.9, f"{L} extra forward passes")
            steps_by_layer: dict[int, dict[ModuleKey, torch.Tensor]] = {}
            rate: dict[int, float] = {}
            for key, fig in figures.items():
                steps_by_layer.setdefault(key[0], {})[key] = fig.step
                rate[key[0]] = rate.get(key[0], 0.0) + fig.resnorm_sq * settings.scaling**2
            deltas = coupling_mod.finite_difference(
                peft_model,
                lora,
                steps_by_layer,
                rate,
                batches[0],
                on_layer=lambda done, total: check(
                    "coupling", 0.9 + (coupling_end - 0.9) * done / total, f"layer {done}/{total}"
                ),
            )
            rho = coupling_mod.cosine_matrix(deltas).tolist()
        measured_gains, rate_pilots = None, []
        if settings.compute_performance:
            rates = settings.learning_rate_grid
            runs = L + len(rates)

            def pilot_progress(done: int, what: str) -> None:
                check("performance", coupling_end + (1.0 - coupling_end) * done / runs, what)

            check(
                "performance",
                coupling_end,
                f"{L} single-layer and {len(rates)} all-layer runs of {settings.performance_steps} steps",
            )
            measured_gains = performance_mod.layer_gains(
                peft_model,
                lora,
                batches,
                L,
                settings.performance_steps,
                on_layer=lambda done, total: pilot_progress(done, f"layer {done}/{total}"),
            )
            curves = performance_mod.rate_gains(
                peft_model,
                lora,
                batches,
                settings.performance_steps,
                rates,
                on_run=lambda done, total: pilot_progress(L + done, f"all layers, learning rate {rates[done - 1]:g}"),
            )
            rate_pilots = [LearningRatePilot(rate, curve) for rate, curve in zip(rates, curves)]
    except (LayercardError, MemoryError, torch.OutOfMemoryError):
        raise  # ours already, or a resource limit rather than the architecture
    except Exception as exc:
        raise _unsupported(type(model).__name__, current[0], exc) from exc
    finally:
        peft_model.unload()  # the caller's model comes back without LoRA wrappers...
        if hasattr(model, "peft_config"):
            del model.peft_config  # ...and without peft's bookkeeping, so it can be probed again

    rows = _rows(figures, L, layout.shapes, per_layer_params, dtype_bytes, cost, per_layer_ms, probe.loss)
    for row, stream in zip(rows, probe.stream_mean_square):
        row.residual_mean_square = stream
    for row, curve in zip(rows, measured_gains or ()):
        row.measured_gain, row.measured_gain_curve = curve[-1], curve
    training = _training_cost(
        cost, calibration, L, probe.batch_size, probe.seq_len, cache_bytes_per_token=probe.hidden_bytes_per_token
    )
    check("done", 1.0, "card complete")
    return LayerCardData(
        model=model_name,
        architecture=type(model).__name__,
        num_layers=L,
        num_parameters=num_parameters,
        module_types=list(types),
        settings=settings,
        layers=rows,
        training_cost=training,
        serving_cost=ServingCostCard(peft_base_ms_per_token=base_ms),
        probe_loss=probe.loss,
        probe_examples=probe.examples,
        probe_tokens=probe.tokens,
        compute_seconds=time.perf_counter() - started,
        coupling=rho,
        learning_rate_pilots=rate_pilots,
    )


_PHASES = {
    "attach": "wrapping its linear modules with peft's LoRA",
    "probe": "the probe pass (forward and backward with LoRA)",
    "calibrate": "the cost calibration (training steps)",
    "serving": "batch-1 decoding with a KV cache (the serving cost)",
    "coupling": "the coupling passes",
    "performance": "the pilot training runs",
}


def _unsupported(architecture: str, phase: str, exc: Exception) -> FailedPrecondition:
    """An error raised in the model's own code (transformers, peft) while the card ran it: this architecture
    lacks what that phase needs. The traceback stays in the server log; the caller gets the phase and the error."""
    log.warning("card failed on %s in phase %s", architecture, phase, exc_info=exc)
    detail = (str(exc).splitlines() or [""])[0][:200]
    return FailedPrecondition(
        f"unsupported model {architecture}: {_PHASES.get(phase, phase)} failed ({type(exc).__name__}: {detail})",
        reason="UNSUPPORTED_ARCHITECTURE",
        metadata={"architecture": architecture, "phase": phase, "error": type(exc).__name__},
    )


def _training_cost(
    cost: CostModel,
    calibration: CostCalibration,
    num_layers: int,
    batch_size: int,
    seq_len: int,
    *,
    cache_bytes_per_token: int = 0,
) -> TrainingCostCard:
    """The card's cost record: the fitted figures, the full and upper-half steps among the fitted placements, and
    as the validation error the worst held-out placement (p50 and p90 in ``calibration``)."""
    by_layers = {tuple(t.layers): t for t in calibration.fit}
    full, partial = by_layers[tuple(range(num_layers))], by_layers[tuple(range(num_layers // 2, num_layers))]
    checks = calibration.held_out or calibration.fit
    return TrainingCostCard(
        fixed_seconds=cost.fixed_seconds,
        per_adapter_seconds=_mean([a - p for a, p in zip(cost.backward_adapted_seconds, cost.backward_pass_seconds)]),
        base_memory_bytes=cost.static_bytes,
        predicted_full_step_seconds=full.predicted_seconds,
        measured_full_step_seconds=full.measured_seconds,
        predicted_partial_step_seconds=partial.predicted_seconds,
        measured_partial_step_seconds=partial.measured_seconds,
        validation_layers=list(partial.layers),
        step_time_relative_error=_worst([(t.predicted_seconds, t.measured_seconds) for t in checks]),
        predicted_full_peak_memory_bytes=full.predicted_peak_memory_bytes,
        measured_full_peak_memory_bytes=full.measured_peak_memory_bytes,
        peak_memory_relative_error=_worst(
            [(t.predicted_peak_memory_bytes, t.measured_peak_memory_bytes) for t in checks]
        ),
        batch_size=batch_size,
        seq_len=seq_len,
        backward_pass_seconds=cost.backward_pass_seconds,
        pass_activation_bytes=cost.saved_pass_bytes,
        forward_pass_seconds=cost.forward_pass_seconds,
        forward_nograd_seconds=cost.forward_nograd_seconds,
        calibration=calibration,
        prefix_cache_bytes_per_token=cache_bytes_per_token,
    )


def _worst(pairs: Sequence[tuple[float, float]]) -> float:
    """The largest |predicted - measured| / measured over (predicted, measured) pairs."""
    return max((abs(p - m) / m for p, m in pairs if m > 0), default=0.0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _rows(
    figures: dict[ModuleKey, ModuleFigures],
    num_layers: int,
    shapes: dict[str, tuple[int, int]],
    per_layer_params: int,
    dtype_bytes: int,
    cost: CostModel,
    per_layer_ms: float,
    probe_loss: float,
) -> list[LayerCardRow]:
    total = sum(f.resnorm_sq for f in figures.values()) or 1.0
    rows = []
    for index in range(num_layers):
        by_type: dict[str, list[tuple[str, ModuleFigures]]] = {}
        for key, fig in figures.items():
            if key[0] == index:
                by_type.setdefault(module_type(key), []).append((key[1], fig))
        modules = [
            ModuleCard(
                module_type=name,
                resnorm_sq=sum(f.resnorm_sq for _, f in figs),
                resnorm_sq_split_half=sum(f.resnorm_sq_split_half for _, f in figs),
                activation_energy=sum(f.activation_energy for _, f in figs),
                effective_rank=_mean([f.effective_rank for _, f in figs]),
                condition_number=max(f.condition_number for _, f in figs),
                # r (d_out + d_in) per module
                adapter_parameters=sum(f.grad.shape[1] * (f.grad.shape[0] + shapes[path][0]) for path, f in figs),
            )
            for name, figs in by_type.items()
        ]
        res = sum(m.resnorm_sq for m in modules)
        rows.append(
            LayerCardRow(
                index=index,
                resnorm_sq=res,
                resnorm_sq_split_half=sum(m.resnorm_sq_split_half for m in modules),
                resnorm_share=res / total,
                predicted_gain=calibrated_gain(0.5 * res, probe_loss),  # ½Res² is local: saturate at the loss
                activation_energy=sum(m.activation_energy for m in modules),
                effective_rank=_mean([m.effective_rank for m in modules]),
                condition_number=max(m.condition_number for m in modules),
                modules=modules,
                forward_seconds=cost.forward_seconds[index],
                backward_seconds=cost.backward_adapted_seconds[index],
                activation_bytes=cost.saved_adapted_bytes[index],
                adapter_parameters=per_layer_params,
                adapter_bytes=per_layer_params * dtype_bytes,
                peft_serving_overhead_ms_per_token=per_layer_ms,
            )
        )
    return rows
