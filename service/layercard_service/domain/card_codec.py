"""Layer Cards to and from plain dicts: the stored form (JSON in SQLite) and the JSON export."""

from __future__ import annotations

import dataclasses

from layercard_service.domain.cards import (
    CardDataset,
    CardSettings,
    LayerCardData,
    LayerCardRow,
    ModuleCard,
    ServingCostCard,
    TrainingCostCard,
)

__all__ = ["card_to_dict", "card_from_dict"]


def card_to_dict(card: LayerCardData) -> dict:
    return dataclasses.asdict(card)


def card_from_dict(raw: dict) -> LayerCardData:
    fields = dict(raw)
    settings = dict(fields.pop("settings"))
    settings["target_modules"] = tuple(settings["target_modules"])
    rows = []
    for row in fields.pop("layers"):
        row = dict(row)
        row["modules"] = [ModuleCard(**m) for m in row["modules"]]
        rows.append(LayerCardRow(**row))
    dataset = fields.pop("dataset", None)  # absent on cards stored before it was recorded
    return LayerCardData(
        dataset=CardDataset(**dataset) if dataset is not None else None,
        settings=CardSettings(**settings),
        layers=rows,
        training_cost=TrainingCostCard(**fields.pop("training_cost")),
        serving_cost=ServingCostCard(**fields.pop("serving_cost")),
        **fields,
    )
