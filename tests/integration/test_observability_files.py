"""The Prometheus config, rules and rule tests pass promtool; the dashboard and rules query only real series.

promtool is required, not optional: without it these tests fail and say how to install it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_observability.sh"
INSTALL_HINT = (
    "promtool is not installed: install Debian's package 'prometheus' without starting its daemon, as root: "
    "`bash scripts/install_promtool.sh` (or `apt-get install -y --no-install-recommends prometheus`)"
)


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_dashboard", ROOT / "scripts" / "check_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return checker.exported_series()


def _require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


def test_promtool_is_installed():
    _require_promtool()


def test_check_observability_script_passes():
    """promtool check config / check rules / test rules, then scripts/check_dashboard.py."""
    _require_promtool()
    done = subprocess.run(
        ["bash", str(SCRIPT), sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{SCRIPT.name} failed:\n{done.stdout}\n{done.stderr}"
    assert "Unit Testing" in done.stdout and "SUCCESS" in done.stdout
    assert "check_observability: OK" in done.stdout


def test_exported_series_carry_their_type_suffixes(exported):
    assert {
        "layercard_inference_requests_total",  # counter
        "layercard_inference_time_to_first_token_seconds_bucket",  # histogram, no sample yet
        "layercard_inference_time_to_first_token_seconds_count",
        "layercard_fleet_missing_adapters",  # scrape-time gauge
        "layercard_build_info",  # info
        "process_cpu_seconds_total",
    } <= exported
    assert "layercard_inference_requests" not in exported


def test_every_alert_has_severity_annotations_and_a_unit_test():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/layercard.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
        assert "for" in alert, alert["alert"]
    tests = yaml.safe_load((ROOT / "deploy/prometheus/tests/layercard_test.yml").read_text())
    cases = [case for group in tests["tests"] for case in group.get("alert_rule_test", [])]
    for alert in alerts:
        name = alert["alert"]
        assert any(c["alertname"] == name and c.get("exp_alerts") for c in cases), f"{name}: no case where it fires"
        assert any(c["alertname"] == name and not c.get("exp_alerts") for c in cases), f"{name}: no quiet case"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (adapter, le) (rate(a_bucket{adapter=~"$adapter", le="2.5"}[$__rate_interval]))', {"a_bucket"}),
        ("x / on (adapter) group_left (y) (z offset 1h > 0) and bool w @ 100", {"x", "z", "w"}),
        ('histogram_quantile(0.99, sum(rate(vllm:e2e_bucket{job="vllm"}[5m])) by (le)) > 1e3', {"vllm:e2e_bucket"}),
        ('{__name__="named", job="x"}', {"named"}),
        ('label_replace(up, "a", "$1", "b", "(.*)") unless absent(q[1h:5m])', {"up", "q"}),
    ],
)
def test_promql_metric_names(expr, names):
    assert checker.promql_metric_names(expr) == names


def _allowed(extra=frozenset()):
    exported = {"layercard_inference_requests_total", "layercard_vllm_replica_up"}
    return checker.Allowed(exported, {"adapter:x:rate5m"}, {"vllm:time_to_first_token_seconds"}, extra)


def test_checker_flags_unknown_series_in_the_dashboard():
    dashboard = json.loads((ROOT / "deploy/grafana/layercard-dashboard.json").read_text())
    bad = copy.deepcopy(next(p for p in dashboard["panels"] if p["type"] == "timeseries"))
    bad["id"], bad["title"] = 9999, "bad"
    bad["targets"] = [
        {"refId": "A", "expr": "rate(layercard_inference_requests[5m])"},  # a counter without _total
        {"refId": "B", "expr": "vllm:time_to_first_token_seconds_bucket + vllm:no_such_seconds_bucket"},
        {"refId": "C", "expr": "rate(grpc_server_handled_total[5m]) + adapter:x:rate5m"},
    ]
    problems = checker.check_dashboard({**dashboard, "panels": [bad]}, _allowed(checker.PENDING_GRPC_SERIES))
    assert len(problems) == 2, problems
    assert "layercard_inference_requests: not exported under this name; did you mean" in problems[0]
    assert "vllm:no_such_seconds_bucket: not defined by the installed vLLM" in problems[1]


def test_checker_flags_grpc_series_and_unknown_names_in_rules():
    rules = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "grpc_server_handled_total > 0 or nope"}]}]}
    problems = checker.check_rules(rules, _allowed())
    assert [p.split(": ")[2] for p in problems] == ["grpc_server_handled_total", "nope"]
