"""Serving pools as the settings name them: ``--vllm-pools`` / ``LAYERCARD_VLLM_POOLS``, a JSON list.

A pool is a set of vLLM replicas started with the same LoRA settings. vLLM wraps every layer of each module type
it is started with, so a pool's settings, not the adapter's layers, set an adapter's serving overhead there: a
lean pool (``--lora-target-modules o_proj``) beside a full one lets a tight latency budget be met. One entry:

    {"name": "lean", "dns": "vllm-lean:8000", "urls": ["http://10.0.0.5:8000"],
     "target_modules": ["o_proj"], "max_lora_rank": 8}

``name`` is required; ``urls`` and/or ``dns`` say where the replicas are; ``target_modules`` is the pool's
``--lora-target-modules`` (absent or empty: every LoRA-capable module) and ``max_lora_rank`` its
``--max-lora-rank`` (absent: the service's max_lora_rank). No I/O: config.py reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from layercard_service.domain.pools import DEFAULT_POOL, POOL_NAME
from layercard_service.settings import ConfigError

__all__ = ["DEFAULT_POOL", "PoolSpec", "parse_pools"]

_KEYS = {"name", "urls", "dns", "target_modules", "max_lora_rank"}


@dataclass(frozen=True)
class PoolSpec:
    name: str
    urls: tuple[str, ...] = ()
    dns: str = ""  # host:port resolving to every replica (a Kubernetes headless Service)
    target_modules: tuple[str, ...] = ()  # empty: every LoRA-capable module
    max_lora_rank: int = 0  # 0: the service's max_lora_rank

    def check(self) -> None:
        """Raises ConfigError naming the pool and the bad key."""
        if not POOL_NAME.fullmatch(self.name):
            raise ConfigError(
                f"vllm pool name must be lowercase letters, digits and '-' (DNS label), got {self.name!r}"
            )
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"vllm pool {self.name!r}: urls entries must be http(s) URLs, got {url!r}")
        host, _, port = self.dns.rpartition(":")
        if self.dns and not (host.strip() and port.isdigit()):
            raise ConfigError(f"vllm pool {self.name!r}: dns must be host:port, got {self.dns!r}")
        if self.max_lora_rank < 0:
            raise ConfigError(f"vllm pool {self.name!r}: max_lora_rank must be >= 1, got {self.max_lora_rank}")


def parse_pools(text: str) -> tuple[PoolSpec, ...]:
    """The pools of a JSON list (see the module docstring); ConfigError on anything else."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"vllm_pools is not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(raw, list) or not raw:
        raise ConfigError("vllm_pools must be a non-empty JSON list of pools")
    pools = tuple(_pool(entry, i) for i, entry in enumerate(raw))
    names = [p.name for p in pools]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"vllm_pools: pool names must be unique, {', '.join(duplicated)} repeats")
    # A replica in two pools would be loaded for one and unloaded as a stray for the other, round after round.
    places = [(u, p.name) for p in pools for u in p.urls] + [(p.dns, p.name) for p in pools if p.dns]
    seen: dict[str, str] = {}
    for where, name in places:
        if where in seen and seen[where] != name:
            raise ConfigError(f"vllm_pools: {where} is in two pools ({seen[where]!r} and {name!r})")
        seen[where] = name
    return pools


def _pool(entry: Any, index: int) -> PoolSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"vllm_pools[{index}] must be a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"vllm_pools[{index}]: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"vllm_pools[{index}] needs a name (a string)")
    urls, modules = entry.get("urls", []), entry.get("target_modules", [])
    for key, value in (("urls", urls), ("target_modules", modules)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"vllm pool {name!r}: {key} must be a list of non-empty strings")
    dns, rank = entry.get("dns", ""), entry.get("max_lora_rank", 0)
    if not isinstance(dns, str):
        raise ConfigError(f"vllm pool {name!r}: dns must be a string host:port")
    if isinstance(rank, bool) or not isinstance(rank, int) or ("max_lora_rank" in entry and rank < 1):
        raise ConfigError(f"vllm pool {name!r}: max_lora_rank must be an integer >= 1, got {rank!r}")
    if not urls and not dns:
        raise ConfigError(f"vllm pool {name!r} needs urls or dns: where its replicas are")
    spec = PoolSpec(name, tuple(u.rstrip("/") for u in urls), dns, tuple(m.strip() for m in modules), rank)
    spec.check()
    return spec
