"""The persistence layer: schema migrations (from nothing, and from a state.db the pre-versioning code made),
refusing a newer schema, transactions that roll back whole and leave the connection usable, and writers in
threads and in a second process that wait for the lock instead of failing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

import pytest

from layercard_service.errors import FailedPrecondition, ResourceExhausted
from layercard_service.persistence import DISK_FULL, SCHEMA_TOO_NEW, SCHEMA_VERSION, open_database
from layercard_service.persistence.deployments import DeploymentRecord, DeploymentStore
from layercard_service.persistence.jobs import JobStore
from layercard_service.persistence.schema import schema_version
from layercard_service.persistence.store import Store

# The schema as the code before versioning created it (store.py, tune/job_store.py, serve/deploy_store.py).
OLD_SCHEMA = """
CREATE TABLE layer_cards (card_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    create_time REAL NOT NULL, payload TEXT NOT NULL);
CREATE INDEX layer_cards_by_time ON layer_cards (create_time DESC, card_id);
CREATE TABLE file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime REAL NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE tuning_jobs (job_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, state TEXT NOT NULL, spec TEXT NOT NULL,
    create_time REAL NOT NULL, start_time REAL, end_time REAL, step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL, error_code TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
    result TEXT, worker_pid INTEGER);
CREATE INDEX tuning_jobs_by_time ON tuning_jobs (create_time DESC, job_id);
CREATE TABLE tuning_job_events (job_id TEXT NOT NULL, sequence INTEGER NOT NULL, time REAL NOT NULL,
    kind TEXT NOT NULL, payload TEXT NOT NULL, message TEXT NOT NULL DEFAULT '', PRIMARY KEY (job_id, sequence));
CREATE TABLE adapter_versions (adapter_id TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
    job_id TEXT NOT NULL, create_time REAL NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (adapter_id, version));
CREATE TABLE serving_measurements (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model TEXT NOT NULL,
    adapter_id TEXT NOT NULL, version INTEGER NOT NULL, server_max_rank INTEGER NOT NULL,
    server_modules TEXT NOT NULL, overhead_fraction REAL NOT NULL, measurement TEXT NOT NULL);
INSERT INTO layer_cards VALUES ('card-1', 'fp-1', 'builtin:tiny', 1.0, '{"layers": []}');
INSERT INTO adapter_versions VALUES ('bot', 1, '/a/bot/1', 'job-a', 2.0, '{"model": "builtin:tiny"}');
INSERT INTO tuning_jobs (job_id, state, spec, create_time, total_steps) VALUES ('job-a', 'SUCCEEDED', '{}', 1.5, 5);
"""
DEPLOYMENTS_BEFORE_BUDGET = """CREATE TABLE deployments (adapter_id TEXT PRIMARY KEY, version INTEGER NOT NULL,
    state TEXT NOT NULL, latency TEXT, update_time REAL NOT NULL);
INSERT INTO deployments VALUES ('bot', 1, 'READY', NULL, 3.0);"""
DEPLOYMENTS_WITH_BUDGET = """CREATE TABLE deployments (adapter_id TEXT PRIMARY KEY, version INTEGER NOT NULL,
    state TEXT NOT NULL, latency TEXT, update_time REAL NOT NULL, budget REAL);
INSERT INTO deployments VALUES ('bot', 1, 'READY', NULL, 3.0, 0.25);"""


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_an_empty_file_is_migrated_to_the_current_version(tmp_path):
    db = open_database(tmp_path / "state.db")
    assert schema_version(db) == SCHEMA_VERSION == 6
    assert {"layer_cards", "tuning_jobs", "adapter_versions", "deployments", "schema_version"} <= _tables(db.path)
    assert "budget" in db.columns(db, "deployments")
    assert db.columns(db, "tuning_job_workers") == {"job_id", "token_sha256", "batch"}
    assert "adapter_rank" in db.columns(db, "serving_measurements")
    assert "pool" in db.columns(db, "deployments") and "concurrency" in db.columns(db, "serving_measurements")
    db.close()
    db = open_database(tmp_path / "state.db")  # opening again applies nothing twice
    versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(1,), (2,), (3,), (4,), (5,), (6,)]
    db.close()


@pytest.mark.parametrize("deployments", [DEPLOYMENTS_BEFORE_BUDGET, DEPLOYMENTS_WITH_BUDGET])
def test_a_state_db_from_before_versioning_upgrades_with_its_rows(tmp_path, deployments):
    with sqlite3.connect(tmp_path / "state.db") as old:
        old.executescript(OLD_SCHEMA + deployments)
    db = open_database(tmp_path / "state.db")
    assert schema_version(db) == SCHEMA_VERSION
    store, jobs, deploys = Store(tmp_path, db), JobStore(db), DeploymentStore(db)
    assert store.get_card("card-1").payload == {"layers": []}
    assert [(v.adapter_id, v.version, v.path) for v in jobs.versions("bot")] == [("bot", 1, "/a/bot/1")]
    assert jobs.count_by_state()["SUCCEEDED"] == 1
    record = deploys.get("bot")
    assert (record.version, record.state) == (1, "READY")
    assert record.budget == (0.25 if "budget" in deployments else None)
    assert record.pool == "default"  # deployed before pools: the one pool a single-pool service has
    deploys.put(DeploymentRecord("chat", 2, "READY", None, 4.0, budget=0.5, pool="lean"))  # migrated columns write
    assert (deploys.get("chat").budget, deploys.get("chat").pool) == (0.5, "lean")
    db.close()


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    open_database(tmp_path / "state.db").close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(FailedPrecondition) as err:
        JobStore(tmp_path / "state.db")
    assert err.value.reason == SCHEMA_TOO_NEW
    assert f"schema version {SCHEMA_VERSION + 1}" in err.value.message and "newer" in err.value.message


def test_a_failed_transaction_rolls_back_and_the_database_stays_usable(tmp_path):
    db = open_database(tmp_path / "state.db")
    with pytest.raises(RuntimeError, match="boom"), db.transaction() as tx:
        tx.execute("INSERT INTO file_hashes VALUES ('a', 1, 1.0, 'x')")
        raise RuntimeError("boom")
    assert db.execute("SELECT COUNT(*) FROM file_hashes").fetchone() == (0,)
    with db.transaction() as tx:
        tx.execute("INSERT INTO file_hashes VALUES ('b', 1, 1.0, 'y')")
    assert db.execute("SELECT path FROM file_hashes").fetchall() == [("b",)]
    with pytest.raises(RuntimeError, match="closed"):
        tx.execute("SELECT 1")  # a session does not outlive its transaction
    db.close()


class FailingCommit:
    """Wraps a connection; its next COMMIT fails as SQLite's does when the WAL cannot grow."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection, self.failures = connection, 1

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.connection.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.connection, name)


def test_a_failed_commit_is_disk_full_rolls_back_and_leaves_the_connection_usable(tmp_path):
    db = open_database(tmp_path / "state.db")
    db._connection = FailingCommit(db._connection)
    with pytest.raises(ResourceExhausted) as err, db.transaction() as tx:
        tx.execute("INSERT INTO file_hashes VALUES ('a', 1, 1.0, 'x')")
    assert err.value.reason == DISK_FULL
    assert db.execute("SELECT COUNT(*) FROM file_hashes").fetchone() == (0,)
    with db.transaction() as tx:  # a BEGIN works again: the failed COMMIT's transaction was rolled back
        tx.execute("INSERT INTO file_hashes VALUES ('a', 1, 1.0, 'x')")
    assert db.execute("SELECT COUNT(*) FROM file_hashes").fetchone() == (1,)
    db.close()


def test_a_nested_transaction_on_one_thread_is_refused_not_deadlocked(tmp_path):
    db = open_database(tmp_path / "state.db")
    with db.transaction() as tx:
        with pytest.raises(RuntimeError, match="already open"), db.transaction():
            pass
        tx.execute("INSERT INTO file_hashes VALUES ('a', 1, 1.0, 'x')")
        assert db.execute("SELECT COUNT(*) FROM file_hashes").fetchone() == (1,)  # joins this thread's transaction
    db.close()


def _count_up(db, rounds: int) -> None:
    for _ in range(rounds):
        with db.transaction() as tx:
            (value,) = tx.execute("SELECT sha256 FROM file_hashes WHERE path = 'counter'").fetchone()
            tx.execute("UPDATE file_hashes SET sha256 = ? WHERE path = 'counter'", (str(int(value) + 1),))


SECOND_PROCESS = """
import sys
from layercard_service.persistence import open_database
db = open_database(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with db.transaction() as tx:
        (value,) = tx.execute("SELECT sha256 FROM file_hashes WHERE path = 'counter'").fetchone()
        tx.execute("UPDATE file_hashes SET sha256 = ? WHERE path = 'counter'", (str(int(value) + 1),))
db.close()
"""


def test_writers_in_threads_and_in_another_process_wait_for_the_lock(tmp_path):
    """Read-then-write increments from 4 threads on a shared Database, a second Database of this process and
    another process (as a worker opens state.db): none fails with "database is locked", none is lost."""
    shared, second = open_database(tmp_path / "state.db"), open_database(tmp_path / "state.db")
    shared.execute("INSERT INTO file_hashes VALUES ('counter', 0, 0.0, '0')")
    rounds = 60
    process = subprocess.Popen([sys.executable, "-c", SECOND_PROCESS, str(shared.path), str(rounds)])
    errors: list[BaseException] = []

    def work(db) -> None:
        try:
            _count_up(db, rounds)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(db,)) for db in (shared, shared, shared, shared, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert process.wait(timeout=120) == 0
    assert errors == []
    assert shared.execute("SELECT sha256 FROM file_hashes WHERE path = 'counter'").fetchone() == (str(6 * rounds),)
    shared.close()
    second.close()


def test_only_the_persistence_layer_imports_sqlite3():
    import pathlib

    import layercard_service

    root = pathlib.Path(layercard_service.__file__).parent
    importers = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if any(line.strip().startswith(("import sqlite3", "from sqlite3")) for line in p.read_text().splitlines())
    }
    assert importers and all(path.startswith("persistence/") for path in importers), importers


def test_a_publication_that_fails_inside_the_transition_leaves_neither_version_nor_state(tmp_path):
    from layercard_service.data.sources import DatasetRequest
    from layercard_service.domain.jobs import Hyperparameters, JobSpec, JobState, PlacementSpec
    from layercard_service.persistence.adapter_versions import AdapterVersion, insert_version, next_version

    spec = JobSpec("builtin:tiny", DatasetRequest(builtin="builtin:cipher"), None, PlacementSpec(layers=(1,)),
                   Hyperparameters(steps=5), "bot")  # fmt: skip
    jobs = JobStore(tmp_path / "state.db")
    jobs.create("job-a", None, spec, 5)
    jobs.transition("job-a", [JobState.QUEUED], JobState.RUNNING)

    def publish(tx):  # the session of the transition's own transaction, not a raw connection
        insert_version(tx, AdapterVersion("bot", next_version(tx, "bot"), "/a/bot/1", "job-a", 1.0, {}))
        raise OSError("rename failed")

    with pytest.raises(OSError, match="rename failed"):
        jobs.transition("job-a", [JobState.RUNNING], JobState.SUCCEEDED, "done", result=publish)
    assert jobs.state("job-a") == JobState.RUNNING and jobs.versions("bot") == []
    jobs.close()
