"""ComputeLayerCard's performance column over a real socket: computed when asked, stored, and validated."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc, placement_pb2, placement_pb2_grpc


def _request(**overrides) -> layer_card_pb2.ComputeLayerCardRequest:
    fields = dict(
        model="builtin:tiny",
        dataset=common_pb2.DatasetSource(builtin="builtin:cipher"),
        probe_size=32,
        max_seq_len=48,
        compute_performance=True,
        performance_steps=2,
    )
    return layer_card_pb2.ComputeLayerCardRequest(**{**fields, **overrides})


def test_card_with_the_performance_column(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        events = list(stub.ComputeLayerCard(_request(), timeout=600))
        phases = [e.progress.phase for e in events if e.HasField("progress")]
        card = events[-1].card
        assert "performance" in phases
        assert card.settings.compute_performance and card.settings.performance_steps == 2
        assert len(card.layers) == 8 and all(layer.HasField("measured_gain") for layer in card.layers)
        stored = stub.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=card.name), timeout=10)
        assert [layer.measured_gain for layer in stored.layers] == [layer.measured_gain for layer in card.layers]
        # the pilot curves, at the checkpoints the card names, end at the column's figure
        assert list(card.performance_checkpoints) == [1, 2]
        assert all(list(layer.measured_gain_curve)[-1] == layer.measured_gain for layer in card.layers)
        curves = [list(x.measured_gain_curve) for x in card.layers]
        assert [list(x.measured_gain_curve) for x in stored.layers] == curves
        # one all-layer pilot per rate of the default grid, stored too
        rates = [p.learning_rate for p in card.learning_rate_pilots]
        assert rates == [1e-3, 3e-3] and all(len(p.gain_curve) == 2 for p in card.learning_rate_pilots)
        assert stored.learning_rate_pilots == card.learning_rate_pilots
        # the planner plans at one of them and says so
        plan = placement_pb2_grpc.PlacementServiceStub(channel).PlanPlacement(
            placement_pb2.PlanPlacementRequest(layer_card=card.name, objective=placement_pb2.OBJECTIVE_ACCURACY),
            timeout=30,
        )
        assert plan.learning_rate in rates and "all-layer pilot" in plan.predicted_gain.basis


def test_a_grid_of_learning_rates_is_kept_with_the_card(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        request = _request(performance_learning_rates=[3e-4], performance_steps=1, probe_size=16)
        card = list(stub.ComputeLayerCard(request, timeout=600))[-1].card
        assert list(card.settings.performance_learning_rates) == [3e-4]
        assert [p.learning_rate for p in card.learning_rate_pilots] == [3e-4, 1e-3]  # the pilots' rate is added


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("performance_learning_rates", [0.0]),
        ("performance_learning_rates", [1.5]),
        ("performance_learning_rates", [float("nan")]),
        ("performance_learning_rates", [1e-3] * 9),
        ("performance_steps", -1),
        ("performance_steps", 10_001),
    ],
)
def test_bad_performance_settings_are_invalid_argument(server, field, value):
    with grpc.insecure_channel(server.address) as channel:
        stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ComputeLayerCard(_request(**{field: value}), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = error_details_pb2.BadRequest()
        next(d for d in rpc_status.from_call(err.value).details if d.Unpack(bad))
        assert [v.field for v in bad.field_violations] == [field]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
