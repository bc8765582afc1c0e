"""Per-round run metrics: always to the run directory (metrics.jsonl + metrics.csv), and to
Weights & Biases when asked (``wandb`` = offline | online; disabled unless configured).

wandb is imported only when enabled; offline runs land in <run_dir>/wandb for a later
``wandb sync``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = ("round", "t", "global_step", "tokens", "loss", "sites", "committed_rows")


class RunLog:
    def __init__(
        self,
        run_dir: str | Path,
        mode: str = "disabled",
        project: str = "curtail-llm",
        name: str = "",
        config: dict[str, Any] | None = None,
    ):
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb mode {mode!r}: use disabled, offline or online")
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "metrics.csv"
        self.wandb_run = None
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=project,
                name=name or None,
                mode=mode,
                dir=str(self.dir),
                config=config or {},
                resume="allow",
                id=name or None,
            )

    def log(self, row: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in row.items() if v is not None}, step=int(row.get("global_step", 0))
            )

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
