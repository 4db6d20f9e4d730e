#!/usr/bin/env bash
# Freezes the current contract as release VERSION: a buf image in proto/releases/ (what `make proto-breaking`
# checks against) and a git tag contract-VERSION. Usage: release_contract.sh VERSION (e.g. v0.1.0)
set -euo pipefail
version=${1:?usage: release_contract.sh VERSION}
cd "$(dirname "$0")/.."
mkdir -p proto/releases
.venv/bin/buf build -o "proto/releases/layercard-${version}.binpb"
git add "proto/releases/layercard-${version}.binpb"
echo "wrote proto/releases/layercard-${version}.binpb; commit it, then: git tag contract-${version}"
