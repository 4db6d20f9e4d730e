"""bench.serving's pools phase: do budgeted plans deploy within their budget on two real vLLM pools?

A second vLLM server is started with ``--lora-target-modules o_proj`` (the "lean" pool) beside bench.serving's
server, which wraps every module (the "full" pool), and a fresh layercard server is given both as pools. Each
pool is calibrated as a fleet in service is: ``CALIBRATION_DEPLOYS`` deploys of a rank-8 adapter to it, each with
its latency probe. A Layer Card of the built-in model is computed, and for each budget of a grid around the two
pools' measured overheads a plan is made (PlanPlacement, a vLLM serving budget); an adapter of the plan's shape
(its layers, modules, rank) is trained for a few steps and deployed with the budget to the pool the plan names,
with a fresh latency probe (``full_latency_probe``) and ``force``, so that an adapter over budget is measured
rather than refused. The share of plans whose deployed adapter measured within its budget is the headline.
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import time
from pathlib import Path

import grpc
import torch

from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    common_pb2,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
)
from layercard_service.config import ServiceConfig
from layercard_service.data.jsonl import Example
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.persistence.jobs import JobStore
from layercard_service.serving.pool_spec import PoolSpec
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings
from layercard_service.trainer.artifact import stage_adapter
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

__all__ = ["pools_phase", "pools_report"]

MODEL = "builtin:tiny"
TASK = "builtin:cipher"
CALIBRATION_DEPLOYS = 3  # per pool: what makes a shape calibrated (the service's default min probes)
# Budgets as multiples of the pools' measured overheads: around the lean pool's, between the two, above the full's.
LEAN_MULTIPLES, FULL_MULTIPLES = (1.5, 2.0, 3.0), (1.25, 1.5)


def _adapter(layers: tuple[int, ...], modules: tuple[str, ...], rank: int, steps: int = 20):
    """A LoRA of this shape, trained a few steps so it changes the output (its latency is the shape's)."""
    model, tokenizer = load_model(builtin_model_path("tiny"))
    torch.manual_seed(0)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=modules, layers=layers)
    peft_model = attach_lora(model, settings)
    examples = [Example(prompt=f"word {i}:", completion=" zebra") for i in range(32)]
    train_lora(peft_model, tokenizer, examples, TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2, seed=0))
    return peft_model


def _publish(data_dir: Path, adapter_id: str, peft_model, shape: dict, pool: str, max_rank: int) -> int:
    """Publishes ``peft_model`` as the adapter's next version, its placement naming the plan's pool."""
    db_path = data_dir / "state.db"
    JobStore(db_path).close()
    metadata = {"model": MODEL, "placement": {**shape, "serving_pool": pool}}
    staged = stage_adapter(peft_model, data_dir / "artifacts", adapter_id, "bench-job", max_rank)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        version = staged.publish(db, metadata).version
        db.execute("COMMIT")
    return version


def pools_phase(full_url: str, work: Path, max_rank: int, service_thread, quick: bool) -> dict:
    """Runs the phase against ``full_url`` (the full pool) and a lean vLLM started here; ``service_thread`` is
    bench.serving's ServiceThread."""
    lean = VllmProcess(
        VllmServerSettings(
            model=builtin_model_path("tiny"),
            served_model_name="builtin-tiny",
            port=0,
            max_loras=4,
            max_lora_rank=max_rank,
            lora_target_modules=("o_proj",),
            max_model_len=512,
            log_path=work / "vllm-lean.log",
        )
    )
    lean.start()
    data_dir = work / "pools-state"
    try:
        lean.wait_ready()
        config = ServiceConfig(
            port=0,
            log_format="text",
            data_dir=data_dir,
            vllm_pools=(
                PoolSpec("lean", (lean.url,), target_modules=("o_proj",), max_lora_rank=max_rank),
                PoolSpec("full", (full_url,), max_lora_rank=max_rank),
            ),
            vllm_model=MODEL,
            max_lora_rank=max_rank,
        )
        with service_thread(config) as service, grpc.insecure_channel(service.address) as channel:
            return _measure(channel, data_dir, max_rank, quick)
    finally:
        lean.stop()


def _measure(channel, data_dir: Path, max_rank: int, quick: bool) -> dict:
    adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
    deploys = 1 if quick else CALIBRATION_DEPLOYS
    calibration_shape = {"layers": [6, 7], "rank": 8, "alpha": 16.0, "target_modules": ["o_proj"]}
    word = _adapter((6, 7), ("o_proj",), 8)
    calibration: dict[str, list[float]] = {"full": [], "lean": []}
    for pool in ("full", "lean"):  # a new version each time: every deploy of it loads and probes
        for _ in range(deploys):
            version = _publish(data_dir, "calibration", word, calibration_shape, "", max_rank)
            d = adapters.DeployAdapter(
                adapter_pb2.DeployAdapterRequest(
                    adapter="adapters/calibration", version=version, pool=pool, full_latency_probe=True
                ),
                timeout=300,
            )
            calibration[pool].append(d.latency.overhead_fraction)
    adapters.UndeployAdapter(adapter_pb2.UndeployAdapterRequest(adapter="adapters/calibration"), timeout=120)
    lean_m, full_m = (statistics.median(calibration[p]) for p in ("lean", "full"))

    cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
    request = layer_card_pb2.ComputeLayerCardRequest(
        model=MODEL, dataset=common_pb2.DatasetSource(builtin=TASK), probe_size=16
    )
    card = next(e.card for e in cards.ComputeLayerCard(request, timeout=900) if e.HasField("card"))
    planner = placement_pb2_grpc.PlacementServiceStub(channel)
    budgets = [lean_m * k for k in LEAN_MULTIPLES] + [(lean_m + full_m) / 2] + [full_m * k for k in FULL_MULTIPLES]
    if quick:
        budgets = budgets[:1] + budgets[-1:]
    trained: dict[tuple, object] = {}
    plans = []
    for i, budget in enumerate(budgets):
        plan = planner.PlanPlacement(
            placement_pb2.PlanPlacementRequest(
                layer_card=card.name, budget=placement_pb2.Budget(max_serving_overhead_fraction=budget)
            ),
            timeout=120,
        )
        key = (tuple(plan.layers), tuple(plan.lora.target_modules), plan.lora.rank)
        if key not in trained:
            trained[key] = _adapter(*key)
        shape = {"layers": list(key[0]), "rank": key[2], "alpha": plan.lora.alpha, "target_modules": list(key[1])}
        adapter_id = f"planned-{i}"
        _publish(data_dir, adapter_id, trained[key], shape, plan.serving_pool, max_rank)
        began = time.perf_counter()
        d = adapters.DeployAdapter(
            adapter_pb2.DeployAdapterRequest(
                adapter=f"adapters/{adapter_id}",
                max_overhead_fraction=budget,
                full_latency_probe=True,
                force=True,
            ),
            timeout=300,
        )
        plans.append(
            {
                "budget": budget,
                "serving_pool": plan.serving_pool,
                "deployed_pool": d.pool,
                "layers": list(plan.layers),
                "target_modules": list(plan.lora.target_modules),
                "rank": plan.lora.rank,
                "predicted_overhead": plan.serving_overhead_fraction.value,
                "measured_overhead": d.latency.overhead_fraction,
                "within_budget": d.latency.overhead_fraction <= budget,
                "deploy_s": time.perf_counter() - began,
            }
        )
        adapters.UndeployAdapter(adapter_pb2.UndeployAdapterRequest(adapter=f"adapters/{adapter_id}"), timeout=120)
    return {
        "calibration": calibration,
        "lean_median": lean_m,
        "full_median": full_m,
        "card": card.name,
        "plans": plans,
        "within_budget_fraction": sum(p["within_budget"] for p in plans) / len(plans),
    }


def pools_report(pools: dict) -> list[str]:
    calibration = ", ".join(
        f"{name} {' / '.join(f'{x:+.0%}' for x in values)}" for name, values in pools["calibration"].items()
    )
    lines = [
        "",
        "## Serving pools: budgeted plans, deployed",
        "",
        "A second vLLM server wrapping only `o_proj` (pool `lean`) beside the first (every module, pool `full`), "
        f"calibrated by deploys with a latency probe each ({calibration}; medians lean "
        f"{pools['lean_median']:+.1%}, full {pools['full_median']:+.1%}). Each plan is made under its budget, "
        "an adapter of its shape trained a few steps and deployed to the plan's pool with a fresh probe "
        f"(forced, so an adapter over budget is measured, not refused). Within budget: "
        f"**{pools['within_budget_fraction']:.0%}** of {len(pools['plans'])} plans.",
        "",
        "| budget | plan's pool | modules | rank | layers | predicted | measured | within |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in pools["plans"]:
        lines.append(
            f"| {p['budget']:.3f} | {p['serving_pool']} | {','.join(p['target_modules'])} | {p['rank']} | "
            f"{len(p['layers'])} | {p['predicted_overhead']:+.1%} | {p['measured_overhead']:+.1%} | "
            f"{'yes' if p['within_budget'] else 'no'} |"
        )
    return lines
