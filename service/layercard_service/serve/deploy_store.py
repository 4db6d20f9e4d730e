"""Desired deployments and serving-latency measurements in SQLite (the service's ``state.db``).

A row in ``deployments`` says "adapter X should be served at version N on every replica"; the reconcile loop
makes the fleet match it. ``serving_measurements`` keeps every post-load latency probe: the deploy shows the
newest, and the planner's vLLM serving-cost model is calibrated from them.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from layercard_service.store import storage_errors

__all__ = ["DeploymentRecord", "DeploymentStore", "LatencyMeasurement", "ServingCalibration"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    adapter_id  TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    latency     TEXT,
    update_time REAL NOT NULL,
    budget      REAL
);
CREATE TABLE IF NOT EXISTS serving_measurements (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    time              REAL NOT NULL,
    model             TEXT NOT NULL,
    adapter_id        TEXT NOT NULL,
    version           INTEGER NOT NULL,
    server_max_rank   INTEGER NOT NULL,
    server_modules    TEXT NOT NULL,
    overhead_fraction REAL NOT NULL,
    measurement       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS serving_measurements_by_model ON serving_measurements (model, time DESC);
"""

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
    def __init__(self, db_path: Path) -> None:
        self._dir = Path(db_path).parent
        self._lock = threading.Lock()
        with self._lock, storage_errors(self._dir):
            self._dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(deployments)")}
            if "budget" not in columns:  # a state.db from before budgets were kept
                self._db.execute("ALTER TABLE deployments ADD COLUMN budget REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, adapter_id: str) -> DeploymentRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM deployments WHERE adapter_id = ?", (adapter_id,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[DeploymentRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deployments ORDER BY adapter_id").fetchall()
        return [_record(r) for r in rows]

    def put(self, record: DeploymentRecord) -> None:
        latency = json.dumps(asdict(record.latency)) if record.latency else None
        with self._lock, storage_errors(self._dir):
            self._db.execute(
                "INSERT OR REPLACE INTO deployments VALUES (?, ?, ?, ?, ?, ?)",
                (record.adapter_id, record.version, record.state, latency, record.update_time, record.budget),
            )

    def set_state(self, adapter_id: str, version: int, state: str) -> None:
        with self._lock, storage_errors(self._dir):
            self._db.execute(
                "UPDATE deployments SET state = ?, update_time = ? WHERE adapter_id = ? AND version = ? AND state != ?",
                (state, time.time(), adapter_id, version, state),
            )

    def delete(self, adapter_id: str) -> bool:
        with self._lock, storage_errors(self._dir):
            return self._db.execute("DELETE FROM deployments WHERE adapter_id = ?", (adapter_id,)).rowcount > 0

    def add_measurement(
        self, model: str, adapter_id: str, version: int, max_rank: int, modules: tuple[str, ...], m: LatencyMeasurement
    ) -> None:
        with self._lock, storage_errors(self._dir):
            self._db.execute(
                "INSERT INTO serving_measurements (time, model, adapter_id, version, server_max_rank, "
                "server_modules, overhead_fraction, measurement) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), model, adapter_id, version, max_rank, ",".join(modules), m.overhead_fraction,
                 json.dumps(asdict(m))),
            )  # fmt: skip

    def calibration(self, model: str) -> ServingCalibration | None:
        """The median overhead of the newest measurements on ``model``'s fleet, or None before any."""
        with self._lock:
            rows = self._db.execute(
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
