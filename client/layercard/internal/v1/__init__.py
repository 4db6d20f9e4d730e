"""Generated from proto/layercard/internal/v1 by scripts/gen_proto.sh; do not edit. Not for callers."""
