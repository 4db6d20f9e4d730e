"""Desired deployments and serving-latency measurements (tables ``deployments``, ``serving_measurements``).

A row in ``deployments`` says "adapter X should be served at version N on every replica of pool P"; the reconcile
loop makes the fleet match it. ``serving_measurements`` keeps every post-load latency probe with the serving shape
it measured (base model, the servers' wrapped module types and max rank, the adapter's rank) and the streams it
ran at once: the planner's vLLM serving-cost model is calibrated from them, and a deploy of a calibrated shape
takes its one-stream figures instead of probing again.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from layercard_service.domain.pools import DEFAULT_POOL
from layercard_service.persistence import as_database
from layercard_service.persistence.database import Database

__all__ = [
    "DeploymentRecord",
    "DeploymentStore",
    "LatencyMeasurement",
    "ServingCalibration",
    "ServingShape",
    "served_name",
]

# Named, not *: where ``budget`` sits depends on how the table was migrated (schema.py, migration 2).
_COLUMNS = "adapter_id, version, state, latency, update_time, budget, pool"
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
    source: str = "probe"  # "probe": measured after this load; "calibration": the serving shape's median
    basis: str = ""
    concurrency: int = 1  # requests at once on each side of a pair


@dataclass(frozen=True)
class ServingShape:
    """What a vLLM adapter's latency overhead depends on: the servers' LoRA settings and the adapter's rank."""

    model: str
    server_modules: tuple[str, ...]  # empty: every LoRA-capable module
    server_max_rank: int
    adapter_rank: int

    def describe(self) -> str:
        modules = ",".join(self.server_modules) or "every LoRA-capable module"
        return (
            f"{self.model}, servers wrapping {modules} at max rank {self.server_max_rank}, "
            f"adapter rank {self.adapter_rank}"
        )


@dataclass(frozen=True)
class DeploymentRecord:
    adapter_id: str
    version: int
    state: str  # READY | DEGRADED
    latency: LatencyMeasurement | None
    update_time: float
    budget: float | None = None  # the max_overhead_fraction it was deployed under
    pool: str = DEFAULT_POOL  # the serving pool whose every replica should hold it

    @property
    def served_name(self) -> str:
        return served_name(self.adapter_id, self.version)


@dataclass(frozen=True)
class ServingCalibration:
    """The fleet's measured vLLM adapter overhead for one base model, as the planner uses it."""

    overhead_fraction: float
    samples: int
    basis: str
    base_ms_per_token: float | None = None  # median base inter-token time of the same probes


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
            f"INSERT OR REPLACE INTO deployments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.adapter_id,
                record.version,
                record.state,
                latency,
                record.update_time,
                record.budget,
                record.pool,
            ),
        )

    def set_state(self, adapter_id: str, version: int, state: str) -> None:
        self.db.execute(
            "UPDATE deployments SET state = ?, update_time = ? WHERE adapter_id = ? AND version = ? AND state != ?",
            (state, time.time(), adapter_id, version, state),
        )

    def delete(self, adapter_id: str) -> bool:
        return self.db.execute("DELETE FROM deployments WHERE adapter_id = ?", (adapter_id,)).rowcount > 0

    def add_measurement(self, shape: ServingShape, adapter_id: str, version: int, m: LatencyMeasurement) -> None:
        self.db.execute(
            "INSERT INTO serving_measurements (time, model, adapter_id, version, server_max_rank, "
            "server_modules, adapter_rank, overhead_fraction, measurement, concurrency) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), shape.model, adapter_id, version, shape.server_max_rank, ",".join(shape.server_modules),
             shape.adapter_rank, m.overhead_fraction, json.dumps(asdict(m)), m.concurrency),
        )  # fmt: skip

    def shape_calibration(
        self, shape: ServingShape, min_samples: int, max_age_seconds: float, now: float | None = None
    ) -> LatencyMeasurement | None:
        """The median figures of the newest one-stream probes of ``shape`` no older than ``max_age_seconds``, as a
        measurement with source "calibration"; None while fewer than ``min_samples`` such probes exist."""
        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT time, measurement FROM serving_measurements WHERE model = ? AND server_modules = ? "
            "AND server_max_rank = ? AND adapter_rank = ? AND concurrency = 1 AND time >= ? "
            "ORDER BY time DESC LIMIT ?",
            (shape.model, ",".join(shape.server_modules), shape.server_max_rank, shape.adapter_rank,
             now - max_age_seconds, CALIBRATION_WINDOW),
        ).fetchall()  # fmt: skip
        if len(rows) < max(1, min_samples):
            return None
        probes = [json.loads(r[1]) for r in rows]  # only probes are stored: a calibrated deploy adds none

        def median(key: str) -> float:
            return statistics.median(float(p.get(key, 0.0)) for p in probes)

        fractions = [float(p["overhead_fraction"]) for p in probes]
        ages = [now - r[0] for r in rows]
        return LatencyMeasurement(
            replica="",
            base_ttft_ms=median("base_ttft_ms"),
            adapter_ttft_ms=median("adapter_ttft_ms"),
            base_inter_token_ms=median("base_inter_token_ms"),
            adapter_inter_token_ms=median("adapter_inter_token_ms"),
            overhead_fraction=statistics.median(fractions),
            samples=len(probes),
            base_latency_ms=median("base_latency_ms"),
            adapter_latency_ms=median("adapter_latency_ms"),
            tokens=int(median("tokens")),
            source="calibration",
            basis=(
                f"median of the {len(probes)} newest latency probes of this serving shape ({shape.describe()}), "
                f"overhead range {min(fractions):.2f}..{max(fractions):.2f}, {min(ages) / 60:.0f} to "
                f"{max(ages) / 60:.0f} minutes old"
            ),
        )

    def calibration(self, model: str) -> ServingCalibration | None:
        """The median overhead of the newest one-stream measurements on ``model``'s fleet, or None before any."""
        rows = self.db.execute(
            "SELECT overhead_fraction, server_max_rank, server_modules, measurement FROM serving_measurements "
            "WHERE model = ? AND concurrency = 1 ORDER BY time DESC LIMIT ?",
            (model, CALIBRATION_WINDOW),
        ).fetchall()
        return _calibration(rows, "post-deploy probes on the serving vLLM fleet")

    def rank_calibrations(
        self, model: str, server_modules: tuple[str, ...], server_max_rank: int, concurrency: int = 1
    ) -> dict[int, ServingCalibration]:
        """Per adapter rank, the median of the newest probes of that serving shape at ``concurrency`` streams
        (ranks recorded: > 0)."""
        key = (model, ",".join(server_modules), server_max_rank, concurrency)
        ranks = self.db.execute(
            "SELECT DISTINCT adapter_rank FROM serving_measurements WHERE model = ? AND server_modules = ? "
            "AND server_max_rank = ? AND concurrency = ? AND adapter_rank > 0",
            key,
        ).fetchall()
        out = {}
        streams = "" if concurrency == 1 else f" at {concurrency} streams"
        for (rank,) in ranks:
            rows = self.db.execute(
                "SELECT overhead_fraction, server_max_rank, server_modules, measurement FROM serving_measurements "
                "WHERE model = ? AND server_modules = ? AND server_max_rank = ? AND concurrency = ? "
                "AND adapter_rank = ? ORDER BY time DESC LIMIT ?",
                (*key, rank, CALIBRATION_WINDOW),
            ).fetchall()
            out[rank] = _calibration(rows, f"post-deploy probes of rank-{rank} adapters{streams}")
        return out

    def concurrencies(self, model: str, server_modules: tuple[str, ...], server_max_rank: int) -> tuple[int, ...]:
        """The stream counts the servers of this shape were probed at, lowest first."""
        rows = self.db.execute(
            "SELECT DISTINCT concurrency FROM serving_measurements WHERE model = ? AND server_modules = ? "
            "AND server_max_rank = ? ORDER BY concurrency",
            (model, ",".join(server_modules), server_max_rank),
        ).fetchall()
        return tuple(r[0] for r in rows)


def _calibration(rows: list[tuple], what: str) -> ServingCalibration | None:
    """Rows of (overhead_fraction, server_max_rank, server_modules, measurement), newest first."""
    if not rows:
        return None
    fractions = [r[0] for r in rows]
    modules = rows[0][2] or "every LoRA-capable module"
    base_ms = [b for b in (json.loads(r[3]).get("base_inter_token_ms", 0.0) for r in rows) if b > 0]
    return ServingCalibration(
        overhead_fraction=statistics.median(fractions),
        samples=len(rows),
        base_ms_per_token=statistics.median(base_ms) if base_ms else None,
        basis=(
            f"median of the {len(rows)} newest {what} (range {min(fractions):.2f}..{max(fractions):.2f}; servers "
            f"wrap {modules}, max rank {rows[0][1]})"
        ),
    )


def _record(row: tuple) -> DeploymentRecord:
    latency = LatencyMeasurement(**json.loads(row[3])) if row[3] else None
    return DeploymentRecord(row[0], row[1], row[2], latency, row[4], row[5], row[6])
