"""Run events: one record, written twice — the run directory's ``events.jsonl`` (the durable
source of reports; flushed per event) and the Redis ``events`` stream (live views).

The schema (kinds and fields) is documented in pilot/report.py; every event has ``kind``,
``t`` (simulated epoch seconds) and ``wall``. Observers (the live carbon ledger) see each
event as it is emitted, so the live ledger and a replay of events.jsonl agree by construction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Every kind the ServerApp emits (fields per kind: pilot/report.py's docstring).
EVENT_KINDS = (
    "run_start",
    "mode",
    "provision_decided",
    "provision_started",
    "provision_complete",
    "deprovision",
    "round_start",
    "join",
    "leave",
    "lease_extended",
    "train_interval",
    "round_end",
    "aggregate",
    "fault",
    "run_end",
)


class EventLog:
    def __init__(
        self,
        path: str | Path,
        sim_now: Callable[[], float],
        signals: Any = None,
        observers: Iterable[Callable[[dict], None]] = (),
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sim_now = sim_now
        self.signals = signals
        self.observers = list(observers)
        self._redis_failed = False

    def emit(self, kind: str, t: float | None = None, **fields: Any) -> dict:
        """Record one event at simulated time ``t`` (default: now) and return it."""
        ev = {
            "kind": kind,
            "t": float(self.sim_now() if t is None else t),
            "wall": time.time(),
            **fields,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(ev, default=str) + "\n")
        if self.signals is not None:
            try:
                # Signals.event stamps its own wall time
                self.signals.event(
                    kind, **{k: v for k, v in ev.items() if k not in ("kind", "wall")}
                )
                self._redis_failed = False
            except Exception as e:  # noqa: BLE001 - the JSONL file is the record; say it once
                if not self._redis_failed:
                    log.warning("events: Redis stream write failed (%s); events.jsonl only", e)
                self._redis_failed = True
        for observe in self.observers:
            observe(ev)
        return ev

    def export_csv(self, path: str | Path | None = None) -> Path:
        """events.csv next to events.jsonl (or at ``path``), with the report's columns."""
        from pilot.report import load_events, write_events_csv

        out = Path(path) if path is not None else self.path.with_suffix(".csv")
        write_events_csv(load_events(self.path), out)
        return out
