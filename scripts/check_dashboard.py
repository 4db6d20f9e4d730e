"""Checks that the Grafana dashboard and the Prometheus rules only query series that exist.

Usage: python scripts/check_dashboard.py [--dashboard PATH] [--rules PATH]   (run with the project's venv)

A metric name in a panel's or a template variable's query must be one of:
  - a series the service exports: its registry is built the way server.py builds it, without serving
    (families list their names before any sample; counters add _total, histograms _bucket/_sum/_count);
  - a recording rule defined in the rules file;
  - a vLLM series (vllm:...), checked against the names vLLM's metrics code defines when vLLM is installed;
  - `up`;
  - one of the go-grpc-prometheus series in PENDING_GRPC_SERIES (dashboard only).
A name in the rules file must be exported, a vLLM series, `up`, or recorded in the same file.
Also checks the dashboard's shape: JSON, the ${datasource} and $adapter variables, unique panel ids.
Exits 1 with one line per problem.

With --emit-rules PATH it also writes every panel query, Grafana variables replaced, as a recording rule to PATH,
for `promtool check rules PATH` to check the PromQL syntax (check_observability.sh does).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/layercard-dashboard.json"
RULES = ROOT / "deploy/prometheus/rules/layercard.yml"

# The series of the gRPC metrics interceptor (go-grpc-prometheus names, labels grpc_type, grpc_service,
# grpc_method and, on handled_total, grpc_code). Accepted by name because the interceptor may not be wired into
# the server yet; once it is, its families show up in the registry and this list only repeats them.
PENDING_GRPC_SERIES = frozenset(
    {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_server_handling_seconds_sum",
        "grpc_server_handling_seconds_count",
    }
)
# Prometheus' own series per target.
SCRAPE_SERIES = frozenset({"up"})

# The series names each family type exposes (prometheus_client's text format).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_VLLM_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def exported_series() -> set[str]:
    """Series names of the service's registry, built as ``LayercardServer`` builds it, with nothing started."""
    from layercard_service.config import ServiceConfig
    from layercard_service.server import LayercardServer

    names: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="layercard-metrics-") as tmp:
        server = LayercardServer(ServiceConfig(port=0, data_dir=Path(tmp)))
        try:
            for family in server.registry.collect():
                names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        finally:
            server.core.close()
    return names


def vllm_series() -> set[str] | None:
    """The vllm:* metric names defined in the installed vLLM's metrics code, or None when vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it (importing vLLM is slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    names: set[str] = set()
    for location in spec.submodule_search_locations:
        for source in (Path(location) / "v1" / "metrics").glob("*.py"):
            names.update(re.findall(r"""["'](vllm:[a-zA-Z0-9_:]+)["']""", source.read_text(encoding="utf-8")))
    return names or None


# --- PromQL: the metric names an expression selects --------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:5m]
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MODIFIER = re.compile(r"\boffset\s+-?[\w.]+|@\s*[\w.()]+")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d[\w.]*(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right", "offset"}
    | {"inf", "nan", "start", "end"}
)
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*["']([a-zA-Z_:][a-zA-Z0-9_:]*)["']""")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected in ``expr``: identifiers that are not functions, keywords or label names."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _RANGE.sub(" ", text)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _MODIFIER.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):  # a function or an aggregation
            continue
        names.add(word)
    return names


_LABEL_VALUES = re.compile(r"\s*label_values\((.*),\s*\w+\s*\)\s*", re.DOTALL)
_QUERY_RESULT = re.compile(r"\s*query_result\((.*)\)\s*", re.DOTALL)


def variable_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana variable query: label_values(metric, label) or query_result(expr)."""
    match = _LABEL_VALUES.fullmatch(query) or _QUERY_RESULT.fullmatch(query)
    return promql_metric_names(match.group(1)) if match else set()  # label_values(label), label_names(): none


# --- what is allowed where ---------------------------------------------------------------------------------------


class Allowed:
    def __init__(self, exported: set[str], recorded: set[str], vllm: set[str] | None, extra: frozenset[str]):
        self.exported, self.recorded, self.vllm, self.extra = exported, recorded, vllm, extra

    def problem(self, name: str) -> str | None:
        if name in self.exported or name in self.recorded or name in self.extra or name in SCRAPE_SERIES:
            return None
        if name.startswith("vllm:"):
            if self.vllm is None:
                return None  # vLLM not installed here: the prefix is all that can be checked
            base = next((name[: -len(s)] for s in _VLLM_SUFFIXES if name.endswith(s)), name)
            return None if name in self.vllm or base in self.vllm else "not defined by the installed vLLM"
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            if name + suffix in self.exported:
                return f"not exported under this name; did you mean {name + suffix}?"
        return "not exported by the service, not a vllm: series, not recorded in the rules"


# --- the files ----------------------------------------------------------------------------------------------------


def rule_exprs(rules: dict) -> Iterator[tuple[str, str]]:
    for group in rules.get("groups") or []:
        for rule in group.get("rules") or []:
            yield rule.get("record") or rule.get("alert") or "?", str(rule.get("expr", ""))


def recorded_names(rules: dict) -> set[str]:
    return {rule["record"] for group in rules.get("groups") or [] for rule in group["rules"] if "record" in rule}


def check_rules(rules: dict, allowed: Allowed) -> list[str]:
    problems = []
    for name, expr in rule_exprs(rules):
        for metric in sorted(promql_metric_names(expr)):
            why = allowed.problem(metric)
            if why:
                problems.append(f"rules: {name}: {metric}: {why}")
    return problems


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # panels inside collapsed rows


def check_dashboard(dashboard: dict, allowed: Allowed) -> list[str]:
    problems = []
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource")
    if not source or source.get("type") != "datasource" or source.get("query") != "prometheus":
        problems.append("dashboard: no template variable `datasource` of type datasource (prometheus)")
    adapter = variables.get("adapter")
    query = adapter and adapter.get("query")
    query = query.get("query") if isinstance(query, dict) else query
    if not query or "label_values(layercard_inference_requests_total, adapter)" not in query:
        problems.append("dashboard: no `adapter` variable from label_values(layercard_inference_requests_total, ...)")
    for name, variable in variables.items():
        if variable.get("type") != "query":
            continue
        q = variable.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q or ""
        for metric in sorted(variable_metric_names(q)):
            why = allowed.problem(metric)
            if why:
                problems.append(f"dashboard: variable {name}: {metric}: {why}")

    ids: set[int] = set()
    for panel in _panels(dashboard.get("panels", [])):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"dashboard: panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"dashboard: panel {title!r}: datasource is not ${{datasource}}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"dashboard: panel {title!r}: no targets")
        for target in targets:
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"dashboard: panel {title!r} target {target.get('refId')}: empty expr")
            for metric in sorted(promql_metric_names(expr)):
                why = allowed.problem(metric)
                if why:
                    problems.append(f"dashboard: panel {title!r}: {metric}: {why}")
    return problems


_INTERVALS = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")


def dashboard_rules(dashboard: dict) -> dict:
    """Every panel query as a recording rule, for promtool's parser: intervals become 5m, other variables .*."""
    rules = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            expr = _GRAFANA_VAR.sub(".*", _INTERVALS.sub("5m", target.get("expr", "")))
            rules.append({"record": f"dashboard:panel_{panel.get('id')}_{target.get('refId')}", "expr": expr})
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--rules", type=Path, default=RULES)
    parser.add_argument("--emit-rules", type=Path, help="write the panel queries as rules here, for promtool")
    args = parser.parse_args(argv)

    try:
        dashboard = json.loads(args.dashboard.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"check_dashboard: {args.dashboard}: {exc}", file=sys.stderr)
        return 1
    rules = yaml.safe_load(args.rules.read_text(encoding="utf-8"))
    if args.emit_rules is not None:
        args.emit_rules.write_text(yaml.safe_dump(dashboard_rules(dashboard), sort_keys=False), encoding="utf-8")

    exported = exported_series()
    vllm = vllm_series()
    if vllm is None:
        print("check_dashboard: vLLM is not installed: vllm: names are checked by prefix only", file=sys.stderr)
    recorded = recorded_names(rules)
    problems = check_rules(rules, Allowed(exported, recorded, vllm, extra=frozenset()))
    problems += check_dashboard(dashboard, Allowed(exported, recorded, vllm, extra=PENDING_GRPC_SERIES))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    n_panels = sum(1 for p in _panels(dashboard.get("panels", [])) if p.get("type") != "row")
    print(
        f"check_dashboard: OK: {n_panels} panels and {sum(1 for _ in rule_exprs(rules))} rules query only known "
        f"series ({len(exported)} exported, {len(recorded)} recorded, vLLM names from "
        f"{'the installed vLLM' if vllm else 'the prefix'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
