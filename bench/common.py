"""What every benchmark shares: where results go, and the record of the machine they were measured on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

__all__ = ["RESULTS", "machine", "version", "write_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def version(*names: str) -> str:
    """The installed version of the first distribution found among ``names``."""
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "unknown"


def machine(**extra: object) -> dict:
    """CPU, cores, memory and Python, plus ``extra`` (library versions), and the load average now."""
    cpu_model, mem_kib = platform.processor() or "unknown", 0
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu_model)
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return {
        "arch": platform.machine(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        **extra,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(name: str, result: dict, report: str) -> None:
    """``bench/results/<name>.json`` and ``.md``, and the report on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(report + "\n")
    print(report)
