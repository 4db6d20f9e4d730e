"""The worker's Reporter against a fake channel and a fake clock: buffering while the service is away, resends
with the same batch number (recorded once), exponential backoff, a bounded buffer, and the exit codes of a
worker that loses the service or its credential."""

from __future__ import annotations

import grpc
import pytest

from layercard_service.domain.jobs import JobState
from layercard_service.persistence.jobs import NewEvent
from layercard_service.trainer import worker
from layercard_service.trainer.reporter import CredentialRefused, Reporter, ServiceLost, Unreachable


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeChannel:
    """The service's side as runners/worker_reports.py keeps it: batches recorded once by number."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down = False
        self.down_until: float | None = None  # down until the clock reaches this
        self.lose_answer_once = False  # record the next batch, then fail as if its answer was lost
        self.recorded: list[str] = []
        self.seen_batch = 0
        self.calls: list[int] = []
        self.state = JobState.RUNNING

    def _check(self) -> None:
        if self.down or (self.down_until is not None and self.clock.now < self.down_until):
            raise Unreachable("UNAVAILABLE: connection refused")

    def report(self, batch, events, step, worker_pid) -> JobState:
        self.calls.append(batch)
        self._check()
        if batch == 0 or batch > self.seen_batch:
            self.recorded += [e.message for e in events]
            self.seen_batch = max(self.seen_batch, batch)
        if self.lose_answer_once and events:
            self.lose_answer_once = False
            raise Unreachable("DEADLINE_EXCEEDED: the answer was lost")
        return self.state

    def get_job(self):
        self._check()
        raise AssertionError("not used")

    def finish(self, finish):
        self._check()
        return True, finish.outcome, ""

    def close(self) -> None:
        pass


@pytest.fixture
def fake():
    clock = FakeClock()
    channel = FakeChannel(clock)
    reporter = Reporter(channel, interval=1.0, lost_after=60.0, clock=clock, sleep=clock.sleep)
    return clock, channel, reporter


def _note(i: int) -> NewEvent:
    return NewEvent("note", {}, f"e{i}")


def test_events_wait_in_the_buffer_while_the_service_is_away_and_arrive_once_in_order(fake):
    clock, channel, reporter = fake
    channel.down = True
    for i in range(5):
        reporter.add(_note(i), urgent=True)  # training goes on: no add waits for the service
    assert clock.sleeps == [] and channel.recorded == [] and reporter.pending == 5
    assert reporter.state() == JobState.RUNNING  # the last state it knew
    channel.down = False
    assert reporter.flush()
    assert channel.recorded == [f"e{i}" for i in range(5)] and reporter.pending == 0


def test_a_batch_whose_answer_was_lost_is_sent_again_with_its_number_and_recorded_once(fake):
    _, channel, reporter = fake
    channel.lose_answer_once = True
    reporter.add(_note(0))
    reporter.add(_note(1))
    assert not reporter.flush(wait=False)  # no answer: the batch stays unacknowledged
    reporter.add(_note(2))
    assert reporter.flush()
    assert channel.calls[:2] == [1, 1] and channel.calls[2] == 2  # the same batch again, then the next
    assert channel.recorded == ["e0", "e1", "e2"]


def test_waits_grow_exponentially_and_a_service_gone_too_long_is_lost(fake):
    clock, channel, reporter = fake
    channel.down = True
    reporter.add(_note(0))
    with pytest.raises(ServiceLost):
        reporter.flush()
    assert clock.sleeps[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2] and max(clock.sleeps) == 5.0
    assert 60.0 <= clock.now < 66.0


def test_a_full_buffer_waits_for_the_service_and_loses_nothing(fake):
    clock, channel, _ = fake
    reporter = Reporter(channel, interval=1000.0, lost_after=60.0, max_buffered=3, clock=clock, sleep=clock.sleep)
    channel.down_until = 2.0  # back after two seconds
    for i in range(3):
        reporter.add(_note(i))
    assert clock.now >= 2.0 and channel.recorded == ["e0", "e1", "e2"]


def test_the_cancel_poll_reads_the_state_before_every_step_while_the_service_answers(fake):
    _, channel, reporter = fake
    assert reporter.state() == JobState.RUNNING
    channel.state = JobState.CANCELLING
    assert reporter.state() == JobState.CANCELLING  # no interval to wait: a cancel stops the next step
    assert channel.calls == [0, 0]


@pytest.mark.parametrize(
    "error, code",
    [(Unreachable("UNAVAILABLE"), 75), (CredentialRefused("UNAUTHENTICATED"), 77)],
)
def test_a_worker_without_the_service_or_its_credential_exits_with_its_code(tmp_path, error, code):
    class Failing:
        def get_job(self):
            raise error

    settings = worker.parse_args(["--data-dir", str(tmp_path), "--job-id", "job-a", "--service-lost-seconds", "0"])
    assert worker.run_job(Failing(), settings) == code


def test_the_worker_needs_the_service_address_and_its_token(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERCARD_WORKER_TOKEN", raising=False)
    assert worker.main(["--data-dir", str(tmp_path), "--job-id", "job-a", "--service-address", "127.0.0.1:1"]) == 2
    assert not (tmp_path / "state.db").exists()


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "from the test"

    def trailing_metadata(self) -> tuple:
        return ()


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unreachable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Unreachable),
        # A service that stops cancels the calls in flight: the worker trains on, as while it is away (a CI run
        # saw the job fail here when the service stopped mid-report).
        (grpc.StatusCode.CANCELLED, Unreachable),
        (grpc.StatusCode.UNAUTHENTICATED, CredentialRefused),
    ],
)
def test_a_grpc_channel_maps_what_the_service_answered(code, kind):
    from layercard_service.trainer.reporter import GrpcChannel

    channel = GrpcChannel("127.0.0.1:1", "token", "job-x")

    def method(request, **kwargs):
        raise _Failed(code)

    try:
        with pytest.raises(kind):
            channel._call(method, None)
    finally:
        channel.close()
