"""Reading a run's events back: events.jsonl (tolerating a torn last line) and events.csv,
for the report, the launcher, the exporter and a resumed ServerApp alike."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """events.jsonl -> list of dicts; a torn last line (a crash mid-write) is skipped, others are errors."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(ev, dict) or "kind" not in ev or "t" not in ev:
            raise ValueError(f"{path}:{i}: an event needs 'kind' and 't' (sim seconds)")
        out.append(ev)
    return out


def write_events_csv(events: Sequence[dict[str, Any]], path: str | Path) -> None:
    cols = ["t", "kind"]
    for ev in events:
        cols += [k for k in ev if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for ev in events:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in ev.items()}
            )


def loss_curve(step_losses: Sequence[float], points: int) -> list[float]:
    """Per-step losses in at most `points` equal bins (bin means), in order: a training curve
    small enough for an event however long the round."""
    n = len(step_losses)
    if n <= points:
        return [float(x) for x in step_losses]
    edges = np.linspace(0, n, points + 1).round().astype(int)
    return [float(np.mean(step_losses[a:b])) for a, b in zip(edges[:-1], edges[1:], strict=True)]
