"""Property-based fuzz of every RPC of the five services against one real server over a socket.

Requests come from the protobuf descriptors (any field, any value: control characters, NUL, huge and negative
numbers, NaN, missing and repeated fields, oneofs) and from valid requests with one field changed, so the fuzz
reaches the deep checks. After every call: never INTERNAL or UNKNOWN, health still SERVING. At the end, what
existed before the fuzz is still listed and usable. Derandomized: CI runs the same cases every time.
"""

from __future__ import annotations

import grpc
import pytest
from support.fuzz_server import check_resources, fuzz_server
from support.grpc_fuzz import (
    EXAMPLES_DEFAULT,
    EXAMPLES_PER_RPC,
    Tally,
    run_target,
    serving,
    targets,
)

from layercard.v1 import tuning_pb2, tuning_pb2_grpc

pytestmark = pytest.mark.slow

TALLY = Tally()  # module-level: the last test checks the total, and `make bench BENCH=hardening` reports it
TARGETS = targets()
MIN_CASES = 2000


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # cards compute in this process: one thread, as the workers, on a busy machine
    try:
        with fuzz_server(tmp_path_factory.mktemp("fuzz")) as (_server, channel, env):
            yield channel, env
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("target", TARGETS, ids=[t.method for t in TARGETS])
def test_rpc_never_fails_internally_and_the_server_keeps_serving(fuzzed, target):
    if target.method == "DeleteTuningJob" and not hasattr(tuning_pb2, "DeleteTuningJobRequest"):
        pytest.skip("DeleteTuningJob is not in this contract yet")
    channel, env = fuzzed
    run_target(channel, env, target, EXAMPLES_PER_RPC.get(target.method, EXAMPLES_DEFAULT), TALLY)
    assert TALLY.statuses.get(target.method), "no case ran"
    failures = TALLY.failures_of(target.method)
    kinds = "\n".join(map(str, TALLY.distinct(failures)))
    assert not failures, f"{len(failures)} failing cases; one of each kind:\n{kinds}"
    assert serving(channel)


def test_resources_made_before_the_fuzz_are_still_there_and_usable(fuzzed):
    channel, env = fuzzed
    assert check_resources(channel, env) == []
    # The long job still runs its worker: cancelled now, it ends with every event in order.
    stub = tuning_pb2_grpc.TuningServiceStub(channel)
    stub.CancelTuningJob(tuning_pb2.CancelTuningJobRequest(name=env.job), timeout=30)
    events = list(stub.WatchTuningJob(tuning_pb2.WatchTuningJobRequest(name=env.job), timeout=300))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    steps = [e.step.step for e in events if e.WhichOneof("event") == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert events[-1].state_change == tuning_pb2.TUNING_JOB_STATE_CANCELLED
    ran = {t.method for t in TARGETS} - {"DeleteTuningJob"} <= set(TALLY.statuses)
    if ran:  # the whole file ran (not a -k selection): the fuzz was as large as CI promises
        assert TALLY.cases >= MIN_CASES, TALLY.statuses
    with pytest.raises(grpc.RpcError) as err:  # and a bad request is still refused the ordinary way
        stub.GetTuningJob(tuning_pb2.GetTuningJobRequest(name="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
