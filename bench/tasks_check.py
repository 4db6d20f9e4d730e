"""Do the built-in tasks have learnable content? The check behind every placement benchmark.

For each built-in task on the built-in model: the base model's validation loss and exact-match, the
task's prompt-blind floor and chance exact-match, then full-layer LoRA (every linear module of every block)
trained for a fixed number of steps, and its validation loss and exact-match. A task passes when

- the base model is at chance (exact-match <= BASE_EM_MAX): it cannot already do the task;
- full-layer LoRA reaches exact-match >= LORA_EM_MIN: it learned the content, not just the format;
- its loss is at most LOSS_OVER_FLOOR_MAX x the floor: a prompt-blind predictor cannot get there.

Why 0.6 and not lower: the built-in model's final norm and output layer stay frozen under LoRA, which caps
how peaked its next-token distribution can get on these answer tokens. Measured on the cipher at
exact-match 1.0, the right letter gets p ~ 0.36 on average while the second-best token gets ~ 0.02: the
rest of the mass is spread thinly over the whole vocabulary. A per-token loss near 1 nat is therefore
what *complete* learning looks like here, and loss / floor settles around 0.25-0.55 depending on how many
answer tokens carry the entropy.

``content_gain_nats`` = floor - loss: how far below the best prompt-blind loss the adapter got, which is
what reading the prompt bought. Placements are later scored against this full-layer figure
(content gain = (floor - loss) / (floor - full), METHOD.md).

    PYTHONPATH=service .venv/bin/python bench/tasks_check.py            # writes bench/results/tasks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layercard_service.data.tasks import get_task, list_tasks
from layercard_service.models.builtin import builtin_model_path
from layercard_service.trainer.evaluate import evaluate
from layercard_service.trainer.lora import ALL_LINEAR_MODULES, LoraSettings, TrainConfig, attach_lora, train_lora

BASE_EM_MAX = 0.05
LORA_EM_MIN = 0.5
LOSS_OVER_FLOOR_MAX = 0.6


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny", help="builtin:<name> or a model directory")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: every built-in task)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "tasks.json")
    return p.parse_args(argv)


def _load(model_spec: str) -> tuple[torch.nn.Module, object]:
    path = builtin_model_path(model_spec) if model_spec.startswith("builtin:") else Path(model_spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


def check_task(name: str, args: argparse.Namespace) -> dict:
    task = get_task(name)
    model, tokenizer = _load(args.model)  # a fresh base model per task
    floor = task.floor(tokenizer)
    t0 = time.perf_counter()
    base = evaluate(model, tokenizer, task.validation)
    eval_seconds = time.perf_counter() - t0

    lora = LoraSettings(rank=args.rank, alpha=args.alpha, target_modules=ALL_LINEAR_MODULES, layers=None)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup, seed=args.seed
    )
    peft_model = attach_lora(model, lora)
    log_every = max(1, args.steps // 6)
    result = train_lora(
        peft_model,
        tokenizer,
        task.train,
        config,
        on_step=lambda m: (
            print(f"  [{name}] step {m.step:4d} loss {m.loss:.3f}", flush=True) if m.step % log_every == 0 else None
        ),
    )
    tuned = evaluate(peft_model, tokenizer, task.validation)

    record = {
        "task": task.task_name,
        "description": task.description,
        "n_train": len(task.train),
        "n_validation": len(task.validation),
        "floor_nats_per_token": floor.floor_nats_per_token,
        "completion_entropy_nats": floor.entropy_nats,
        "mean_completion_tokens": floor.mean_completion_tokens,
        "chance_exact_match": floor.chance_exact_match,
        "base": {"loss": base.loss, "exact_match": base.exact_match, "eval_seconds": eval_seconds},
        "full_lora": {
            "loss": tuned.loss,
            "exact_match": tuned.exact_match,
            "content_gain_nats": floor.floor_nats_per_token - tuned.loss,
            "loss_over_floor": tuned.loss / floor.floor_nats_per_token,
            "train_seconds": result.total_seconds,
            "median_step_seconds": statistics.median(s.seconds for s in result.steps),
            "steps": len(result.steps),
            "trainable_parameters": result.trainable_parameters,
            "first_train_loss": result.losses[0],
            "last_train_loss_mean10": sum(result.losses[-10:]) / len(result.losses[-10:]),
        },
    }
    record["passes"] = bool(
        base.exact_match <= BASE_EM_MAX
        and tuned.exact_match >= LORA_EM_MIN
        and tuned.loss <= LOSS_OVER_FLOOR_MAX * floor.floor_nats_per_token
    )
    return record


def _table(records: list[dict]) -> str:
    head = (
        f"{'task':<18}{'floor':>7}{'chance':>9}{'base loss':>10}{'base EM':>8}"
        f"{'LoRA loss':>10}{'LoRA EM':>8}{'L/floor':>8}{'gain':>7}{'train s':>8}{'steps':>6}  pass"
    )
    rows = [head, "-" * len(head)]
    for r in records:
        b, f = r["base"], r["full_lora"]
        rows.append(
            f"{r['task']:<18}{r['floor_nats_per_token']:>7.3f}{r['chance_exact_match']:>9.1e}"
            f"{b['loss']:>10.3f}{b['exact_match']:>8.3f}{f['loss']:>10.3f}{f['exact_match']:>8.3f}"
            f"{f['loss_over_floor']:>8.3f}{f['content_gain_nats']:>7.3f}{f['train_seconds']:>8.1f}{f['steps']:>6}  "
            f"{'yes' if r['passes'] else 'NO'}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    names = args.tasks or [t.name for t in list_tasks()]
    records = []
    for name in names:
        print(f"{name}: training full-layer LoRA for {args.steps} steps", flush=True)
        records.append(check_task(name, args))
    fl = [r["full_lora"] for r in records]
    report = {
        "headline": {
            "tasks": len(records),
            "tasks_passing": sum(r["passes"] for r in records),
            "max_base_exact_match": max(r["base"]["exact_match"] for r in records),
            "min_full_lora_exact_match": min(f["exact_match"] for f in fl),
            "max_full_lora_loss_over_floor": max(f["loss_over_floor"] for f in fl),
            "min_content_gain_nats": min(f["content_gain_nats"] for f in fl),
            "max_train_seconds": max(f["train_seconds"] for f in fl),
        },
        "criteria": {
            "base_em_max": BASE_EM_MAX,
            "lora_em_min": LORA_EM_MIN,
            "loss_over_floor_max": LOSS_OVER_FLOOR_MAX,
        },
        "settings": {
            "model": args.model,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "rank": args.rank,
            "alpha": args.alpha,
            "seed": args.seed,
            "target_modules": list(ALL_LINEAR_MODULES),
            "layers": "all",
            "threads": args.threads,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "tasks": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(_table(records))
    print(f"\nwrote {args.out}")
    return 0 if report["headline"]["tasks_passing"] == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
