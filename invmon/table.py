"""Plain-text tables for the terminal: no dependency, aligned columns, numbers right-aligned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    text = str(value).replace(",", "").replace("%", "").replace(" s", "").strip()
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) or row[i] == "" for row in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            (value.rjust(width) if right else value.ljust(width))
            for value, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
