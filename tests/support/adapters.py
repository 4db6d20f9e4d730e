"""Real peft adapters for serving tests, published as versions in a service's state database.

Training through a tuning job takes minutes; these train a LoRA directly for a few seconds to answer one word
(so which version served a request shows in its text) and record it the way a finished job does.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import torch

from layercard_service.data.jsonl import Example
from layercard_service.models.builtin import builtin_model_path
from layercard_service.models.loading import load_model
from layercard_service.persistence.adapter_versions import AdapterVersion, insert_version
from layercard_service.persistence.jobs import JobStore
from layercard_service.trainer.lora import LoraSettings, TrainConfig, attach_lora, train_lora

LAYERS = (6, 7)
MODULES = ("o_proj",)


def train_word_adapter(folder: Path, word: str, steps: int = 60) -> Path:
    """An adapter on two blocks' o_proj that answers ``word`` after "word N:"; ``steps=0`` leaves it untrained
    (peft starts LoRA's B at zero: such an adapter changes nothing)."""
    model, tokenizer = load_model(builtin_model_path("tiny"))
    torch.manual_seed(0)  # attach_lora draws LoRA's A from the global generator: the same adapter every run
    peft_model = attach_lora(model, LoraSettings(rank=8, alpha=16.0, target_modules=MODULES, layers=LAYERS))
    if steps:
        examples = [Example(prompt=f"word {i}:", completion=f" {word}") for i in range(32)]
        train_lora(peft_model, tokenizer, examples, TrainConfig(steps=steps, batch_size=8, learning_rate=1e-2, seed=0))
    peft_model.save_pretrained(folder)
    return folder


def publish_version(
    data_dir: Path, adapter_id: str, source: Path, model: str = "builtin:tiny", serving_pool: str = ""
) -> int:
    """Copies ``source`` into the artifact layout and records it as the adapter's next version (``serving_pool``:
    the pool its plan chose, as a planned job records it)."""
    db_path = data_dir / "state.db"
    JobStore(db_path).close()  # creates the schema
    with sqlite3.connect(db_path, isolation_level=None) as db:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT MAX(version) FROM adapter_versions WHERE adapter_id = ?", (adapter_id,)).fetchone()
        version = (row[0] or 0) + 1
        final = data_dir / "artifacts" / "adapters" / adapter_id / str(version)
        shutil.copytree(source, final)
        placement = {"layers": list(LAYERS), "rank": 8, "alpha": 16.0, "target_modules": list(MODULES),
                     "serving_pool": serving_pool}  # fmt: skip
        metadata = {"model": model, "placement": placement}
        insert_version(db, AdapterVersion(adapter_id, version, str(final), "test-job", time.time(), metadata))
        db.execute("COMMIT")
    return version
