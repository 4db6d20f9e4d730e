"""The card engine's entry point for the service: load the model, compute its card (torch; a worker thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from layercard_service.card_engine import engine
from layercard_service.data.jsonl import Example
from layercard_service.domain.cards import CardSettings, LayerCardData
from layercard_service.models.loading import load_model

__all__ = ["compute_with_engine"]


def compute_with_engine(
    model_path: Path,
    model: str,
    examples: Sequence[Example],
    settings: CardSettings,
    report: Callable[[str, float, str], None],
    cancel: threading.Event,
) -> LayerCardData:
    """The ``CardEngine`` the composition root hands the card service."""
    report("load_model", 0.0, f"loading {model}")
    loaded, tokenizer = load_model(model_path, settings.device, settings.precision)
    return engine.compute_card(loaded, tokenizer, examples, settings, model, report, cancel)
