"""The versioned schema of ``state.db``: an ordered list of migrations, applied when a database is opened.

``schema_version`` holds one row per applied migration; the database's version is the highest. Migration 1 is
the schema as it stood before versioning, written with ``IF NOT EXISTS`` so that a state.db made by that code
(which has tables but no ``schema_version``) upgrades in place with its rows. A database newer than this code
is refused: an older build must not write into a schema it does not know.

A new migration is appended to ``MIGRATIONS`` (never edit a released one); it runs inside the same
transaction as its ``schema_version`` row, so a crash leaves the database at the old version or the new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from layercard_service.errors import FailedPrecondition
from layercard_service.persistence.database import Database, Session

__all__ = ["MIGRATIONS", "SCHEMA_TOO_NEW", "SCHEMA_VERSION", "Migration", "migrate", "schema_version"]

SCHEMA_TOO_NEW = "SCHEMA_TOO_NEW"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Database, Session], None]


_V1_TABLES = (
    # layer cards and the file hash cache (persistence/store.py)
    """CREATE TABLE IF NOT EXISTS layer_cards (
        card_id     TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        model       TEXT NOT NULL,
        create_time REAL NOT NULL,
        payload     TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS layer_cards_by_time ON layer_cards (create_time DESC, card_id)",
    """CREATE TABLE IF NOT EXISTS file_hashes (
        path   TEXT PRIMARY KEY,
        size   INTEGER NOT NULL,
        mtime  REAL NOT NULL,
        sha256 TEXT NOT NULL
    )""",
    # tuning jobs, their events, adapter versions (persistence/jobs.py, persistence/adapter_versions.py)
    """CREATE TABLE IF NOT EXISTS tuning_jobs (
        job_id        TEXT PRIMARY KEY,
        request_id    TEXT UNIQUE,
        state         TEXT NOT NULL,
        spec          TEXT NOT NULL,
        create_time   REAL NOT NULL,
        start_time    REAL,
        end_time      REAL,
        step          INTEGER NOT NULL DEFAULT 0,
        total_steps   INTEGER NOT NULL,
        error_code    TEXT NOT NULL DEFAULT '',
        error_message TEXT NOT NULL DEFAULT '',
        result        TEXT,
        worker_pid    INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS tuning_jobs_by_time ON tuning_jobs (create_time DESC, job_id)",
    """CREATE TABLE IF NOT EXISTS tuning_job_events (
        job_id   TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        time     REAL NOT NULL,
        kind     TEXT NOT NULL,
        payload  TEXT NOT NULL,
        message  TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, sequence)
    )""",
    """CREATE TABLE IF NOT EXISTS adapter_versions (
        adapter_id  TEXT NOT NULL,
        version     INTEGER NOT NULL,
        path        TEXT NOT NULL,
        job_id      TEXT NOT NULL,
        create_time REAL NOT NULL,
        metadata    TEXT NOT NULL,
        PRIMARY KEY (adapter_id, version)
    )""",
    # desired deployments and latency probes (persistence/deployments.py), as first released: no budget column
    """CREATE TABLE IF NOT EXISTS deployments (
        adapter_id  TEXT PRIMARY KEY,
        version     INTEGER NOT NULL,
        state       TEXT NOT NULL,
        latency     TEXT,
        update_time REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS serving_measurements (
        id                INTEGER PRIMARY KEY AUTOINCREMENT,
        time              REAL NOT NULL,
        model             TEXT NOT NULL,
        adapter_id        TEXT NOT NULL,
        version           INTEGER NOT NULL,
        server_max_rank   INTEGER NOT NULL,
        server_modules    TEXT NOT NULL,
        overhead_fraction REAL NOT NULL,
        measurement       TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS serving_measurements_by_model ON serving_measurements (model, time DESC)",
)


def _v1_tables(db: Database, tx: Session) -> None:
    for statement in _V1_TABLES:
        tx.execute(statement)


def _v2_deployment_budget(db: Database, tx: Session) -> None:
    # A state.db from before versioning may have the column already (the ad-hoc ALTER TABLE of that code).
    if "budget" not in db.columns(tx, "deployments"):
        tx.execute("ALTER TABLE deployments ADD COLUMN budget REAL")


def _v3_worker_credentials(db: Database, tx: Session) -> None:
    tx.execute(
        """CREATE TABLE IF NOT EXISTS tuning_job_workers (
            job_id       TEXT PRIMARY KEY,
            token_sha256 TEXT NOT NULL UNIQUE,
            batch        INTEGER NOT NULL DEFAULT 0
        )"""
    )


def _v4_measurement_rank(db: Database, tx: Session) -> None:
    if "adapter_rank" not in db.columns(tx, "serving_measurements"):
        tx.execute("ALTER TABLE serving_measurements ADD COLUMN adapter_rank INTEGER NOT NULL DEFAULT 0")
    tx.execute(
        "CREATE INDEX IF NOT EXISTS serving_measurements_by_shape "
        "ON serving_measurements (model, server_modules, server_max_rank, adapter_rank, time DESC)"
    )


def _v5_deployment_pool(db: Database, tx: Session) -> None:
    if "pool" not in db.columns(tx, "deployments"):
        # 'default': domain/pools.py DEFAULT_POOL, written out: a migration never changes once released.
        tx.execute("ALTER TABLE deployments ADD COLUMN pool TEXT NOT NULL DEFAULT 'default'")


def _v6_measurement_concurrency(db: Database, tx: Session) -> None:
    if "concurrency" not in db.columns(tx, "serving_measurements"):
        tx.execute("ALTER TABLE serving_measurements ADD COLUMN concurrency INTEGER NOT NULL DEFAULT 1")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "cards, file hashes, tuning jobs and events, adapter versions, deployments, measurements", _v1_tables),
    Migration(2, "deployments.budget: the max_overhead_fraction an adapter was deployed under", _v2_deployment_budget),
    Migration(
        3, "tuning_job_workers: each job's worker credential (its hash) and last recorded batch", _v3_worker_credentials
    ),
    Migration(
        4,
        "serving_measurements.adapter_rank: the serving shape a probe measured (0: not recorded)",
        _v4_measurement_rank,
    ),
    Migration(
        5, "deployments.pool: the serving pool an adapter is deployed to (before: the one pool)", _v5_deployment_pool
    ),
    Migration(
        6,
        "serving_measurements.concurrency: the streams a probe ran at once (before: one)",
        _v6_measurement_concurrency,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(db: Database, session: Session | None = None) -> int:
    """The database's version: 0 for an empty file or one made before versioning."""
    if session is None and not db.has_table("schema_version"):
        return 0
    row = (session or db).execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0) if row else 0


def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Brings ``db`` to the newest version in one transaction; returns the version. Refuses a newer database."""
    latest = migrations[-1].version
    current = schema_version(db)  # the common case, already current, takes no write lock
    if current == latest:
        return current
    _refuse_newer(db, current, latest)
    with db.transaction() as tx:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_time REAL NOT NULL)"
        )
        current = schema_version(db, tx)  # again under the write lock: another process may have migrated
        _refuse_newer(db, current, latest)
        for migration in migrations:
            if migration.version > current:
                migration.apply(db, tx)
                tx.execute(
                    "INSERT INTO schema_version (version, description, applied_time) VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time()),
                )
    return latest


def _refuse_newer(db: Database, current: int, latest: int) -> None:
    if current > latest:
        raise FailedPrecondition(
            f"{db.path} has schema version {current}, newer than this build knows ({latest}): it was written by a "
            "newer layercard; run that version (or newer), or point --data-dir at another directory",
            reason=SCHEMA_TOO_NEW,
            metadata={"path": str(db.path), "schema_version": str(current), "known_version": str(latest)},
        )
