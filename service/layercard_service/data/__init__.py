"""Datasets: JSONL loading and validation (``jsonl``), token encoding with completion-only loss
(``encode``), and the built-in tasks with their prompt-blind floors (``tasks``, ``task_base``,
``task_families``). Import the submodules directly; this package imports nothing heavy on its own.
"""
