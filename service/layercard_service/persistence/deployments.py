"""Desired deployments and serving-latency measurements (tables ``deployments``, ``serving_measurements``).

A row in ``deployments`` says "adapter X should be served at version N on every replica"; the reconcile loop
makes the fleet match it. ``serving_measurements`` keeps every post-load latency probe: the deploy shows the
newest, and the planner's vLLM serving-cost model is calibrated from them.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from layercard_service.persistence import as_database
from layercard_service.persistence.database import Database

__all__ = ["DeploymentRecord", "DeploymentStore", "LatencyMeasurement", "ServingCalibration", "served_name"]

# Named, not *: where ``budget`` sits depends on how the table was migrated (schema.py, migration 2).
_COLUMNS = "adapter_id, version, state, latency, update_time, budget"
CALIBRATION_WINDOW = 20  # the newest measurements the planner's calibration takes the median of


@dataclass(frozen=True)
class LatencyMeasurement:
    replica: str
    base_ttft_ms: float
    adapter_ttft_ms: float
    base_inter_token_ms: float
    adapter_inter_token_ms: float
    overhead_fraction: float  # (adapter - base) / base of the median per-request latency
    samples: int
    base_latency_ms: float = 0.0
    adapter_latency_ms: float = 0.0
    tokens: int = 0


@dataclass(frozen=True)
class DeploymentRecord:
    adapter_id: str
    version: int
    state: str  # READY | DEGRADED
    latency: LatencyMeasurement | None
    update_time: float
    budget: float | None = None  # the max_overhead_fraction it was deployed under

    @property
    def served_name(self) -> str:
        return served_name(self.adapter_id, self.version)


@dataclass(frozen=True)
class ServingCalibration:
    """The fleet's measured vLLM adapter overhead for one base model, as the planner uses it."""

    overhead_fraction: float
    samples: int
    basis: str


def served_name(adapter_id: str, version: int) -> str:
    return f"{adapter_id}@v{version}"


class DeploymentStore:
    """Deployments and measurements over a Database: a shared one, or (given a path) one of its own."""

    def __init__(self, db: Database | Path) -> None:
        self.db, self._owns_db = as_database(db)

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    def get(self, adapter_id: str) -> DeploymentRecord | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM deployments WHERE adapter_id = ?", (adapter_id,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[DeploymentRecord]:
        return [_record(r) for r in self.db.execute(f"SELECT {_COLUMNS} FROM deployments ORDER BY adapter_id")]

    def put(self, record: DeploymentRecord) -> None:
        latency = json.dumps(asdict(record.latency)) if record.latency else None
        self.db.execute(
            f"INSERT OR REPLACE INTO deployments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (record.adapter_id, record.version, record.state, latency, record.update_time, record.budget),
        )

    def set_state(self, adapter_id: str, version: int, state: str) -> None:
        self.db.execute(
            "UPDATE deployments SET state = ?, update_time = ? WHERE adapter_id = ? AND version = ? AND state != ?",
            (state, time.time(), adapter_id, version, state),
        )

    def delete(self, adapter_id: str) -> bool:
        return self.db.execute("DELETE FROM deployments WHERE adapter_id = ?", (adapter_id,)).rowcount > 0

    def add_measurement(
        self, model: str, adapter_id: str, version: int, max_rank: int, modules: tuple[str, ...], m: LatencyMeasurement
    ) -> None:
        self.db.execute(
            "INSERT INTO serving_measurements (time, model, adapter_id, version, server_max_rank, "
            "server_modules, overhead_fraction, measurement) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), model, adapter_id, version, max_rank, ",".join(modules), m.overhead_fraction,
             json.dumps(asdict(m))),
        )  # fmt: skip

    def calibration(self, model: str) -> ServingCalibration | None:
        """The median overhead of the newest measurements on ``model``'s fleet, or None before any."""
        rows = self.db.execute(
            "SELECT overhead_fraction, server_max_rank, server_modules FROM serving_measurements "
            "WHERE model = ? ORDER BY time DESC LIMIT ?",
            (model, CALIBRATION_WINDOW),
        ).fetchall()
        if not rows:
            return None
        fractions = [r[0] for r in rows]
        median = statistics.median(fractions)
        modules = rows[0][2] or "every LoRA-capable module"
        return ServingCalibration(
            overhead_fraction=median,
            samples=len(rows),
            basis=(
                f"median of the {len(rows)} newest post-deploy probes on the serving vLLM fleet "
                f"(range {min(fractions):.2f}..{max(fractions):.2f}; servers wrap {modules}, "
                f"max rank {rows[0][1]})"
            ),
        )


def _record(row: tuple) -> DeploymentRecord:
    latency = LatencyMeasurement(**json.loads(row[3])) if row[3] else None
    return DeploymentRecord(row[0], row[1], row[2], latency, row[4], row[5])
