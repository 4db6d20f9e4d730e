"""Layer Cards to and from plain dicts: the stored form (JSON in SQLite) and the JSON export."""

from __future__ import annotations

import dataclasses

from layercard_service.domain.cards import (
    CardDataset,
    CardSettings,
    CostCalibration,
    LayerCardData,
    LayerCardRow,
    LearningRatePilot,
    ModuleCard,
    PlacementTiming,
    ServingCostCard,
    TrainingCostCard,
)

__all__ = ["card_to_dict", "card_from_dict"]


def card_to_dict(card: LayerCardData) -> dict:
    return dataclasses.asdict(card)


def _training_cost(raw: dict) -> TrainingCostCard:
    fields = dict(raw)
    calibration = fields.pop("calibration", None)  # absent on cards calibrated from one hooked step per block
    if calibration is not None:
        calibration = dict(calibration)
        for key in ("fit", "held_out"):
            calibration[key] = [PlacementTiming(**timing) for timing in calibration[key]]
        calibration = CostCalibration(**calibration)
    return TrainingCostCard(calibration=calibration, **fields)


def card_from_dict(raw: dict) -> LayerCardData:
    fields = dict(raw)
    settings = dict(fields.pop("settings"))
    settings["target_modules"] = tuple(settings["target_modules"])
    settings["performance_learning_rates"] = tuple(settings.get("performance_learning_rates", ()))
    rows = []
    for row in fields.pop("layers"):
        row = dict(row)
        row["modules"] = [ModuleCard(**m) for m in row["modules"]]
        rows.append(LayerCardRow(**row))
    dataset = fields.pop("dataset", None)  # absent on cards stored before it was recorded
    pilots = [LearningRatePilot(**p) for p in fields.pop("learning_rate_pilots", ())]
    return LayerCardData(
        learning_rate_pilots=pilots,
        dataset=CardDataset(**dataset) if dataset is not None else None,
        settings=CardSettings(**settings),
        layers=rows,
        training_cost=_training_cost(fields.pop("training_cost")),
        serving_cost=ServingCostCard(**{k: v for k, v in fields.pop("serving_cost").items() if k != "vllm_pools"}),
        **fields,
    )
