#!/usr/bin/env bash
# Generates the Python stubs of proto/layercard/v1 (the public contract) and proto/layercard/internal/v1 (the
# workers' API back to the service) into OUT (the client package's root by default).
# Usage: gen_proto.sh PYTHON OUT
set -euo pipefail
python=$1
out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$root"
"$python" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/layercard/v1/*.proto proto/layercard/internal/v1/*.proto
for pkg in "$out/layercard" "$out/layercard/v1"; do
  printf '"""Generated from proto/layercard/v1 by scripts/gen_proto.sh; do not edit."""\n' > "$pkg/__init__.py"
done
for pkg in "$out/layercard/internal" "$out/layercard/internal/v1"; do
  printf '"""Generated from proto/layercard/internal/v1 by scripts/gen_proto.sh; do not edit. Not for callers."""\n' \
    > "$pkg/__init__.py"
done
echo "generated stubs in $out/layercard/v1 and $out/layercard/internal/v1"
