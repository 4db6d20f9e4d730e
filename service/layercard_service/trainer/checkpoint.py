"""Resumable checkpoints of a training run: adapter weights, optimizer state, RNG state and loop position.

Layout: ``<root>/step-N/`` holding ``adapter.pt``, ``optimizer.pt``, ``rng.pt`` and ``state.json``. A checkpoint
is written into a hidden temporary folder and renamed into place, so ``step-N`` either exists complete or not
at all; a crash mid-write leaves only a ``.tmp-*`` folder, which the next save sweeps away.

Data-parallel runs: rank 0 writes the checkpoint and every rank loads it; ``rng.pt`` holds rank 0's RNG state at
its top level and every rank's under ``ranks`` (each rank's dropout masks come from its own generator).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layercard_service.errors import FailedPrecondition
from layercard_service.trainer.checkpoint_dirs import checkpoint_steps, latest_step

__all__ = ["KEEP", "LoadedCheckpoint", "latest_step", "load_latest", "restore_rng", "rng_state", "save_checkpoint"]

KEEP = 2  # checkpoints kept per job: the newest, and one before it in case the newest is unreadable
_FILES = ("adapter.pt", "optimizer.pt", "rng.pt", "state.json")


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """This process's RNG state (dropout masks draw from it)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(
    root: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    ranks_rng: list[dict[str, Any]] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """``ranks_rng``: every rank's ``rng_state()`` in a data-parallel run (rank 0, the writer, first).
    ``extra_files`` (name -> text) become part of the checkpoint, complete with it or not there at all."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    rng = rng_state()
    if ranks_rng and len(ranks_rng) > 1:
        rng = {**ranks_rng[0], "ranks": ranks_rng}  # the top level stays rank 0's: one process resumes as rank 0
    try:
        torch.save(adapter, tmp / "adapter.pt")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))  # last: marks it complete
        for file in (*_FILES, *(extra_files or {})):
            with open(tmp / file, "rb") as handle:
                os.fsync(handle.fileno())
        final = root / f"step-{step}"
        if final.exists():  # reached this step again after resuming from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_steps(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads; None when there is none. Unreadable ones: FAILED_PRECONDITION."""
    steps = checkpoint_steps(root)
    if not steps:
        return None
    errors = []
    for step, path in steps:
        try:
            return LoadedCheckpoint(
                step=step,
                path=path,
                adapter=torch.load(path / "adapter.pt", map_location="cpu", weights_only=True),
                optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
                rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
                state=json.loads((path / "state.json").read_text()),
            )
        except Exception as exc:  # torch and json raise many kinds; try the previous checkpoint
            errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
    raise FailedPrecondition(
        "no checkpoint could be loaded: " + "; ".join(errors)[:500],
        reason="RESUME_FAILED",
        metadata={"root": str(root)},
    )


def restore_rng(rng: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Restores this rank's RNG state. Resumed with another world size, rank 0 takes the saved rank 0's and the
    others a seed drawn from it plus their rank: distinct masks, though not those of any uninterrupted run."""
    ranks = rng.get("ranks") or [rng]
    own = ranks[rank] if len(ranks) == world_size else rng
    torch.set_rng_state(own["torch"])
    random.setstate(own["python"])
    if "cuda" in own and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    if len(ranks) != world_size and rank > 0:
        seed = int(torch.randint(2**62, ())) + rank
        torch.manual_seed(seed)
        random.seed(seed)
