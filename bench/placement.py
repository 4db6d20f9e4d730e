"""What is the cheapest way to (nearly) full-layer LoRA's quality? Time to quality, per placement rule (issue 16).

For each task and seed, on one model:
1. A Layer Card (seeded probe and adapter A, with coupling and, opt-in, the performance column of pilot runs),
   and the plain adapter-gradient norm per block.
2. Learning curves (bench/placement_curves.py): every rule of bench/placement_rules.py at every size k and
   learning rate of one small grid, each run up to ``--cap`` x full-layer LoRA's reference run in predicted
   time; a rule's figure is that of its best grid point, so the comparison is of rules, not tuning effort.
   Runs with the same layers and learning rate are trained once; the order of runs rotates with the seed.
3. Quality is content-sensitive (METHOD.md): content gain = prompt-blind floor - validation loss, as a fraction
   of full-layer LoRA's *converged* content gain (the mean of its best run's last three points); exact match
   beside it. Time to quality: the first time a rule's curve reaches 90% of that. Quality at 0.25, 0.5 and 0.75
   of full-layer LoRA's time to quality: the best any of the rule's runs reached by then.
4. Single-layer runs at equal steps: the ground truth for the per-block scores (Spearman).

    .venv/bin/python -m bench.placement   # both models' designs (PROFILES); bench/results/placement.{json,md,svg}
    .venv/bin/python -m bench.placement --model tiny --tasks cipher --seeds 0 --steps 40 --single-steps 10 \
        --points 4 --performance-steps 5   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from bench.common import write_results
from bench.placement_curves import CurveSpec, train_curve
from bench.placement_report import headline, plot, report, spearman, summarize
from bench.placement_rules import RANKED_RULES, gradient_norms, placement, rankings
from layercard_service.card_engine.engine import compute_card
from layercard_service.control.planning.costs import Shape, shape_costs
from layercard_service.control.planning.gains import SCORES, layer_scores
from layercard_service.control.planning.planner import plan_placement
from layercard_service.control.planning.pricing import cache_run, price
from layercard_service.data.tasks import get_task
from layercard_service.domain.card_codec import card_to_dict
from layercard_service.domain.cards import CardSettings
from layercard_service.domain.plans import PlanRequest
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.trainer.evaluate import evaluate

__all__ = ["main"]


# Each model's design: the defaults of every setting a command line leaves unset. The real model's is reduced to
# fit a 2-core machine: one task and seed, k = 4 only, no single-layer runs (its Spearman is against the card's
# pilot column), a short pilot and a smaller probe.
REAL_RULES = ("first_k", "last_k", "random_k", "activation_norm", "gradient_norm", "resnorm", "pilot")
PROFILES: dict[str, dict] = {
    "tiny": {
        "tasks": ["cipher", "lexicon"],
        "seeds": [0, 1],
        "steps": 320,
        "ks": [2, 4],
        "lrs": [3e-3],
        "rules": [*RANKED_RULES, "planner", "planner_prior"],
        "random_draws": 2,
        "points": 10,
        "single_steps": 150,
        "performance_steps": 50,
        "probe_size": 256,
        "validation": 0,
        "threads": 1,
    },
    "smollm2-135m": {
        "tasks": ["facts"],
        "seeds": [0],
        "steps": 60,
        "ks": [4],
        "lrs": [3e-3],
        "rules": [*REAL_RULES, "planner", "planner_prior"],
        "random_draws": 1,
        "points": 6,
        "single_steps": 0,
        "performance_steps": 4,
        "probe_size": 64,
        "validation": 0,
        "threads": 2,
    },
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="both", help="built-in model: tiny, smollm2-135m, or both (one after the other)")
    p.add_argument("--tasks", nargs="*")
    p.add_argument("--seeds", nargs="*", type=int)
    p.add_argument("--steps", type=int, help="full-layer LoRA's reference run, in steps")
    p.add_argument("--cap", type=float, default=1.0, help="every run's time, as a share of the reference run's")
    p.add_argument("--ks", nargs="*", type=int, help="placement sizes of the grid")
    p.add_argument("--lrs", nargs="*", type=float, help="learning rates of the grid")
    p.add_argument("--rules", nargs="*", help="the rules to run (and full)")
    p.add_argument("--random-draws", type=int)
    p.add_argument("--points", type=int, help="evaluations along each run")
    p.add_argument("--single-steps", type=int, help="steps of each single-layer run (0: none)")
    p.add_argument("--performance-steps", type=int, help="the card's pilot runs (0: no pilot rule)")
    p.add_argument("--probe-size", type=int, help="the card's probe examples")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="the card's batch too, so its step prices apply")
    p.add_argument("--validation", type=int, help="validation examples (0: the task's split)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="placement", help="name of the result files under bench/results")
    p.add_argument("--reuse", type=Path, help="take runs with the same layers and learning rate from this result")
    p.add_argument("--merge", nargs="*", type=Path, help="summarise these partial result files instead of running")
    return p.parse_args(argv)


def _for_model(args: argparse.Namespace, model: str) -> argparse.Namespace:
    """``args`` with the model's design filling every setting the command line left unset."""
    chosen = dict(vars(args), model=model)
    for key, value in PROFILES[model].items():
        if chosen.get(key) is None:
            chosen[key] = value
    return argparse.Namespace(**chosen)


class _Task:
    """A task with the validation split the bench evaluates on (a prefix of it with --validation)."""

    def __init__(self, name: str, validation: int) -> None:
        task = get_task(name)
        self.task_name, self.train = task.task_name, task.train
        self.validation = task.validation[:validation] if validation else task.validation
        self.floor_of = task.floor


def _reused(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    runs = {}
    for pair in json.loads(path.read_text())["pairs"]:
        for run in pair["runs"].values():
            runs[(pair["task"], pair["seed"], str(run["layers"]), run["learning_rate"])] = run
    return runs


def run_pair(task_name: str, seed: int, args: argparse.Namespace, reused: dict) -> dict:
    task = _Task(task_name, args.validation)
    path = builtin_model_path(args.model)
    model, tokenizer = load_model(path)
    floor = task.floor_of(tokenizer).floor_nats_per_token
    settings = CardSettings(
        probe_size=args.probe_size,
        rank=args.rank,
        compute_coupling=True,
        compute_performance=args.performance_steps > 0,
        performance_steps=max(1, args.performance_steps),
        batch_size=args.batch_size,
        seed=seed,
    )
    phases: dict[str, float] = {}
    card = compute_card(
        model, tokenizer, task.train, settings, task.task_name, lambda phase, *_: phases.setdefault(phase, time.time())
    )
    pilot_seconds = phases["done"] - phases["performance"] if "performance" in phases else 0.0
    L, modules = card.num_layers, tuple(card.module_types)
    grads = gradient_norms(load_model(path)[0], tokenizer, task.train[: settings.probe_size], args.rank, modules, seed)
    costs = shape_costs(card, Shape(args.rank, modules))
    request = PlanRequest(steps=args.steps, train_examples=len(task.train), batch_size=args.batch_size)
    cache = cache_run(card, request)

    def priced(layers: tuple[int, ...] | None) -> tuple[float, float]:
        p = price(costs, range(L) if layers is None else layers, cache, request)
        return p.step_seconds, p.cache.build_seconds if p.cache is not None else 0.0

    full_step = priced(None)[0]
    cap_seconds = args.cap * args.steps * full_step
    print(f"[{task_name} seed {seed}] card done in {card.compute_seconds:.0f} s; cap {cap_seconds:.1f} s", flush=True)

    # The rules' placements: (rule, layers) for every k; the planner picks its own.
    rng = random.Random(f"{task_name}-{seed}")
    orders = rankings(card, grads, args.rank, rng, args.random_draws)
    chosen: dict[str, list[tuple[int, ...] | None]] = {"full": [None]}
    for rule in (r for r in args.rules if r in orders):
        for i, order in enumerate(orders[rule] or [None]):
            name = f"{rule}#{i}" if rule == "random_k" else rule  # each random draw is scored on its own
            chosen[name] = [placement(rule, order, k, L) for k in args.ks]
    # The planner as a user calls it: least training time to 90% of full-layer LoRA's gain; on the card's pilot
    # curves ("planner"), and on the card without them (its prior curve: "planner_prior").
    goal = PlanRequest(
        objective="efficiency",
        target_gain_fraction=0.9,
        steps=args.steps,
        train_examples=len(task.train),
        batch_size=args.batch_size,
    )
    plans = {}
    no_pilots = dataclasses.replace(card, layers=[dataclasses.replace(r, measured_gain_curve=[]) for r in card.layers])
    for rule, source in (("planner", card), ("planner_prior", no_pilots)):
        if rule in args.rules:
            plans[rule] = plan_placement(source, goal)
            chosen[rule] = [plans[rule].layers if len(plans[rule].layers) < L else None]

    jobs = sorted({(layers, lr) for sets in chosen.values() for layers in sets for lr in args.lrs}, key=str)
    shift = seed % len(jobs)
    runs: dict[str, dict] = {}
    for layers, lr in jobs[shift:] + jobs[:shift]:
        key = f"{list(layers) if layers is not None else 'all'}@{lr:g}"
        old = reused.get((task.task_name, seed, str(list(layers) if layers is not None else "all"), lr))
        if old is not None:
            runs[key] = old
            continue
        step, build = priced(layers)
        spec = CurveSpec(layers, lr, args.rank, modules, step, build, cap_seconds, args.points, args.batch_size, seed)
        runs[key] = train_curve(path, task, spec, floor)
        last = runs[key]["points"][-1]
        print(
            f"[{task_name} seed {seed}] {key:<28} {spec.steps} steps, content {last['content_gain_nats']:+.3f}, "
            f"EM {last['exact_match']:.3f}, {last['measured_seconds']:.1f} s measured",
            flush=True,
        )

    single, measured_by = [], "single-layer runs"
    if args.single_steps:
        base = evaluate(load_model(path)[0], tokenizer, task.validation, with_exact_match=False).loss
        for layer in range(L):
            spec = CurveSpec((layer,), args.lrs[0], args.rank, modules, 1.0, 0.0, args.single_steps, 1, 16, seed)
            curve = train_curve(path, task, spec, floor, exact_match=False)
            single.append(base - curve["points"][-1]["loss"])
    scores = {s: layer_scores(card, s, modules, args.rank) for s in SCORES}
    extra = {"activation_norm": [r.activation_energy for r in card.layers], "gradient_norm": grads}
    if all(r.measured_gain is not None for r in card.layers):
        extra["pilot"] = [r.measured_gain or 0.0 for r in card.layers]
    if not single and "pilot" in extra:  # no single-layer runs (a deep model): the pilot column is the measurement
        single, measured_by = extra.pop("pilot"), f"the card's pilot column ({args.performance_steps} steps per layer)"
    correlations = {}
    if single:
        correlations = {name: spearman(list(v), single) for name, v in {**scores, **extra}.items()}
        correlations["depth"] = spearman([-float(i) for i in range(L)], single)
    return {
        "model": args.model,
        "task": task.task_name,
        "seed": seed,
        "floor": floor,
        "num_layers": L,
        "probe_loss": card.probe_loss,
        "card_seconds": card.compute_seconds,
        "card": card_to_dict(card),
        "rules": {rule: [list(s) if s is not None else "all" for s in sets] for rule, sets in chosen.items()},
        "pilot_seconds": pilot_seconds,
        "plans": {
            rule: {
                "layers": list(p.layers),
                "steps": p.steps,
                "predicted_gain": p.predicted_gain.value,
                "predicted_gain_share": p.predicted_gain_share,
                "learning_rate": p.learning_rate,
                "predicted_curve": [dataclasses.asdict(point) for point in p.predicted_curve],
                "rationale": p.rationale,
            }
            for rule, p in plans.items()
        },
        "single_layer_measured_by": measured_by,
        "full_step_seconds_predicted": full_step,
        "cap_seconds_predicted": cap_seconds,
        "single_layer_gains": single,
        "card_scores": {**scores, **extra},
        "spearman": correlations,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    models = list(PROFILES) if args.model == "both" else [args.model]
    started = time.time()
    command = "python -m bench.placement " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"
    )
    if args.merge:
        partial = [json.loads(path.read_text()) for path in args.merge]
        pairs = [pair for part in partial for pair in part["pairs"]]
        started -= sum(part["seconds"] for part in partial)
        command = "; ".join(part["command"] for part in partial) + "; then " + command
        settings = {part["command"]: part["settings"] for part in partial}
        machine = f"{partial[0]['machine']}; {len(partial)} runs"
    else:
        reused = _reused(args.reuse)
        pairs = []
        settings = {}
        for model in models:
            design = _for_model(args, model)
            settings[model] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(design).items() if k != "merge"}
            torch.set_num_threads(design.threads)
            for seed in design.seeds:
                for t in design.tasks:
                    pairs.append(run_pair(t, seed, design, reused))
                    _write(args.out, pairs, command, machine, settings, started)  # a stopped run keeps its pairs
    _write(args.out, pairs, command, machine, settings, started)
    return 0


def _write(out: str, pairs: list[dict], command: str, machine: str, settings: dict, started: float) -> None:
    summary = summarize(pairs)
    result = {
        "benchmark": "placement",
        "command": command,
        "machine": machine,
        "settings": settings,
        "headline": headline(summary),
        "summary": summary,
        "pairs": pairs,
        "seconds": time.time() - started,
    }
    write_results(out, result, report(result))
    plot(result, out)


if __name__ == "__main__":
    sys.exit(main())
