"""The domain core the servicers talk to, built once from the config."""

from __future__ import annotations

from dataclasses import dataclass

from layercard_service.card.service import CardService
from layercard_service.config import ServiceConfig
from layercard_service.store import Store

__all__ = ["Core"]


@dataclass
class Core:
    store: Store
    cards: CardService

    @classmethod
    def from_config(cls, config: ServiceConfig) -> Core:
        store = Store(config.data_dir)
        cards = CardService(
            store,
            config.model_roots,
            config.dataset_roots,
            max_concurrent=config.max_concurrent_cards,
            queue_size=config.card_queue_size,
        )
        return cls(store=store, cards=cards)

    def close(self) -> None:
        self.store.close()
