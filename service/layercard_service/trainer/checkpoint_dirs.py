"""Which checkpoints a run has on disk: a directory listing, without torch, for the runners' restart recovery.

Layout (trainer/checkpoint.py writes it): ``<root>/step-N/`` holding ``state.json`` among its files; a folder
without ``state.json`` is not a complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["checkpoint_steps", "latest_step"]


def checkpoint_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, newest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("step-") and (child / "state.json").is_file():
                try:
                    found.append((int(child.name[len("step-") :]), child))
                except ValueError:
                    continue
    return sorted(found, reverse=True)


def latest_step(root: Path) -> int:
    """Step of the newest complete checkpoint under ``root``; 0 when there is none."""
    steps = checkpoint_steps(root)
    return steps[0][0] if steps else 0
