#!/usr/bin/env bash
# Checks the Prometheus and Grafana files in deploy/: the config, the rules and their unit tests (promtool), that
# the dashboard and the rules only query series that exist (scripts/check_dashboard.py), and that the dashboard's
# queries parse (promtool, on the queries written out as rules).
# Usage: scripts/check_observability.sh [PYTHON]   (PYTHON defaults to .venv/bin/python; PROMTOOL=... overrides)
# Needs promtool: Debian's package `prometheus` (as root: bash scripts/install_promtool.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
promtool=${PROMTOOL:-promtool}

if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "check_observability: promtool not found. Install it with: sudo bash scripts/install_promtool.sh" \
    "(Debian package 'prometheus', which provides promtool)" >&2
  exit 2
fi

prom=deploy/prometheus
# rule_files in prometheus.yml are relative; promtool resolves them against the config file's own directory, so
# this works from any working directory (and checks the rule files it finds there too).
"$promtool" check config "$prom/prometheus.yml"
"$promtool" check rules "$prom"/rules/*.yml
"$promtool" test rules "$prom"/tests/*.yml
# The dashboard's queries as rules, so that promtool's parser checks their PromQL too.
queries=$(mktemp --suffix=.yml)
trap 'rm -f "$queries"' EXIT
"$python" scripts/check_dashboard.py --emit-rules "$queries"
if ! "$promtool" check rules "$queries" >/dev/null; then
  echo "check_observability: a dashboard query is not valid PromQL (rule dashboard:panel_<id>_<refId> above)" >&2
  exit 1
fi
echo "dashboard queries: valid PromQL"
echo "check_observability: OK"
