"""Per-round run metrics: always to the run directory (metrics.jsonl + metrics.csv), and to
Weights & Biases when asked (``wandb`` = offline | online; disabled unless configured).

wandb is imported only when enabled; offline runs land in <run_dir>/wandb for a later
``wandb sync``."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

# loss: the round-mean train loss (work-weighted over the sites' steps); val_bpb: the global
# model's bits per byte on the held-out shard after the round (pilot/control/validation.py), written
# when that evaluation is done; cropped_tokens: tokens the loader's packing read, not trained on.
COLUMNS = (
    "round",
    "t",
    "global_step",
    "tokens",
    "loss",
    "val_bpb",
    "sites",
    "committed_rows",
    "cropped_tokens",
)


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
            # wandb >= 0.31 reports its own telemetry to CoreWeave even offline: off unless
            # the user turns it back on
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
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
            import wandb

            self.wandb_run.finish()
            # finish() can return before wandb's service has flushed the offline record on a
            # busy machine; tearing the service down waits for it, so the record is whole
            wandb.teardown()
            self.wandb_run = None
