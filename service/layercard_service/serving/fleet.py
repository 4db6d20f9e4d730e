"""The fleet: which vLLM servers exist (a static list, or every address behind a DNS name) and what each serves.

A Kubernetes headless Service resolves to one address per ready pod, so DNS discovery follows the Deployment's
replicas as they come and go. Membership is refreshed by the reconcile loop; what a replica serves is read from
its ``/v1/models`` (``observe``). The LoRA settings of the servers (largest rank, wrapped module types) are not
exposed by vLLM's API, so the fleet is told them: they are the flags the vLLM servers were started with.

A fleet may hold several pools (``Pools``), each a ``Fleet`` of replicas started with the same LoRA settings; a
service configured with one list of servers has one pool, named "default".
"""

from __future__ import annotations

import asyncio
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layercard_service.domain.pools import DEFAULT_POOL
from layercard_service.errors import LayercardError
from layercard_service.serving.vllm_api import HttpVllmApi, ServedModel, VllmApi

__all__ = [
    "DnsDiscovery",
    "Discovery",
    "Fleet",
    "FleetSettings",
    "Observation",
    "Pools",
    "StaticDiscovery",
    "Union",
]

OBSERVE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class FleetSettings:
    model: str  # the base model the servers serve, as layercard names models ("builtin:tiny", a path)
    max_lora_rank: int  # vLLM's --max-lora-rank
    target_modules: tuple[str, ...] = ()  # vLLM's --lora-target-modules; empty: every LoRA-capable module
    pool: str = DEFAULT_POOL  # the pool these servers make up

    def describe(self) -> str:
        wrapped = ", ".join(self.target_modules) or "every LoRA-capable module"
        return f"pool {self.pool!r} (wrapping {wrapped}, max rank {self.max_lora_rank})"


@dataclass(frozen=True)
class Observation:
    """One replica as last seen: reachable or not, and the models it serves."""

    url: str
    healthy: bool
    models: tuple[ServedModel, ...] = ()
    error: str = ""
    time: float = 0.0

    @property
    def base_model(self) -> str | None:
        return next((m.name for m in self.models if m.parent is None), None)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models if m.parent is not None)


class Discovery(ABC):
    @abstractmethod
    async def urls(self) -> list[str]: ...


class StaticDiscovery(Discovery):
    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = [u.rstrip("/") for u in urls]

    async def urls(self) -> list[str]:
        return list(self._urls)


class DnsDiscovery(Discovery):
    """Every IPv4 address of ``host`` as ``{scheme}://{address}:{port}``; a failed lookup keeps the last answer."""

    def __init__(self, target: str, scheme: str = "http") -> None:
        host, _, port = target.rpartition(":")
        if not host.strip() or not port.isdigit():
            raise ValueError(f"DNS target must be host:port, got {target!r}")
        self.host, self.port, self.scheme = host, int(port), scheme
        self._last: list[str] = []

    async def urls(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError:
            return list(self._last)  # a DNS hiccup must not empty the fleet
        self._last = sorted({f"{self.scheme}://{info[4][0]}:{self.port}" for info in infos})
        return list(self._last)


class Union(Discovery):
    """Every URL any of ``parts`` finds (static URLs beside a DNS name)."""

    def __init__(self, parts: Sequence[Discovery]) -> None:
        self.parts = list(parts)

    async def urls(self) -> list[str]:
        found = [url for part in self.parts for url in await part.urls()]
        return list(dict.fromkeys(found))


class Fleet:
    """The current replicas, one ``VllmApi`` each, and their last observation."""

    def __init__(
        self,
        discovery: Discovery,
        settings: FleetSettings,
        connect: Callable[[str], VllmApi] = HttpVllmApi,
        initial: Sequence[str] = (),
    ) -> None:
        self.discovery = discovery
        self.settings = settings
        self._connect = connect
        self._replicas: dict[str, VllmApi] = {url.rstrip("/"): connect(url) for url in initial}
        self.last: dict[str, Observation] = {}

    def members(self) -> list[VllmApi]:
        return list(self._replicas.values())

    async def refresh(self) -> None:
        """Follows discovery: connects new replicas and closes the ones that left."""
        urls = await self.discovery.urls()
        for url in urls:
            if url not in self._replicas:
                self._replicas[url] = self._connect(url)
        for url in [u for u in self._replicas if u not in urls]:
            await self._replicas.pop(url).close()
            self.last.pop(url, None)

    async def observe(self, timeout: float = OBSERVE_TIMEOUT_SECONDS) -> dict[str, Observation]:
        """Asks every replica what it serves, all at once; an unreachable one is observed unhealthy."""
        replicas = self.members()
        seen = await asyncio.gather(*(self._observe(r, timeout) for r in replicas))
        self.last.update({o.url: o for o in seen})
        return {o.url: o for o in seen}

    @staticmethod
    async def _observe(replica: VllmApi, timeout: float) -> Observation:
        try:
            async with asyncio.timeout(timeout):
                models = await replica.models(timeout=timeout)
        except TimeoutError:
            return Observation(replica.url, False, error=f"no answer within {timeout:.0f} s", time=time.time())
        except Exception as exc:  # one misbehaving replica must not blind the fleet to the others
            message = str(exc) if isinstance(exc, LayercardError) else f"{type(exc).__name__}: {exc}"
            return Observation(replica.url, False, error=message, time=time.time())
        return Observation(replica.url, True, tuple(models), time=time.time())

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.close()


class Pools:
    """The serving pools, each a ``Fleet``, in the order configured; as a whole, every pool's replicas."""

    def __init__(self, pools: Sequence[Fleet]) -> None:
        if not pools:
            raise ValueError("a fleet has at least one pool")
        self._pools = {p.settings.pool: p for p in pools}
        if len(self._pools) != len(pools):
            raise ValueError("pool names must be unique")

    def __iter__(self):
        return iter(self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._pools)

    def get(self, name: str) -> Fleet | None:
        return self._pools.get(name)

    def pool_of(self, url: str) -> Fleet | None:
        """The pool a replica belongs to (the first, should discovery put one URL in two pools)."""
        return next((p for p in self._pools.values() if any(r.url == url for r in p.members())), None)

    def pool_name(self, url: str) -> str:
        """The name of the pool a replica belongs to; "" for a URL no pool holds (it left with discovery)."""
        pool = self.pool_of(url)
        return pool.settings.pool if pool is not None else ""

    def members(self) -> list[VllmApi]:
        return [r for p in self._pools.values() for r in p.members()]

    @property
    def last(self) -> dict[str, Observation]:
        return {url: o for p in self._pools.values() for url, o in list(p.last.items())}

    async def refresh(self) -> None:
        for pool in self._pools.values():
            await pool.refresh()

    async def observe(self, timeout: float = OBSERVE_TIMEOUT_SECONDS) -> dict[str, Observation]:
        seen = await asyncio.gather(*(p.observe(timeout) for p in self._pools.values()))
        return {url: o for part in seen for url, o in part.items()}

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
