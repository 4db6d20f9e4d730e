"""Errors that echo what the caller sent still fit the trailers a default client accepts (16 KiB of metadata)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from layercard.v1 import common_pb2, tuning_pb2, tuning_pb2_grpc
from layercard_service.api.interceptors import clip

HUGE = ["a" * 7000, "é" * 150_000, "\x00\n" * 20_000]


@pytest.mark.parametrize("text", HUGE, ids=["ascii", "two-byte", "control"])
def test_a_huge_echoed_value_still_gets_its_status_and_details(server, text):
    with grpc.insecure_channel(server.address) as channel:
        jobs = tuning_pb2_grpc.TuningServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            jobs.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=text), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in rpc_status.from_call(err.value).details)
        assert bad.field_violations[0].field == "name"
        with pytest.raises(grpc.RpcError) as err:
            request = tuning_pb2.CreateTuningJobRequest(
                model="builtin:tiny", training_data=common_pb2.DatasetSource(path=text), adapter_id=text[:60]
            )
            jobs.CreateTuningJob(request, timeout=10)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_clip_cuts_at_a_character_boundary():
    assert clip("short", 10) == "short"
    cut = clip("é" * 10, 9)
    assert cut.endswith("...") and len(cut.encode()) <= 9 and cut[:-3] == "é" * 3
