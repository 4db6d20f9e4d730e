"""Generated from proto/layercard/v1 by scripts/gen_proto.sh; do not edit."""
