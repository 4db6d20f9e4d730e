"""The reconcile loop: every few seconds, make each replica hold exactly the desired versions of its pool.

A new or restarted replica gets its pool's adapters back; a stray version of an adapter the service owns
(another version, or one deployed to another configured pool) is unloaded; adapters someone else loaded (ids the
service does not know) are left alone. A version of an adapter whose id is no longer a valid id (an older check let
"bot\n" through) is always a stray: no request can name it to route to or undeploy it, so keeping it would
hold a LoRA slot for good. An adapter whose deploy or undeploy is under way is skipped, and the desired state
is read again right before each action, so a round that started before a deploy finished never undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from layercard_service.control.deployments import AdapterManager
from layercard_service.domain.jobs import ID_PATTERN
from layercard_service.errors import AlreadyExists, LayercardError
from layercard_service.serving.fleet import Observation
from layercard_service.serving.inference import served_id
from layercard_service.serving.vllm_api import VllmApi

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, manager: AdapterManager, interval_seconds: float) -> None:
        self.manager = manager
        self.interval_seconds = interval_seconds
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="reconcile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # keep reconciling; the next round retries
                log.exception("reconcile failed")
            await asyncio.sleep(self.interval_seconds)

    async def reconcile(self) -> dict[str, str]:
        """One round: follow discovery, load what is missing, unload stray versions of managed adapters.
        Returns the state of every desired deployment not busy with a deploy."""
        m = self.manager
        await m.fleet.refresh()
        for url, observation in (await m.fleet.observe()).items():
            replica = m.replica(url)
            if observation.healthy and replica is not None:
                await self._load_missing(replica, observation)
                await self._unload_strays(replica, observation)
        after = await m.fleet.observe()
        states = {}
        for record in m.store.all():
            if m.busy(record.adapter_id) or not _valid_id(record.adapter_id):
                continue
            home = [o for url, o in after.items() if m.pool_name(url) == record.pool]  # none: its pool is gone
            healthy = [o for o in home if o.healthy]
            complete = bool(healthy) and all(record.served_name in o.adapters for o in healthy)
            state = "READY" if complete and len(healthy) == len(home) else "DEGRADED"
            m.store.set_state(record.adapter_id, record.version, state)
            states[record.adapter_id] = state
        return states

    async def _load_missing(self, replica: VllmApi, observation: Observation) -> None:
        m = self.manager
        pool = m.pool_name(replica.url)
        for record in m.store.all():
            if record.pool != pool or m.busy(record.adapter_id) or record.served_name in observation.adapters:
                continue
            if not _valid_id(record.adapter_id):
                continue  # never reloaded: see the module docstring
            version = next((v for v in m.versions.versions(record.adapter_id) if v.version == record.version), None)
            if version is None:
                continue
            try:
                await replica.load_adapter(record.served_name, str(Path(version.path).resolve()))
                log.info("reconcile loaded", extra={"replica": replica.url, "served_name": record.served_name})
            except AlreadyExists:
                pass
            except LayercardError as exc:
                log.warning("reconcile load failed", extra={"replica": replica.url, "error": str(exc)})
            m.proxy.forget(replica.url)

    async def _unload_strays(self, replica: VllmApi, observation: Observation) -> None:
        m = self.manager
        for name in observation.adapters:
            adapter_id = served_id(name)
            if adapter_id is None or m.busy(adapter_id) or not m.versions.has_adapter(adapter_id):
                continue  # not versioned by us, being deployed, or someone else's
            wanted = m.store.get(adapter_id)  # read now: a deploy may have finished since the round began
            # A copy on another pool is a stray, unless its pool is no longer configured: then the copies it has
            # keep serving until it is deployed again (a switch to --vllm-pools must not take adapters offline).
            elsewhere = (
                wanted is not None and m.fleet.get(wanted.pool) is not None and wanted.pool != m.pool_name(replica.url)
            )
            if wanted is None or wanted.served_name != name or elsewhere or not _valid_id(adapter_id):
                await m.unload([replica], name)
                log.info("reconcile unloaded", extra={"replica": replica.url, "served_name": name})


def _valid_id(adapter_id: str) -> bool:
    return ID_PATTERN.fullmatch(adapter_id) is not None
