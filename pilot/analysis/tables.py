"""The report's tables: one row per policy/baseline, as markdown and on the terminal."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-site rows, a total row and one row per baseline; the last column is run ÷ baseline emissions."""
    head = ["", "kWh", "kg CO2", "train h", "prov h", "in-window", "wall h", "run/this"]
    rows = []
    for name, s in summary["sites"].items():
        rows.append(
            [
                name,
                _f(s["energy_kwh"]),
                _f(s["emissions_kg"]),
                _f(s["train_hours"], 2),
                _f(s["provisioned_hours"], 2),
                f"{s['curtailed_energy_share']:.0%}",
                "",
                "",
            ]
        )
    t = summary["total"]
    rows.append(
        [
            "TOTAL",
            _f(t["energy_kwh"]),
            _f(t["emissions_kg"]),
            _f(t["train_hours"], 2),
            _f(t.get("provisioned_hours", 0.0), 2),
            f"{t['curtailed_energy_share']:.0%}",
            _f(t["wall_hours"], 2),
            "",
        ]
    )
    for name, b in summary["baselines"].items():
        ratio = t["emissions_kg"] / b["emissions_kg"] if b["emissions_kg"] > 0 else float("nan")
        rows.append(
            [
                name,
                _f(b["energy_kwh"]),
                _f(b["emissions_kg"]),
                "",
                "",
                "",
                _f(b["wall_hours"], 2),
                f"{ratio:.1%}",
            ]
        )
    return head, rows


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], title: str = "", caption: str = ""
) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=title or None, caption=caption or None)
    for i, c in enumerate(head):
        tab.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        tab.add_row(*r)
    # Piped output (logs, CI) would otherwise wrap at 80 columns and truncate site names.
    Console(width=None if sys.stdout.isatty() else 140).print(tab)
