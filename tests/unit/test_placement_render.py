"""The CLI's placement view shows the plan's predicted learning curve and where it comes from."""

from __future__ import annotations

from rich.console import Console

from layercard.v1 import common_pb2, placement_pb2
from layercard_client.cli.render import placement_table


def _text(plan: placement_pb2.Placement) -> str:
    console = Console(width=200, record=True)
    console.print(placement_table(plan))
    return " ".join(console.export_text().split())  # a title may wrap to the table's width


def test_the_curve_is_shown_with_its_learning_rate():
    plan = placement_pb2.Placement(
        layers=[4, 5],
        lora=common_pb2.LoraShape(rank=8),
        steps=37,
        learning_rate=1e-3,
        predicted_curve=[
            placement_pb2.CurvePoint(steps=10, seconds=12.5, gain=0.5, gain_low=0.4, gain_high=0.6),
            placement_pb2.CurvePoint(steps=20, seconds=24.5, gain=0.8, gain_low=0.7, gain_high=0.9),
        ],
    )
    text = _text(plan)
    assert "predicted learning curve at learning rate 0.001" in text
    assert "24.5" in text and "0.9" in text


def test_a_prior_curve_says_so_and_no_curve_shows_no_table():
    prior = placement_pb2.Placement(predicted_curve=[placement_pb2.CurvePoint(steps=10, gain=0.5)])
    assert "(a prior)" in _text(prior)
    assert "learning curve" not in _text(placement_pb2.Placement(layers=[1]))
