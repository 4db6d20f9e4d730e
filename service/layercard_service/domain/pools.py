"""Serving pools by name: the name every record, request and setting uses for one (serving/pool_spec.py)."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_POOL", "POOL_NAME"]

DEFAULT_POOL = "default"  # the one pool of a service configured with --vllm-urls / --vllm-dns
POOL_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # a DNS label: pool names go into Kubernetes names
