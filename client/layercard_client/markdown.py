"""Markdown tables for the card's reports (cardview, cardcost): cells escaped, one row a line."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["md_cell", "md_table"]


def md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: Iterable[list[object]], align: list[str] | None = None) -> list[str]:
    align = align or ["---:"] * len(headers)
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in rows]
    return lines
