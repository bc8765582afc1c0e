"""A run's events, simulated or recorded, folded by the carbon ledger into the --json document
of pilot.analysis.simulate.

`replay(events, ...)` takes the events of a real run through the power model and the ledger,
to check a live ledger against the simulator (they must agree within 1%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pilot.energy.accounting import windows
from pilot.energy.carbon import Ledger
from pilot.energy.spans import union


def windows_used(
    ledger: Ledger, trace: Any, sites: Sequence[Any], threshold: float, start: float, end: float
) -> tuple[int, int]:
    """(site-windows in which the site trained at all, all site-windows): raw MCI < threshold."""
    used = total = 0
    for s in sites:
        ws = windows(trace, s.region, start, end, threshold)
        train = union(ledger.train.get(s.name, []))
        total += len(ws)
        used += sum(1 for a, b in ws if any(ts < b and a < te for ts, te in train))
    return used, total


def summarize(
    events: Sequence[dict[str, Any]],
    trace: Any,
    sites_config: Any,
    *,
    start: float,
    end: float,
    threshold: float | None = None,
    grid_s: float = 60.0,
) -> dict[str, Any]:
    """The --json document (less "policy") for a list of simulated or recorded events."""
    threshold = float(sites_config.threshold if threshold is None else threshold)
    ledger = Ledger.from_events(events)
    doc = ledger.summary(
        trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )
    used, total = windows_used(ledger, trace, list(sites_config.sites), threshold, start, end)
    doc["total"]["windows_used"] = used
    doc["total"]["windows_total"] = total
    # Wasted provisioning energy: what sites draw while provisioned but not training (idle_kw),
    # i.e. booting (provision_delay_s per provisioning cycle), waiting ready for a window that
    # has not opened (or never comes), and windows skipped while provisioned. Training is never
    # counted here, in or out of a window: training through a release hold above the
    # threshold shows in the emissions and in train vs in-window hours instead. Zero for the
    # oracle (instant provisioning, trains exactly while curtailed).
    doc["total"]["provisioning_energy_wasted_kwh"] = doc["total"]["idle_energy_kwh"]
    return doc


def accounted_span(events: Sequence[dict[str, Any]], trace: Any) -> tuple[float, float]:
    """The events' span cut to the trace: a run that went on past the trace end is accounted
    up to it (its intervals are cut there), rather than failing the whole report."""
    ts = [float(e["t"]) for e in events]
    start, end = max(min(ts), float(trace.start)), min(max(ts), float(trace.end))
    if end <= start:
        raise ValueError(
            f"the events ({min(ts):.0f} .. {max(ts):.0f}) lie outside the trace "
            f"({trace.start:.0f} .. {trace.end:.0f}): is it the run's trace?"
        )
    return start, end


def replay(
    events: Sequence[dict[str, Any]],
    trace: Any,
    sites_config: Any,
    *,
    threshold: float | None = None,
    grid_s: float = 60.0,
    measured: bool = False,
) -> dict[str, Any]:
    """A recorded run's events through the power model and the ledger, over the run's own span:
    the simulator's view of a real run. Measured joules are ignored unless `measured`."""
    evs = [dict(e) for e in events]
    if not evs:
        raise ValueError("no events to replay")
    if not measured:
        for e in evs:
            e.pop("energy_j", None)
    start, end = accounted_span(evs, trace)
    return summarize(
        evs, trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )
