"""Can the planner trust the card's cost figures, and how much cheaper does training get above the lowest block?

On ``builtin:tiny`` and on the real model (``builtin:smollm2-135m``), task ``builtin:facts`` or the cipher:
1. the card's own held-out check: its step-time (and memory) prediction error on random layer sets it did not fit;
2. stability: the same card computed twice, plans at several budgets compared (layers, predicted step time);
3. training above the lowest adapted block on the real model, interleaved and repeated, medians: full-layer LoRA,
   the top quarter of the blocks without and with the frozen-prefix cache (the head computed only at labelled
   positions in every run, so the ratio isolates what the placement and the cache save);
4. exactness: the cached loss against the uncached one on the same batches;
5. data parallel: the adapter of 2 gloo processes against 1 process with the same global batch;
6. the card's time and peak memory on the real model at its default probe (256 examples) against its floor: one
   LoRA forward+backward over the probe (time; warmed up, interleaved floor, card, floor) and one training step
   (memory; each in a fresh process). The probe of 32 in (1) gives the ratio where the probe is small.

    .venv/bin/python -m bench.cost_model        # writes bench/results/cost_model.json and cost_model.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, version, write_results
from layercard_service.domain.cards import CardSettings

REAL = "builtin:smollm2-135m"
TASK = "builtin:facts"


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cost_model", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step-time comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


# --- 1, 2 and 6: the card's held-out error, its stability, its own cost ------------------------------------------
def cards(model_spec: str, task: str, probe: int, seed_sets: int = 64) -> dict:
    """Two cards of the same model, data and settings: held-out errors, plan disagreement, card time / floor."""
    import random

    from bench.card import floor_seconds
    from layercard_service.card_engine.engine import compute_card
    from layercard_service.control.planning.costs import Shape, shape_costs
    from layercard_service.data.tasks import get_task
    from layercard_service.domain.cards import CardSettings
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model

    model, tokenizer = load_model(builtin_model_path(model_spec))
    examples = get_task(task).train[:probe]
    settings = CardSettings(probe_size=probe)
    floor_seconds(model, tokenizer, probe, examples=examples)  # warm-up: peft's first attach, lazy kernels
    floor = floor_seconds(model, tokenizer, probe, examples=examples)
    made, seconds = [], []
    for _ in range(2):
        start = time.perf_counter()
        made.append(compute_card(model, tokenizer, examples, settings, model_spec))
        seconds.append(time.perf_counter() - start)
    n = made[0].num_layers
    rng = random.Random(0)
    sets = [tuple(range(n))] + [(i,) for i in range(n)] + [tuple(range(k, n)) for k in range(1, n)]
    sets += [tuple(sorted(rng.sample(range(n), rng.randint(1, n)))) for _ in range(seed_sets)]

    def fractions(card) -> list[float]:
        costs = shape_costs(card, Shape(card.settings.rank, tuple(card.module_types)))
        full = costs.step_seconds(range(n))
        return [costs.step_seconds(layers) / full for layers in sets]

    first, second = fractions(made[0]), fractions(made[1])
    top = tuple(range(n - n // 4, n))
    predicted_top = [top_quarter_prediction(card, top) for card in made]
    calibrations = [card.training_cost.calibration for card in made]
    return {
        "model": model_spec,
        "probe": probe,
        "floor_seconds": floor,
        "card_seconds": seconds,
        "card_over_floor": statistics.median(seconds) / floor,
        "step_error_p50": [c.step_error_p50 for c in calibrations],
        "step_error_p90": [c.step_error_p90 for c in calibrations],
        "memory_error_p90": [c.memory_error_p90 for c in calibrations],
        "calibration_steps": [c.measured_steps for c in calibrations],
        "calibration_seconds": [c.seconds for c in calibrations],
        "notes": [c.notes for c in calibrations],
        "placements_compared": len(sets),
        "plan_disagreement": max(abs(b / a - 1) for a, b in zip(first, second, strict=True)),
        "predicted_top_quarter": predicted_top,
    }


def top_quarter_prediction(card, top: tuple[int, ...]) -> dict:
    """What the planner predicts for adapting ``top``, as a fraction of full-layer LoRA's step: uncached, and
    cached as a 200-step run on the card's dataset would be (the pricing a plan uses)."""
    from layercard_service.control.planning.costs import Shape, shape_costs
    from layercard_service.control.planning.pricing import cache_run, price
    from layercard_service.domain.plans import PlanRequest

    costs = shape_costs(card, Shape(card.settings.rank, tuple(card.module_types)))
    request = PlanRequest(steps=200)
    priced = price(costs, top, cache_run(card, request), request)
    full = costs.step_seconds(range(card.num_layers))
    return {
        "uncached": costs.step_seconds(top) / full,
        "cached": priced.step_seconds / full if priced.cache is not None else None,
    }


def card_cost(model_spec: str, task: str, probe: int) -> dict:
    """The card's time against the floor (floor, card, floor after a warm-up of each), and its peak memory against
    one training step's, at ``probe`` examples."""
    from bench.card import card_seconds, floor_seconds, peak_memory
    from layercard_service.data.tasks import get_task
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model

    model, tokenizer = load_model(builtin_model_path(model_spec))
    examples = get_task(task).train[:probe]
    floor_seconds(model, tokenizer, 32, examples=examples[:32])  # warm-up
    floors = [floor_seconds(model, tokenizer, probe, examples=examples)]
    seconds, fit = card_seconds(model, tokenizer, probe, coupling=False, examples=examples)
    floors.append(floor_seconds(model, tokenizer, probe, examples=examples))
    del model
    card_peak, step_peak = peak_memory("card", probe, model_spec, task), peak_memory("step", probe, model_spec, task)
    floor = statistics.mean(floors)
    return {
        "model": model_spec,
        "probe": probe,
        "floor_seconds": floors,
        "card_seconds": seconds,
        "card_over_floor": seconds / floor,
        "phase_over_floor": {phase: value / floor for phase, value in fit["phase_seconds"].items()},
        "calibration": fit["calibration"],
        "peak_above_model_bytes": {"card": card_peak, "train_step": step_peak},
        "card_memory_over_train_step": card_peak / step_peak,
    }


# --- 3 and 4: steps above the lowest adapted block, on the real model -------------------------------------------
def step_fractions(rounds: int, batch_size: int) -> dict:
    """Median step seconds of full-layer LoRA and of the top quarter without / with the prefix cache, A B C A B C."""
    from layercard_service.data.encode import EncodeConfig, collate, encode_examples
    from layercard_service.data.tasks import get_task
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.head import training_loss
    from layercard_service.models.loading import load_model
    from layercard_service.trainer.lora import LoraSettings, attach_lora
    from layercard_service.trainer.prefix_cache import PrefixCacheSettings, build_prefix_cache

    path = builtin_model_path(REAL)
    _, tokenizer = load_model(path, "cpu")
    encoded = encode_examples(tokenizer, get_task(TASK).train[: 4 * batch_size], EncodeConfig())
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]

    def adapted(layers: tuple[int, ...] | None):
        model, _ = load_model(path, "cpu")
        torch.manual_seed(0)
        peft_model = attach_lora(model, LoraSettings(rank=8, alpha=16.0, layers=layers))
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return peft_model, torch.optim.AdamW(params, lr=1e-4)

    full, full_opt = adapted(None)
    blocks = full.get_base_model().config.num_hidden_layers
    top = tuple(range(blocks - blocks // 4, blocks))
    quarter, quarter_opt = adapted(top)
    forced = PrefixCacheSettings(only_when_it_pays=False)  # a few steps here: the job would not build it
    cache, report = build_prefix_cache(quarter, encoded, tokenizer.pad_token_id, batch_size, forced)
    if cache is None:
        raise RuntimeError(f"the prefix cache did not build on {REAL}: {report.reason}")

    def loss(model, batch, cached: bool):
        b = collate(batch, tokenizer.pad_token_id)
        args = (b["input_ids"], b["attention_mask"], b["labels"])
        if not cached:
            return training_loss(model, *args)
        with cache.feeding(batch, b["input_ids"].shape[1]):
            return training_loss(model, *args)

    def step(model, optimizer, batch, cached: bool) -> float:
        start = time.perf_counter()
        value = loss(model, batch, cached)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return time.perf_counter() - start

    # Exactness first, before any optimizer step moves the weights: the same batches, cached and not.
    with torch.no_grad():
        diffs = [abs(float(loss(quarter, b, True)) - float(loss(quarter, b, False))) for b in batches]
    runs = {
        "full_layer": (full, full_opt, False),
        "top_quarter_nocache": (quarter, quarter_opt, False),
        "top_quarter_cache": (quarter, quarter_opt, True),
    }
    for model, optimizer, cached in runs.values():  # warm-up
        step(model, optimizer, batches[0], cached)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        batch = batches[r % len(batches)]
        for name, (model, optimizer, cached) in runs.items():
            times[name].append(step(model, optimizer, batch, cached))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "top_layers": list(top),
        "batch": [batch_size, max(len(e.input_ids) for e in encoded)],
        "median_step_seconds": medians,
        "step_seconds": times,
        # The same step repeated on this machine: (slowest - fastest) / fastest, the noise a single-shot held-out
        # measurement carries.
        "repeat_spread": repeat_spread(times),
        "top_quarter_step_fraction_real": medians["top_quarter_cache"] / medians["full_layer"],
        "top_quarter_step_fraction_real_nocache": medians["top_quarter_nocache"] / medians["full_layer"],
        "prefix_cache_max_loss_diff": max(diffs),
        "prefix_cache": report.to_payload(),
    }


def repeat_spread(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: max(values) / min(values) - 1 for name, values in times.items()}


# --- 5: data parallel ---------------------------------------------------------------------------------------------
def data_parallel() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support as `support`
    from support.ddp import ddp_max_param_diff

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as work:
        start = time.perf_counter()
        diff = ddp_max_param_diff(Path(work))
        return {"ddp_max_param_diff": diff, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    command = "python -m bench.cost_model " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(torch=torch.__version__, transformers=version("transformers"), torch_threads=torch.get_num_threads())
    print("[cards] builtin:tiny, twice", flush=True)
    tiny = cards("builtin:tiny", "builtin:cipher", 64)
    print("[cards] the real model, twice", flush=True)
    real = cards(REAL, TASK, 32)
    print("[card cost] the real model at the default probe: time against the floor, peak memory", flush=True)
    cost = card_cost(REAL, TASK, CardSettings().probe_size)
    print("[steps] full-layer vs top quarter without / with the prefix cache, on the real model", flush=True)
    steps = step_fractions(args.rounds, args.batch_size)
    print("[ddp] 2 gloo processes vs 1", flush=True)
    ddp = data_parallel()
    headline = {
        "step_error_p90_tiny": max(tiny["step_error_p90"]),
        "step_error_p90_real": max(real["step_error_p90"]),
        "memory_error_p90_real": max(real["memory_error_p90"]),
        "recompute_plan_disagreement_real": real["plan_disagreement"],
        "card_over_floor_real": cost["card_over_floor"],
        "card_memory_over_train_step_real": cost["card_memory_over_train_step"],
        "top_quarter_step_fraction_real": steps["top_quarter_step_fraction_real"],
        "top_quarter_step_fraction_real_nocache": steps["top_quarter_step_fraction_real_nocache"],
        # The planner's prediction of the same two fractions (the first card), beside the measured ones.
        "predicted_top_quarter_step_fraction_real": real["predicted_top_quarter"][0]["cached"],
        "predicted_top_quarter_step_fraction_real_nocache": real["predicted_top_quarter"][0]["uncached"],
        "prefix_cache_max_loss_diff": steps["prefix_cache_max_loss_diff"],
        "ddp_max_param_diff": ddp["ddp_max_param_diff"],
    }
    result = {
        "benchmark": "cost_model",
        "command": command.strip(),
        "machine": info,
        "settings": vars(args),
        "headline": headline,
        "cards": {"tiny": tiny, "real": real},
        "card_cost_real": cost,
        "steps": steps,
        "data_parallel": ddp,
    }
    write_results("cost_model", result, report(result))
    return 0


def card_rows(cards: dict) -> list[str]:
    rows = []
    for c in cards.values():
        p90 = ", ".join(f"{e:.1%}" for e in c["step_error_p90"])
        rows += [
            f"| {c['model']}: held-out step-time error p90, two cards (8 random placements each) | {p90} |",
            f"| {c['model']}: held-out memory error p90 | {', '.join(f'{e:.1%}' for e in c['memory_error_p90'])} |",
            f"| {c['model']}: largest disagreement of the two cards' predicted step fractions "
            f"({c['placements_compared']} placements) | {c['plan_disagreement']:.1%} |",
            f"| {c['model']}: card time / floor (one LoRA fwd+bwd over the probe of {c['probe']}: "
            f"{c['floor_seconds']:.1f} s) | {c['card_over_floor']:.1f}x (calibration: "
            f"{c['calibration_steps'][0]} steps, {c['calibration_seconds'][0]:.1f} s) |",
        ]
    return rows


def cost_rows(c: dict) -> list[str]:
    phases = ", ".join(f"{phase} {value:.2f}" for phase, value in c["phase_over_floor"].items())
    card_mib, step_mib = (value / 2**20 for value in c["peak_above_model_bytes"].values())
    floor = statistics.mean(c["floor_seconds"])
    return [
        f"| {c['model']}, default probe of {c['probe']}: card time / floor ({floor:.1f} s)"
        f" | {c['card_over_floor']:.2f}x (by phase: {phases}) |",
        f"| {c['model']}: card peak memory / one training step's (above the loaded model) | "
        f"{c['card_memory_over_train_step']:.2f}x ({card_mib:.0f} / {step_mib:.0f} MiB) |",
    ]


def report(result: dict) -> str:
    h, steps, m = result["headline"], result["steps"], result["machine"]
    med = steps["median_step_seconds"]
    return "\n".join(
        [
            "# Cost model and cheaper training above the lowest adapted block",
            "",
            f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, torch {m['torch']}. "
            f"Command: `{result['command']}`.",
            "",
            "| figure | value |",
            "| --- | --- |",
            *card_rows(result["cards"]),
            *cost_rows(result["card_cost_real"]),
            f"| full-layer LoRA step on {REAL} (batch {steps['batch'][0]} x {steps['batch'][1]} tokens, head only "
            f"at labelled positions) | {med['full_layer']:.2f} s |",
            f"| top quarter (blocks {steps['top_layers'][0]}-{steps['top_layers'][-1]}), no cache / full-layer | "
            f"{h['top_quarter_step_fraction_real_nocache']:.2f} ({med['top_quarter_nocache']:.2f} s) |",
            f"| top quarter with the frozen-prefix cache / full-layer | {h['top_quarter_step_fraction_real']:.2f} "
            f"({med['top_quarter_cache']:.2f} s) |",
            f"| the same two fractions as the planner predicts them from the card, no cache / cache | "
            f"{h['predicted_top_quarter_step_fraction_real_nocache']:.2f} / "
            f"{h['predicted_top_quarter_step_fraction_real']:.2f} |",
            f"| the cache's build: {steps['prefix_cache']['examples']} examples | "
            f"{steps['prefix_cache']['build_seconds']:.2f} s, {steps['prefix_cache']['bytes'] / 2**20:.1f} MiB |",
            f"| largest cached vs uncached loss difference | {h['prefix_cache_max_loss_diff']:.2e} nats |",
            f"| data parallel: largest LoRA parameter difference, 2 gloo processes vs 1 | "
            f"{h['ddp_max_param_diff']:.2e} |",
            "",
            f"Medians of {result['settings']['rounds']} interleaved rounds (A B C A B C), after one warm-up step each. "
            "The same step repeated on this machine spans "
            + ", ".join(f"{name} {value:.0%}" for name, value in steps["repeat_spread"].items())
            + " (slowest over fastest): a held-out placement is measured once, so its error carries that noise.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
