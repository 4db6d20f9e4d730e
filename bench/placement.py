"""Does the planner's placement beat the baselines at equal training time? (issue 4, METHOD.md)

For every built-in task and several seeds, on the built-in model:
1. A Layer Card (seeded probe and adapter A) with coupling.
2. Single-layer runs: LoRA on one block at a time for a fixed number of steps; the measured gain is the drop
   of validation loss below the base model's. Spearman of the card's per-layer scores, and of depth alone
   (shallower first), with the measured gains.
3. Placements at a training-time budget of half of full-layer LoRA's (full-layer: ``--steps`` steps). Every
   placement gets the steps that fit the budget by the card's cost model (one basis for all, so the
   comparison does not move with the machine's noise); its measured wall time is reported beside.
   - the planner's placement (objective accuracy, budget max_training_time) for each card score;
   - full-layer LoRA at equal time (half the steps);
   - the same planner fed a depth-only prior (no card information): "ranking by depth alone";
   - random-k, first-k, last-k, uniform-k with the planner's k.
   Quality is content-sensitive: exact-match, and content gain = (floor - loss) / (floor - full-layer loss),
   with floor the task's prompt-blind floor (METHOD.md: a loss gain can be mere answer format).
Runs rotate their order from seed to seed (A B C, B C A, ...) so slow drift of the machine spreads evenly.

    .venv/bin/python -m bench.placement                      # writes bench/results/placement.json and .md
    .venv/bin/python -m bench.placement --tasks cipher --seeds 0 --steps 40 --single-steps 10   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import write_results
from layercard_service.card_engine.engine import compute_card
from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.gains import SCORES, layer_scores
from layercard_service.control.planning.planner import plan_placement
from layercard_service.data.tasks import get_task
from layercard_service.domain.cards import CardSettings, LayerCardData
from layercard_service.domain.plans import BudgetSpec, PlanRequest
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.trainer.evaluate import evaluate
from layercard_service.trainer.lora import ALL_LINEAR_MODULES, LoraSettings, TrainConfig, attach_lora, train_lora

PLANNED_SCORES = ("resnorm", "stream_normalized")  # split_half ranks like resnorm here (reported in Spearman)
HEADLINE_SCORE = "resnorm"  # the planner's default score (control/planning/gains.py DEFAULT_SCORE)
BASELINES = ("full_equal_time", "depth_prior", "random_k", "first_k", "last_k", "uniform_k")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="*", default=["cipher", "lexicon", "reverse"])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="full-layer LoRA's steps (the reference)")
    p.add_argument("--single-steps", type=int, default=200, help="steps of each single-layer run")
    p.add_argument("--budget-fraction", type=float, default=0.5, help="of full-layer LoRA's training time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="placement", help="name of the result files under bench/results")
    p.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        help="summarise the pairs of these partial result files (e.g. one process per seed) instead of running",
    )
    return p.parse_args(argv)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def depth_prior_card(card: LayerCardData) -> LayerCardData:
    """The same card with its gain columns replaced by a prior that knows only depth: shallower is better,
    linearly, with the card's total Res² (so the planner trades gain for time at the same scale)."""
    L = card.num_layers
    total = sum(m.resnorm_sq for row in card.layers for m in row.modules)
    weights = [(L - i) / (L * (L + 1) / 2) for i in range(L)]
    rows = []
    for row, w in zip(card.layers, weights):
        share = total * w / len(row.modules)
        modules = [dataclasses.replace(m, resnorm_sq=share, resnorm_sq_split_half=share) for m in row.modules]
        rows.append(dataclasses.replace(row, modules=modules, resnorm_sq=total * w, predicted_gain=total * w / 2))
    return dataclasses.replace(card, layers=rows, coupling=None)


def baseline_layers(name: str, k: int, num_layers: int, rng: random.Random) -> tuple[int, ...]:
    if name == "first_k":
        return tuple(range(k))
    if name == "last_k":
        return tuple(range(num_layers - k, num_layers))
    if name == "uniform_k":  # evenly spaced, centred
        return tuple(sorted({int((i + 0.5) * num_layers / k) for i in range(k)}))
    if name == "random_k":
        return tuple(sorted(rng.sample(range(num_layers), k)))
    raise ValueError(name)


class Runner:
    """Trains LoRA on given layers for given steps from a fresh base model, and evaluates it."""

    def __init__(self, task, args: argparse.Namespace) -> None:
        self.task, self.args = task, args
        self.path = builtin_model_path("tiny")
        _, self.tokenizer = load_model(self.path)
        self.floor = task.floor(self.tokenizer).floor_nats_per_token

    def run(self, layers: tuple[int, ...] | None, steps: int, seed: int, exact_match: bool = True) -> dict:
        model, tokenizer = load_model(self.path)
        lora = LoraSettings(
            rank=self.args.rank, alpha=2.0 * self.args.rank, target_modules=ALL_LINEAR_MODULES, layers=layers
        )
        peft_model = attach_lora(model, lora)
        config = TrainConfig(
            steps=steps,
            batch_size=self.args.batch_size,
            learning_rate=self.args.lr,
            warmup_steps=min(20, steps // 10),
            seed=seed,
        )
        result = train_lora(peft_model, tokenizer, self.task.train, config)
        ev = evaluate(peft_model, tokenizer, self.task.validation, with_exact_match=exact_match)
        return {
            "layers": list(layers) if layers is not None else "all",
            "steps": steps,
            "train_seconds": result.total_seconds,
            "loss": ev.loss,
            "exact_match": ev.exact_match,
            "content_gain_nats": self.floor - ev.loss,
        }

    def base_loss(self) -> float:
        model, tokenizer = load_model(self.path)
        return evaluate(model, tokenizer, self.task.validation, with_exact_match=False).loss


def run_pair(task_name: str, seed: int, args: argparse.Namespace) -> dict:
    task = get_task(task_name)
    runner = Runner(task, args)
    model, tokenizer = load_model(runner.path)
    settings = CardSettings(rank=args.rank, compute_coupling=True, seed=seed)
    card = compute_card(model, tokenizer, task.train, settings, task.task_name)
    L = card.num_layers
    costs = shape_costs(card, Shape(args.rank, tuple(card.module_types)))
    full_step = costs.step_seconds(range(L))
    budget_seconds = args.budget_fraction * args.steps * full_step  # predicted seconds, the planner's basis
    base_loss = runner.base_loss()
    print(f"[{task_name} seed {seed}] card done; budget {budget_seconds:.1f} s predicted", flush=True)

    # Single-layer runs (equal steps): the ground truth for the per-layer scores.
    single = []
    for layer in range(L):
        r = runner.run((layer,), args.single_steps, seed, exact_match=False)
        r["gain"] = base_loss - r["loss"]
        single.append(r)
    measured = [r["gain"] for r in single]
    scores = {s: layer_scores(card, s, card.module_types, args.rank) for s in SCORES}
    correlations = {s: spearman(scores[s], measured) for s in SCORES}
    correlations["depth"] = spearman([-float(i) for i in range(L)], measured)
    print(f"[{task_name} seed {seed}] single-layer gains {[round(g, 3) for g in measured]} {correlations}", flush=True)

    def plan(c: LayerCardData, score: str):
        request = PlanRequest(budget=BudgetSpec(max_training_seconds=budget_seconds), steps=args.steps, score=score)
        return plan_placement(c, request)

    plans = {f"card_{score}": plan(card, score) for score in PLANNED_SCORES}
    plans["depth_prior"] = plan(depth_prior_card(card), "resnorm")
    k = len(plans[f"card_{HEADLINE_SCORE}"].layers)
    rng = random.Random(f"{task_name}-{seed}")
    placements: dict[str, tuple[int, ...] | None] = {name: p.layers for name, p in plans.items()}
    for name in ("random_k", "first_k", "last_k", "uniform_k"):
        placements[name] = baseline_layers(name, k, L, rng)
    placements["full_equal_time"] = None

    def steps_for(layers: tuple[int, ...] | None) -> int:
        step = full_step if layers is None else costs.step_seconds(layers)
        return max(1, int(budget_seconds // step))

    jobs = [("full", None, args.steps)] + [(n, lay, steps_for(lay)) for n, lay in placements.items()]
    shift = seed % len(jobs)
    runs = {}
    for name, layers, steps in jobs[shift:] + jobs[:shift]:
        runs[name] = runner.run(layers, steps, seed)
        print(
            f"[{task_name} seed {seed}] {name:<24} layers {runs[name]['layers']} steps {steps} "
            f"loss {runs[name]['loss']:.3f} EM {runs[name]['exact_match']:.3f} "
            f"{runs[name]['train_seconds']:.1f}s",
            flush=True,
        )
    full = runs["full"]
    for r in runs.values():
        r["content_gain_fraction_of_full"] = r["content_gain_nats"] / full["content_gain_nats"]
        r["em_fraction_of_full"] = r["exact_match"] / full["exact_match"] if full["exact_match"] else None
        r["time_fraction_of_full"] = r["train_seconds"] / full["train_seconds"]
        r["predicted_time_fraction_of_full"] = (
            r["steps"] * (full_step if r["layers"] == "all" else costs.step_seconds(r["layers"]))
        ) / (args.steps * full_step)
    return {
        "task": task.task_name,
        "seed": seed,
        "floor": runner.floor,
        "base_loss": base_loss,
        "card_scores": scores,
        "single_layer": single,
        "spearman": correlations,
        "plans": {
            n: {
                "layers": list(p.layers),
                "steps": p.steps,
                "predicted_gain_share": p.predicted_gain_share,
                "rationale": p.rationale,
            }
            for n, p in plans.items()
        },
        "runs": runs,
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _spread(values: list[float]) -> dict:
    return {
        "mean": _mean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(pairs: list[dict]) -> dict:
    summary: dict = {"placements": {}, "beats": {}}
    names = list(pairs[0]["runs"])
    for name in names:
        runs = [p["runs"][name] for p in pairs]
        summary["placements"][name] = {
            "content_gain_fraction_of_full": _spread([r["content_gain_fraction_of_full"] for r in runs]),
            "em_fraction_of_full": _spread([r["em_fraction_of_full"] or 0.0 for r in runs]),
            "exact_match": _spread([r["exact_match"] for r in runs]),
            "time_fraction_of_full": _spread([r["time_fraction_of_full"] for r in runs]),
            "predicted_time_fraction_of_full": _spread([r["predicted_time_fraction_of_full"] for r in runs]),
        }
    for score in PLANNED_SCORES:
        card = f"card_{score}"
        summary["beats"][card] = {
            base: {
                "content": _mean(
                    [float(p["runs"][card]["content_gain_nats"] > p["runs"][base]["content_gain_nats"]) for p in pairs]
                ),
                "ties": _mean([float(p["runs"][card]["layers"] == p["runs"][base]["layers"]) for p in pairs]),
            }
            for base in BASELINES
        }
    summary["spearman"] = {s: _spread([p["spearman"][s] for p in pairs]) for s in (*SCORES, "depth")}
    return summary


def headline(summary: dict) -> dict:
    def figures(score: str) -> dict:
        card = summary["placements"][f"card_{score}"]
        beats = summary["beats"][f"card_{score}"]
        return {
            "card_content_gain_fraction_of_full": card["content_gain_fraction_of_full"]["mean"],
            "card_em_fraction_of_full": card["em_fraction_of_full"]["mean"],
            "card_time_fraction_of_full": card["time_fraction_of_full"]["mean"],
            "card_beats_random_fraction": beats["random_k"]["content"],
            "card_beats_depth_fraction": beats["depth_prior"]["content"],
            "spearman_predicted_vs_measured": summary["spearman"][score]["mean"],
        }

    head = figures(HEADLINE_SCORE)
    head["spearman_depth_vs_measured"] = summary["spearman"]["depth"]["mean"]
    for score in PLANNED_SCORES:
        if score != HEADLINE_SCORE:
            head.update({f"{score}_{k}": v for k, v in figures(score).items()})
    full_eq = summary["placements"]["full_equal_time"]
    head["full_equal_time_content_gain_fraction_of_full"] = full_eq["content_gain_fraction_of_full"]["mean"]
    return head


def report(result: dict) -> str:
    s, h = result["summary"], result["headline"]
    lines = [
        "# Placement at equal training time",
        "",
        f"Machine: {result['machine']}. Settings: {result['settings']}.",
        f"Command: `{result['command']}`",
        "",
        "## Headline",
        "",
        *[f"- {k}: {v:.3f}" for k, v in h.items()],
        "",
        "## Placements (mean ± stdev over task x seed; fractions of full-layer LoRA at full time)",
        "",
        "| placement | content gain | EM fraction | EM | time (measured) | time (predicted) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in s["placements"].items():

        def f(key: str, p: dict = p) -> str:
            return f"{p[key]['mean']:.3f} ± {p[key]['stdev']:.3f}"

        lines.append(
            f"| {name} | {f('content_gain_fraction_of_full')} | {f('em_fraction_of_full')} | "
            f"{f('exact_match')} | {f('time_fraction_of_full')} | {f('predicted_time_fraction_of_full')} |"
        )
    lines += ["", "## Card placement beats baseline (share of task x seed pairs, content gain; ties = same layers)", ""]
    for card, beats in s["beats"].items():
        lines.append(
            f"- {card}: " + ", ".join(f"{b} {v['content']:.2f} (same layers {v['ties']:.2f})" for b, v in beats.items())
        )
    lines += ["", "## Spearman with measured single-layer gain (mean ± stdev over task x seed)", ""]
    lines += [f"- {k}: {v['mean']:+.3f} ± {v['stdev']:.3f}" for k, v in s["spearman"].items()]
    lines += ["", "## Per task and seed", ""]
    for p in result["pairs"]:
        lines.append(f"### {p['task']} seed {p['seed']} (floor {p['floor']:.3f}, base {p['base_loss']:.3f})")
        lines.append("single-layer gains: " + ", ".join(f"{r['gain']:.3f}" for r in p["single_layer"]))
        for name, r in p["runs"].items():
            lines.append(
                f"- {name}: layers {r['layers']}, {r['steps']} steps, loss {r['loss']:.3f}, "
                f"EM {r['exact_match']:.3f}, content {r['content_gain_fraction_of_full']:.3f}, "
                f"time {r['time_fraction_of_full']:.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    command = "python -m bench.placement " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    if args.merge:
        partial = [json.loads(path.read_text()) for path in args.merge]
        pairs = [pair for part in partial for pair in part["pairs"]]
        started -= sum(part["seconds"] for part in partial)
        command = "; ".join(part["command"] for part in partial) + "; then " + command
        settings = {**partial[0]["settings"], "seeds": sorted({p["seed"] for p in pairs})}
        machine = f"{partial[0]['machine']}; {len(partial)} processes side by side"
    else:
        pairs = [run_pair(t, seed, args) for seed in args.seeds for t in args.tasks]
    summary = summarize(pairs)
    result = {
        "benchmark": "placement",
        "command": command,
        "machine": machine,
        "settings": settings,
        "headline": {},
        "summary": summary,
        "pairs": pairs,
        "seconds": time.time() - started,
    }
    result["headline"] = headline(summary)
    write_results(args.out, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
