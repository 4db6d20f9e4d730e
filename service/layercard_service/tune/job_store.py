"""Tuning jobs, their events and adapter versions: re-exported from the persistence layer, where they live now.

``JobStore`` is ``persistence/jobs.py``; ``AdapterVersion`` and its repository ``AdapterVersions`` (with
``next_version``/``insert_version``, used inside a job's publishing transaction) are
``persistence/adapter_versions.py``, their canonical home. This module keeps the old import paths working.
"""

from __future__ import annotations

from layercard_service.persistence.adapter_versions import AdapterVersion, AdapterVersions, insert_version, next_version
from layercard_service.persistence.jobs import JobStore, NewEvent, state_event
from layercard_service.persistence.sqlite import BUSY_TIMEOUT_MS

__all__ = [
    "BUSY_TIMEOUT_MS",
    "AdapterVersion",
    "AdapterVersions",
    "JobStore",
    "NewEvent",
    "insert_version",
    "next_version",
    "state_event",
]
