"""``make run``'s vLLM supervisor: a dead server is reaped (its whole process group) and restarted with backoff.

The supervisor loop runs against a fake process object; the reaping runs against a real stand-in process group
(a shell "server" that forks a child, as vLLM's API server forks its engine core). The real vLLM restart is in
tests/e2e/test_fleet.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from layercard_service.launch import _supervise
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings, VllmStartupError


class FakeVllm:
    """The part of VllmProcess the supervisor uses. ``deaths``: how often it dies again after a restart."""

    log_path = Path("/nonexistent/vllm.log")
    url = "http://127.0.0.1:1"

    def __init__(self, stopping: asyncio.Event, *, failed_starts: int = 0, deaths: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping, self.failed_starts, self.deaths = stopping, failed_starts, deaths
        self.alive = False  # it has just died
        self.calls: list[str] = []
        self.lock = threading.Lock()  # start/stop/wait_ready run in worker threads

    def running(self) -> bool:
        return self.alive

    def stop(self) -> int:
        with self.lock:
            self.calls.append("stop")
        return -9

    def start(self) -> None:
        with self.lock:
            self.calls.append("start")
            if self.failed_starts:
                self.failed_starts -= 1
                raise VllmStartupError("vLLM exited with code 1 before it was ready")

    def wait_ready(self) -> float:
        with self.lock:
            self.calls.append("wait_ready")
            if self.deaths:
                self.deaths -= 1  # up for a moment, then dead again
            else:
                self.alive = True
                self.loop.call_soon_threadsafe(self.stopping.set)
        return 0.0


def _supervised(**fake_options) -> tuple[FakeVllm, list[float]]:
    async def body() -> tuple[FakeVllm, list[float]]:
        stopping = asyncio.Event()
        fake, delays = FakeVllm(stopping, **fake_options), []

        async def sleep(seconds: float) -> None:
            delays.append(seconds)

        await asyncio.wait_for(
            _supervise(fake, stopping, poll_seconds=0.001, backoff=(1.0, 3.0), sleep=sleep), timeout=20
        )
        return fake, delays

    return asyncio.run(body())


def test_a_dead_vllm_is_reaped_then_restarted():
    fake, delays = _supervised()
    assert fake.calls == ["stop", "start", "wait_ready"] and fake.alive
    assert delays == [1.0]


def test_restarts_back_off_exponentially_up_to_the_cap_and_reset_after_success():
    fake, delays = _supervised(failed_starts=3, deaths=1)
    # three failed starts (1, 2, 3 s, then capped), the fourth comes up and dies: the backoff starts over at 1 s.
    assert delays == [1.0, 2.0, 3.0, 3.0, 1.0]
    assert fake.calls.count("start") == 5 and fake.calls.count("stop") == 5 and fake.alive


# --- the real process group ----------------------------------------------------------------------------------

STAND_IN = """#!/bin/sh
# A stand-in for vLLM's API server: forks a long-lived child (the engine core), records its pid, waits.
sleep 600 &
echo $! >> "$STAND_IN_CHILDREN"
exec sleep 600
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it; it holds nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
def test_restart_after_kill_9_reaps_the_orphaned_child_first(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script = tmp_path / "fake-python"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    children = tmp_path / "children"
    children.touch()
    settings = VllmServerSettings(
        model=model,
        served_model_name="stand-in",
        python=str(script),
        stop_grace_s=1.0,
        log_path=tmp_path / "server.log",
        extra_env=(("STAND_IN_CHILDREN", str(children)),),
    )
    server = VllmProcess(settings)

    def child_pids() -> list[int]:
        return [int(line) for line in children.read_text().split()]

    try:
        server.start()
        port, first_leader = server.port, server.pid
        _wait_for(lambda: len(child_pids()) == 1, "the first child's start")
        orphan = child_pids()[0]
        os.kill(first_leader, signal.SIGKILL)  # as `kill -9` of the API server
        _wait_for(lambda: not server.running(), "the leader's death")
        assert _running(orphan)  # the engine core outlives its server

        server.start()
        assert not _running(orphan)  # reaped before the new server takes the port
        assert server.running() and server.pid != first_leader and server.port == port
        _wait_for(lambda: len(child_pids()) == 2, "the second child's start")
    finally:
        server.stop()
    assert not any(_running(pid) for pid in [first_leader, server.pid, *child_pids()])
