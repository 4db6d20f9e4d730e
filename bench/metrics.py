"""What does the gRPC metrics interceptor cost per RPC? (the observability capability)

Two real grpc.aio servers in this process, on real loopback sockets, one event loop in a background thread:
both with the service's error interceptor and the standard async health servicer; one also with
``GrpcMetricsInterceptor`` outermost, as server.py chains it. A sync client in the main thread calls the
cheap unary ``grpc.health.v1.Health/Check`` back to back and times every call. The two sides run in
interleaved blocks (A B, B A, A B, ...) so slow drift of the machine spreads evenly; warm-up calls on both
are discarded. Reported: per-RPC mean and median microseconds of each side and their ratios, and, apart, the
wrapper's own CPU time per call (intercept_service plus the wrapped handler, on a fake context, no socket).

    .venv/bin/python -m bench.metrics            # writes bench/results/metrics.json and metrics.md
    .venv/bin/python -m bench.metrics --quick    # a few samples: writes metrics_quick.json/.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from bench.common import machine, version, write_results
from layercard_service.api.grpc_metrics import GrpcMetricsInterceptor
from layercard_service.api.interceptors import ErrorInterceptor
from layercard_service.observability.endpoint import new_registry

CHECK = "/grpc.health.v1.Health/Check"
SIDES = ("without", "with")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few samples, to check that it runs")
    p.add_argument("--rpcs", type=int, default=3000, help="timed RPCs per side")
    p.add_argument("--warmup", type=int, default=300, help="untimed RPCs per side first")
    # Small blocks: the machine drifts by hundreds of microseconds within seconds (seen with blocks of 250).
    p.add_argument("--block", type=int, default=10, help="RPCs per block; sides alternate by block")
    p.add_argument("--wrapper-calls", type=int, default=20000, help="direct calls of the wrapper (no socket)")
    p.add_argument("--out", default=None, help="result name under bench/results (default metrics[_quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.rpcs, args.warmup, args.block, args.wrapper_calls = 300, 50, 50, 2000
    args.out = args.out or ("metrics_quick" if args.quick else "metrics")
    return args


# --- the servers ---------------------------------------------------------------------------------------------
class Servers:
    """Both servers on one event loop in a background thread, as the service runs (one loop, many RPCs)."""

    def __init__(self) -> None:
        self.registry = new_registry("bench")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-servers", daemon=True)
        self._servers: list[grpc.aio.Server] = []
        self.ports: dict[str, int] = {}

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    async def _start(self, side: str) -> None:
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if side == "with":
            interceptors.insert(0, GrpcMetricsInterceptor(self.registry))
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.ports[side] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._servers.append(server)

    async def _stop(self) -> None:
        for server in self._servers:
            await server.stop(0)

    def __enter__(self) -> Servers:
        self._thread.start()
        for side in SIDES:
            self._run(self._start(side))
        return self

    def __exit__(self, *exc) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def counted(self) -> float:
        labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
        return self.registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) or 0.0


def _time_block(stub: health_pb2_grpc.HealthStub, count: int) -> list[float]:
    request = health_pb2.HealthCheckRequest(service="")
    times = []
    gc.collect()
    for _ in range(count):
        t = time.perf_counter_ns()
        stub.Check(request)
        times.append((time.perf_counter_ns() - t) / 1000)
    return times


def rpc_phase(servers: Servers, args: argparse.Namespace) -> dict:
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    block_medians: list[dict] = []
    channels = {side: grpc.insecure_channel(f"127.0.0.1:{servers.ports[side]}") for side in SIDES}
    try:
        stubs = {side: health_pb2_grpc.HealthStub(ch) for side, ch in channels.items()}
        for side in SIDES:
            _time_block(stubs[side], args.warmup)
        blocks = -(-args.rpcs // args.block)
        for i in range(blocks):
            count = min(args.block, args.rpcs - i * args.block)
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            medians = {"first": order[0]}
            for side in order:
                block = _time_block(stubs[side], count)
                times[side] += block
                medians[side] = statistics.median(block)
            block_medians.append(medians)
            if i % 50 == 0:
                print(
                    f"[rpc] block {i + 1}/{blocks}: " + ", ".join(f"{s} {medians[s]:.0f} us" for s in SIDES), flush=True
                )
    finally:
        for ch in channels.values():
            ch.close()
    stats = {
        side: {
            "rpcs": len(t),
            "mean_us": statistics.fmean(t),
            "median_us": statistics.median(t),
            "p90_us": statistics.quantiles(t, n=10)[-1],
            "min_us": min(t),
        }
        for side, t in times.items()
    }
    return {"stats": stats, "blocks": block_medians, "spread": spread(times, block_medians)}


def spread(times: dict[str, list[float]], blocks: list[dict], resamples: int = 1000) -> dict:
    """How far the median ratio moves: a bootstrap 95% interval (each side resampled on its own, fixed seed) and
    the quartiles of the block-by-block ratio (the two sides' medians of neighbouring blocks)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        w, wo = (statistics.median(rng.choices(times[side], k=len(times[side]))) for side in ("with", "without"))
        ratios.append(w / wo)
    q = statistics.quantiles(ratios, n=40)  # 2.5% steps
    per_block = statistics.quantiles([b["with"] / b["without"] for b in blocks], n=4)
    return {
        "median_ratio_ci95": [q[0], q[-1]],
        "block_ratio_quartiles": per_block,
        "resamples": resamples,
    }


# --- the wrapper alone ---------------------------------------------------------------------------------------
class _Details:
    method = CHECK
    invocation_metadata = ()


class _Context:
    def code(self):
        return None


def wrapper_phase(calls: int) -> dict:
    """intercept_service plus the wrapped handler around a no-op handler, minus the no-op handler alone."""
    request, context = health_pb2.HealthCheckRequest(), _Context()
    response = health_pb2.HealthCheckResponse()

    async def handle(request, context):
        return response

    handler = grpc.unary_unary_rpc_method_handler(handle)

    async def continuation(details):
        return handler

    interceptor = GrpcMetricsInterceptor(new_registry("bench"))

    async def with_metrics() -> float:
        t = time.perf_counter_ns()
        for _ in range(calls):
            wrapped = await interceptor.intercept_service(continuation, _Details)
            await wrapped.unary_unary(request, context)
        return (time.perf_counter_ns() - t) / 1000 / calls

    async def without_metrics() -> float:
        t = time.perf_counter_ns()
        for _ in range(calls):
            wrapped = await continuation(_Details)
            await wrapped.unary_unary(request, context)
        return (time.perf_counter_ns() - t) / 1000 / calls

    async def both() -> dict:
        await with_metrics()  # warm-up: the label children are created on the first call
        runs = {"with": [], "without": []}
        for _ in range(5):
            runs["without"].append(await without_metrics())
            runs["with"].append(await with_metrics())
        return {side: min(values) for side, values in runs.items()}  # least disturbed of five

    best = asyncio.run(both())
    return {"calls": calls, "us_per_call_with": best["with"], "us_per_call_without": best["without"]}


# --- results -------------------------------------------------------------------------------------------------
def headline(rpc: dict, wrapper: dict) -> dict:
    w, wo = rpc["stats"]["with"], rpc["stats"]["without"]
    return {
        "rpc_time_with_over_without_metrics": w["median_us"] / wo["median_us"],
        "rpc_time_with_over_without_metrics_ci95_low": rpc["spread"]["median_ratio_ci95"][0],
        "rpc_time_with_over_without_metrics_ci95_high": rpc["spread"]["median_ratio_ci95"][1],
        "rpc_time_with_over_without_metrics_mean": w["mean_us"] / wo["mean_us"],
        "median_us_with_metrics": w["median_us"],
        "median_us_without_metrics": wo["median_us"],
        "mean_us_with_metrics": w["mean_us"],
        "mean_us_without_metrics": wo["mean_us"],
        "added_us_median": w["median_us"] - wo["median_us"],
        "wrapper_cpu_us_per_rpc": wrapper["us_per_call_with"] - wrapper["us_per_call_without"],
    }


def report(result: dict) -> str:
    h, s, mach = result["headline"], result["settings"], result["machine"]
    stats, sp = result["rpc"]["stats"], result["rpc"]["spread"]
    lines = [
        "# Cost of the gRPC metrics interceptor per RPC",
        "",
        *(["**Quick run: a few samples to check that the benchmark runs; not a result.**", ""] if s["quick"] else []),
        f"Machine: {mach['cpu_model']}, {mach['cores']} cores ({mach['cores_usable']} usable), {mach['ram_gib']} GiB "
        f"RAM; python {mach['python']}, grpcio {mach['grpcio']}, prometheus_client {mach['prometheus_client']}; "
        f"load average at start {mach['load_average_at_start']}, at end {mach['load_average_at_end']}.",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s)",
        "",
        "Two grpc.aio servers on loopback in one event loop (background thread), both with the error interceptor "
        "and the async health servicer, one with GrpcMetricsInterceptor outermost; a sync client calls "
        f"Health/Check back to back: {s['warmup']} warm-up calls per side, then {s['rpcs']} timed per side in "
        f"blocks of {s['block']}, alternating A B, B A.",
        "",
        "## Headline",
        "",
        *[f"- {k}: {v:.3f}" for k, v in h.items()],
        "",
        "## Per-RPC time as the client sees it (microseconds)",
        "",
        "| | RPCs | median | mean | p90 | min |",
        "|---|---|---|---|---|---|",
        *[
            f"| {side} metrics | {st['rpcs']} | {st['median_us']:.1f} | {st['mean_us']:.1f} | {st['p90_us']:.1f} | "
            f"{st['min_us']:.1f} |"
            for side, st in ((side, stats[side]) for side in ("without", "with"))
        ],
        "",
        f"Spread of the median ratio: 95% bootstrap interval {sp['median_ratio_ci95'][0]:.3f} to "
        f"{sp['median_ratio_ci95'][1]:.3f} ({sp['resamples']} resamples of each side); block-by-block ratio "
        f"quartiles {', '.join(f'{x:.3f}' for x in sp['block_ratio_quartiles'])}.",
        "",
        f"The wrapper alone (intercept_service and the wrapped handler around a no-op, no socket; best of 5 runs of "
        f"{result['wrapper']['calls']} calls): {result['wrapper']['us_per_call_with']:.2f} us per call with metrics, "
        f"{result['wrapper']['us_per_call_without']:.2f} us without.",
        f"The metrics server counted {result['counted_rpcs']:.0f} Health/Check RPCs "
        f"(warm-up + timed = {s['warmup'] + s['rpcs']}).",
        "",
        "## Block medians, every 30th block (microseconds; drift shows here)",
        "",
        "| block | first | without | with |",
        "|---|---|---|---|",
        *[
            f"| {i + 1} | {b['first']} | {b['without']:.1f} | {b['with']:.1f} |"
            for i, b in enumerate(result["rpc"]["blocks"])
            if i % 30 == 0
        ],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.time()
    command = "python -m bench.metrics " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(grpcio=version("grpcio"), prometheus_client=version("prometheus_client"))
    with Servers() as servers:
        rpc = rpc_phase(servers, args)
        counted = servers.counted()
    wrapper = wrapper_phase(args.wrapper_calls)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "metrics",
        "command": command.strip(),
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "headline": headline(rpc, wrapper),
        "rpc": rpc,
        "wrapper": wrapper,
        "counted_rpcs": counted,
        "seconds": time.time() - started,
    }
    write_results(args.out, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
