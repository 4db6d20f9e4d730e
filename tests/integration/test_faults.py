"""Faults injected into real servers without vLLM: kill -9 of the server mid-job, kill -9 of a worker mid-step,
SIGTERM during a card computation. Each test asserts the end state and that nothing was lost (tests/support/
faults.py: events numbered 1..n, steps that neither skip nor repeat within a run, no non-final job without a
worker, SQLite's integrity check). Disk-full and a second server on one data dir are tested elsewhere."""

from __future__ import annotations

import json
import sqlite3

import pytest
from support.faults import SCENARIOS, lost_data

from layercard_service.persistence.jobs import JobStore

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_leaves_a_consistent_state_and_a_working_server(tmp_path, scenario):
    lost = SCENARIOS[scenario](tmp_path)
    assert lost == [], lost


def test_lost_data_finds_gaps_repeats_orphans_and_unfinished_successes(tmp_path):
    """The checker itself: a state with each kind of loss is reported, a clean one is not."""
    JobStore(tmp_path / "state.db").close()  # the schema
    state = json.dumps({"state": "QUEUED"})
    with sqlite3.connect(tmp_path / "state.db") as db:
        job = (
            "INSERT INTO tuning_jobs (job_id, state, spec, create_time, step, total_steps, worker_pid)"
            " VALUES (?, ?, '{}', 0, ?, ?, ?)"
        )
        db.execute(job, ("clean", "SUCCEEDED", 2, 2, None))
        db.execute(job, ("orphan", "RUNNING", 1, 9, 999_999_999))
        db.execute(job, ("short", "SUCCEEDED", 1, 2, None))
        event = "INSERT INTO tuning_job_events VALUES (?, ?, 0, ?, ?, '')"
        for i, (kind, payload) in enumerate([("state", state), ("step", '{"step": 1}'), ("step", '{"step": 2}')], 1):
            db.execute(event, ("clean", i, kind, payload))
        db.execute(event, ("orphan", 1, "step", '{"step": 1}'))
        db.execute(event, ("orphan", 3, "step", '{"step": 1}'))  # a gap in sequences and a repeated step
    assert lost_data(tmp_path) == [
        "job orphan is RUNNING without a live worker",
        "job orphan: event sequences [1, 3] are not 1..2",
        "job orphan: steps are not reported once each from 1: [1, 1]",
        "job short SUCCEEDED at step 1 of 2",
    ]
