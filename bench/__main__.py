"""``make bench``: runs every benchmark; each writes bench/results/<name>.json (with a ``headline``) and a report.

.venv/bin/python -m bench            # all
.venv/bin/python -m bench card       # one
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "card",
    "tasks_check",
    "placement",
    "serving",
    "serving_pools",
    "metrics",
    "hardening",
    "real_model",
    "cost_model",
)


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"== bench {name}", flush=True)
        code = importlib.import_module(f"bench.{name}").main([])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
