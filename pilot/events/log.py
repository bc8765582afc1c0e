"""Run events: one record, written twice — the run directory's ``events.jsonl`` (the durable
source of reports; flushed per event) and the Redis ``events`` stream (live views).

The schema (kinds and fields) is pilot/events/schema.py, checked on emit; every event has
``kind``, ``t`` (simulated epoch seconds) and ``wall``. Observers (the live carbon ledger) see each
event as it is emitted, so the live ledger and a replay of events.jsonl agree by construction.
Each notable event is also logged as one line (``describe``): in the ServerApp that log is what
``flwr run --stream`` shows, and the launcher's plain view prints the same lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilot.events.reader import load_events, write_events_csv
from pilot.events.schema import EVENT_KINDS, make_event

log = logging.getLogger(__name__)

# Events worth a line of their own (the rest only feed state, files and reports).
NOTABLE = (set(EVENT_KINDS) - {"provision_decided", "train_interval", "round_end"}) | {
    "energy_sim"  # published by the energy simulation, not the ServerApp
}


def hhmm(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M")


def num(x: Any, fmt: str) -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return "-"


def describe(ev: dict) -> str:
    """One short line for an event, stamped with its simulated time."""
    kind, t = ev.get("kind", "?"), hhmm(ev.get("t"))
    fields = {k: v for k, v in ev.items() if k not in ("kind", "t", "wall")}
    if kind == "energy_sim":  # published by the simulation itself, on the wall clock
        return f"energy simulation {fields.get('status', '')}"
    if kind == "run_start":
        body = f"{fields.get('run')} policy {fields.get('policy')}" + (
            " (resumed)" if fields.get("resumed") else ""
        )
    elif kind == "mode":
        body = f"{fields.get('mode')} train={','.join(fields.get('train', [])) or '-'}"
    elif kind == "aggregate":
        body = (
            f"round {fields.get('round')} step {fields.get('global_step')} "
            f"round-mean train loss {num(fields.get('loss'), '.3f')} "
            f"sites {','.join(fields.get('sites', []))}"
        )
    elif kind == "validation":
        body = (
            f"round {fields.get('round')} step {fields.get('global_step')} "
            f"val bpb {num(fields.get('bpb'), '.4f')}"
        )
    elif kind in ("join", "leave", "provision_started", "provision_complete", "deprovision"):
        body = f"{fields.get('site')}" + (f" ({fields['reason']})" if fields.get("reason") else "")
        body += " [warm]" if fields.get("warm") else " [resumed]" if fields.get("resumed") else ""
    elif kind == "round_start":
        body = f"round {fields.get('round')} sites {','.join(fields.get('sites', []))}"
    else:
        body = " ".join(f"{k}={v}" for k, v in fields.items())[:100]
    return f"[{t}] {kind} {body}"


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
        ev = make_event(kind, self.sim_now() if t is None else t, wall=time.time(), **fields)
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
        if kind in NOTABLE:
            log.log(logging.WARNING if kind == "fault" else logging.INFO, describe(ev))
        return ev

    def export_csv(self, path: str | Path | None = None) -> Path:
        """events.csv next to events.jsonl (or at ``path``), with the report's columns."""
        out = Path(path) if path is not None else self.path.with_suffix(".csv")
        write_events_csv(load_events(self.path), out)
        return out
