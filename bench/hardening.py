"""Does bad input or a crash ever break the service? (the hardening of issue 12)

Two parts, both on real servers over real sockets, with the same code as the tests:
1. The property-based fuzz of tests/integration/test_fuzz_grpc.py (tests/support/grpc_fuzz.py), with
   ``--scale`` times its examples per RPC: every RPC of the five services, requests generated from the proto
   descriptors and near-valid ones. Counted: cases and statuses per RPC, INTERNAL/UNKNOWN replies (with the
   server's own exception for each), cases after which health was not SERVING, and whether the resources made
   before the fuzz are still listed and usable. Then jobs with inline datasets are created and every List RPC
   is called with page_size 1000: the largest serialized reply is what a caller must be able to receive.
2. The fault scenarios of tests/integration/test_faults.py (tests/support/faults.py): kill -9 of the server
   mid-job, kill -9 of a worker, SIGTERM during a card; each checked for lost data afterwards.

    .venv/bin/python -m bench.hardening               # writes bench/results/hardening.json and hardening.md
    .venv/bin/python -m bench.hardening --scale 1 --no-faults --out hardening_quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/support as `support`

import grpc
from support.faults import SCENARIOS
from support.fuzz_server import TRAIN_JSONL, check_resources, fuzz_server, job_request, list_sizes
from support.grpc_fuzz import BAD, EXAMPLES_DEFAULT, EXAMPLES_PER_RPC, Tally, run_target, serving, targets

from bench.common import machine, version, write_results
from layercard.v1 import common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.persistence.store import MAX_LIST_RESPONSE_BYTES

INLINE_JOBS, INLINE_BYTES = 20, 256 * 1024  # jobs whose inline dataset a List must not carry back in full


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=3.0, help="times the test's examples per RPC")
    p.add_argument("--no-faults", action="store_true", help="the fuzz only")
    p.add_argument("--out", default="hardening", help="results name under bench/results/")
    return p.parse_args(argv)


def _inline_jobs(channel: grpc.Channel) -> int:
    """Jobs with a large inline training set, cancelled at once: List then shows whether replies carry it."""
    stub = tuning_pb2_grpc.TuningServiceStub(channel)
    body = (TRAIN_JSONL * (INLINE_BYTES // len(TRAIN_JSONL) + 1)).encode()
    made = 0
    for i in range(INLINE_JOBS):
        request = job_request(f"inline-{i}", 3)
        request.training_data.CopyFrom(common_pb2.DatasetSource(inline_jsonl=body))
        try:
            job = stub.CreateTuningJob(request, timeout=60)
        except grpc.RpcError:
            continue
        stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=job.name), timeout=30)
        made += 1
    return made


def fuzz_phase(scale: float) -> dict:
    import torch

    torch.set_num_threads(1)  # cards compute in this process
    tally = Tally()
    with fuzz_server() as (_server, channel, env):
        for target in targets():
            if target.method == "DeleteTuningJob" and not hasattr(tuning_pb2, "DeleteTuningJobRequest"):
                continue
            examples = max(1, round(scale * EXAMPLES_PER_RPC.get(target.method, EXAMPLES_DEFAULT)))
            print(f"  fuzz {target.method}: {examples} generated examples", flush=True)
            run_target(channel, env, target, examples, tally)
        resources = check_resources(channel, env)
        inline_jobs = _inline_jobs(channel)
        sizes = list_sizes(channel)
        still_serving = serving(channel)
    per_rpc = {
        method: {"cases": sum(c.values()), "statuses": dict(c), "seconds": round(tally.seconds.get(method, 0.0), 2)}
        for method, c in tally.statuses.items()
    }
    internal = sum(n for c in tally.statuses.values() for code, n in c.items() if code in {b.name for b in BAD})
    return {
        "cases": tally.cases,
        "internal_errors": internal,
        "property_failures": len(tally.failures),
        "not_serving_after": tally.not_serving + (0 if still_serving else 1),
        "per_rpc": per_rpc,
        "failure_kinds": tally.distinct(),
        "resources_problems": resources,
        "inline_jobs_created": inline_jobs,
        "inline_bytes_each": INLINE_BYTES,
        "list_response_bytes": sizes,
    }


def fault_phase() -> dict:
    results = {}
    for name, scenario in SCENARIOS.items():
        print(f"  fault {name}", flush=True)
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"layercard-fault-{name}-") as tmp:
            try:
                lost, error = scenario(Path(tmp)), ""
            except Exception as exc:  # a failed scenario is a result, reported with its cause
                lost, error = [], f"{type(exc).__name__}: {exc}"[:500] + "\n" + traceback.format_exc()[-1500:]
        results[name] = {
            "ok": not error and not lost,
            "lost_data": lost,
            "error": error,
            "seconds": round(time.monotonic() - began, 1),
        }
    return results


def headline(fuzz: dict, faults: dict) -> dict:
    sizes = [v for k, v in fuzz["list_response_bytes"].items() if not k.endswith("_error")]
    return {
        "fuzz_cases": fuzz["cases"],
        "internal_errors": fuzz["internal_errors"],
        "property_failures": fuzz["property_failures"],
        "server_not_serving_after": fuzz["not_serving_after"],
        "resources_lost": len(fuzz["resources_problems"]),
        "fault_cases": len(faults),
        "fault_cases_failed": sum(1 for f in faults.values() if f["error"]),
        "fault_cases_lost_data": sum(1 for f in faults.values() if f["lost_data"]),
        "max_list_response_bytes": max(sizes, default=0),
        "list_response_bound_bytes": MAX_LIST_RESPONSE_BYTES,
    }


def report(result: dict) -> str:
    h, fuzz = result["headline"], result["fuzz"]
    lines = [
        "# Hardening: fuzz and faults",
        "",
        f"`{result['command']}` on {result['machine']['cpu_model']} ({result['machine']['cores_usable']} cores), "
        f"{result['seconds']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in h.items()),
        "",
        "## Fuzz per RPC",
        "",
        "| RPC | cases | seconds | statuses |",
        "|---|---|---|---|",
    ]
    for method, row in fuzz["per_rpc"].items():
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(row["statuses"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {method} | {row['cases']} | {row['seconds']} | {statuses} |")
    lines += ["", "## Property failures, one per kind", ""]
    for f in fuzz["failure_kinds"] or []:
        lines.append(f"- `{f['rpc']}` {f['status']} ({f['cases']} cases): {f['cause'] or f['details']}")
        lines.append(f"  - request: `{f['request'][:300]}`")
    if not fuzz["failure_kinds"]:
        lines.append("none")
    lines += ["", "## Resources made before the fuzz", "", *(f"- {p}" for p in fuzz["resources_problems"])]
    if not fuzz["resources_problems"]:
        lines.append("all still listed and usable")
    lines += [
        "",
        f"## List replies (page_size 1000, after {fuzz['inline_jobs_created']} jobs with "
        f"{fuzz['inline_bytes_each'] // 1024} KiB inline datasets)",
        "",
        *(f"- {k}: {v}" for k, v in fuzz["list_response_bytes"].items()),
    ]
    if result["faults"]:
        lines += ["", "## Faults", "", "| scenario | ok | seconds | lost data | error |", "|---|---|---|---|---|"]
        for name, f in result["faults"].items():
            error = f["error"].splitlines()[0] if f["error"] else ""
            lines.append(f"| {name} | {f['ok']} | {f['seconds']} | {'; '.join(f['lost_data'])} | {error} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.time()
    command = "python -m bench.hardening " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine(grpcio=version("grpcio"), hypothesis=version("hypothesis"), torch=version("torch"))
    fuzz = fuzz_phase(args.scale)
    faults = {} if args.no_faults else fault_phase()
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "hardening",
        "command": command.strip(),
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "headline": headline(fuzz, faults),
        "fuzz": fuzz,
        "faults": faults,
        "seconds": time.time() - started,
    }
    write_results(args.out, result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
