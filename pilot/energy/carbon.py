"""The carbon ledger: a run's provisioned/training spans and measured energy, and its report.

`Ledger.observe(event)` folds the events stream into per-site spans; `Ledger.summary` accounts
them with pilot.energy.accounting (energy, emissions, curtailed share, baselines). The live
ServerApp, the what-if simulator and the report all go through it, so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pilot.energy.accounting import (
    Interval,
    Measured,
    baselines,
    integrate,
    mci_fn,
    model_kw,
    site_pieces,
    sites_of,
)
from pilot.energy.spans import Span, seconds, subtract, union

# the summary totals that are sums over sites, in the report's key order
TOTALS = (
    "energy_kwh",
    "emissions_kg",
    "train_hours",
    "in_window_train_hours",
    "idle_energy_kwh",
    "provisioned_hours",
)


class Ledger:
    """Accumulates provisioned/training spans and measured energy, live or from recorded events.

    Spans are kept as per-site unions, so re-reporting a span or extending an open one (a
    checkpoint taken mid-interval, later the full interval) never double counts. `observe(event)`
    folds the events stream (schema in pilot/analysis/report.py) into the ledger; the ServerApp and the
    replay of a recorded run use that one function, so they agree by construction.
    """

    def __init__(self) -> None:
        self.provisioned: dict[str, list[Span]] = {}
        self.train: dict[str, list[Span]] = {}
        self.measured: list[Measured] = []
        self.open: dict[str, float] = {}  # site -> provisioned since (sim t), not yet released
        self.first_t: float | None = None
        self.last_t: float | None = None

    # inputs

    def _seen(self, *ts: float) -> None:
        for t in ts:
            self.first_t = t if self.first_t is None else min(self.first_t, t)
            self.last_t = t if self.last_t is None else max(self.last_t, t)

    def add(self, iv: Interval) -> None:
        """A closed interval: "train" also counts as provisioned, "idle" only as provisioned."""
        if iv.end <= iv.start:
            return
        self._seen(iv.start, iv.end)
        self.provisioned[iv.site] = union(self.provisioned.get(iv.site, []) + [(iv.start, iv.end)])
        if iv.state == "train":
            self.train[iv.site] = union(self.train.get(iv.site, []) + [(iv.start, iv.end)])

    def add_provisioned(self, site: str, start: float, end: float) -> None:
        self.add(Interval(site, start, end, "idle"))

    def add_train(self, site: str, start: float, end: float) -> None:
        self.add(Interval(site, start, end, "train"))

    def add_measured(self, site: str, start: float, end: float, joules: float) -> None:
        """Measured energy over [start, end); re-reporting the same span replaces it, overlaps are errors."""
        if end <= start or not math.isfinite(joules) or joules < 0:
            raise ValueError(
                f"measured energy {joules} J over [{start}, {end}) of {site!r} is not valid"
            )
        self.measured = [
            m for m in self.measured if not (m.site == site and m.start == start and m.end == end)
        ]
        for m in self.measured:
            if m.site == site and m.start < end and start < m.end:
                raise ValueError(
                    f"measured span [{start}, {end}) of {site!r} overlaps [{m.start}, {m.end})"
                )
        self.measured.append(Measured(site, float(start), float(end), float(joules)))
        self.add(Interval(site, start, end, "idle"))

    def provision(self, site: str, t: float) -> None:
        """The site starts drawing power at t (idempotent while it stays provisioned)."""
        self._seen(t)
        self.open.setdefault(site, t)

    def deprovision(self, site: str, t: float) -> None:
        self._seen(t)
        since = self.open.pop(site, None)
        if since is not None:
            self.add_provisioned(site, since, t)

    def observe(self, event: dict[str, Any]) -> None:
        """Fold one event of the events stream (pilot/analysis/report.py docstring) into the ledger."""
        kind, t = event.get("kind"), event.get("t")
        if t is not None:
            self._seen(float(t))
        site = event.get("site")
        if kind == "provision_started" and site:
            # Power is drawn from the provisioner's start (booting counts), not from the decision.
            self.provision(site, float(t))
        elif kind == "deprovision" and site:
            self.deprovision(site, float(t))
        elif kind == "train_interval" and site:
            s, e = float(event["start"]), float(event["end"])
            self.add_train(site, s, e)
            if event.get("energy_j") is not None and float(event.get("energy_j") or 0) > 0:
                self.add_measured(site, s, e, float(event["energy_j"]))

    @classmethod
    def from_events(cls, events: Iterable[dict[str, Any]]) -> Ledger:
        led = cls()
        for ev in events:
            led.observe(ev)
        return led

    # outputs

    def sites(self) -> list[str]:
        return sorted(set(self.provisioned) | set(self.train) | set(self.open))

    def intervals(self, end: float | None = None) -> list[Interval]:
        """Disjoint train/idle intervals; sites still provisioned are closed at `end` (default: last event)."""
        end = self.last_t if end is None else end
        out: list[Interval] = []
        for site in self.sites():
            prov = list(self.provisioned.get(site, []))
            if site in self.open and end is not None and end > self.open[site]:
                prov.append((self.open[site], end))
            train = union(self.train.get(site, []))
            prov = union(prov + train)
            out += [Interval(site, s, e, "train") for s, e in train]
            out += [Interval(site, s, e, "idle") for s, e in subtract(prov, train)]
        return sorted(out, key=lambda iv: (iv.site, iv.start))

    def span(self) -> tuple[float, float]:
        if self.first_t is None or self.last_t is None:
            raise ValueError("the ledger is empty: no interval or event recorded")
        return self.first_t, self.last_t

    def summary(
        self,
        trace: Any,
        sites_config: Any,
        *,
        start: float | None = None,
        end: float | None = None,
        threshold: float | None = None,
        grid_s: float = 60.0,
    ) -> dict[str, Any]:
        """The report JSON: per-site and total energy/emissions/hours, and the baselines.

        Accounts [start, end), by default the first and last instant the ledger recorded.
        """
        sites = sites_of(sites_config)
        if threshold is None:
            threshold = float(sites_config.threshold)
        if start is None or end is None:
            s0, e0 = self.span()
            start = s0 if start is None else start
            end = e0 if end is None else end
        known = {s.name for s in sites}
        unknown = [s for s in self.sites() if s not in known]
        if unknown:
            raise ValueError(f"ledger has sites {unknown} that the sites config does not define")
        ivs, measured = self._accounted(start, end)
        rows = [
            _site_summary(
                site,
                [iv for iv in ivs if iv.site == site.name],
                measured,
                mci_fn(trace, site.region),
                threshold,
                grid_s,
            )
            for site in sites
        ]
        tot = _totals(rows, wall_hours=(end - start) / 3600.0)
        return {
            "start": start,
            "end": end,
            "threshold": threshold,
            "grid_s": grid_s,
            "sites": {site.name: row for site, (row, _) in zip(sites, rows, strict=True)},
            "total": tot,
            "baselines": baselines(trace, sites, start, end, tot["train_hours"], grid_s),
        }

    def _accounted(self, start: float, end: float) -> tuple[list[Interval], list[Measured]]:
        """Intervals and measured energy cut to [start, end).

        A span reaching past it (a run going on after the trace ends) is cut, and measured
        joules are cut in proportion: only [start, end) is accounted.
        """
        ivs = [
            Interval(iv.site, max(iv.start, start), min(iv.end, end), iv.state)
            for iv in self.intervals(end)
            if min(iv.end, end) > max(iv.start, start)
        ]
        measured = [
            Measured(m.site, a, b, m.joules * (b - a) / (m.end - m.start))
            for m in self.measured
            if (b := min(m.end, end)) > (a := max(m.start, start))
        ]
        return ivs, measured

    # persistence (kept in the server checkpoint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "provisioned": {s: [list(x) for x in v] for s, v in self.provisioned.items()},
            "train": {s: [list(x) for x in v] for s, v in self.train.items()},
            "measured": [[m.site, m.start, m.end, m.joules] for m in self.measured],
            "open": dict(self.open),
            "first_t": self.first_t,
            "last_t": self.last_t,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ledger:
        if d.get("version") != 1:
            raise ValueError(
                f"carbon ledger version {d.get('version')!r} is not supported (expected 1)"
            )
        led = cls()
        led.provisioned = {
            s: [(float(a), float(b)) for a, b in v] for s, v in d["provisioned"].items()
        }
        led.train = {s: [(float(a), float(b)) for a, b in v] for s, v in d["train"].items()}
        led.measured = [Measured(s, float(a), float(b), float(j)) for s, a, b, j in d["measured"]]
        led.open = {s: float(t) for s, t in d["open"].items()}
        led.first_t, led.last_t = d.get("first_t"), d.get("last_t")
        return led


def _site_summary(
    site: Any,
    mine: list[Interval],
    measured: list[Measured],
    mci: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    grid_s: float,
) -> tuple[dict[str, Any], float]:
    """One site's row of the summary, and the energy it drew inside windows (kWh)."""
    r = integrate(site_pieces(mine, site, measured), mci, threshold, grid_s)
    # training at a unit power: its in-window seconds, whatever the site draws
    tr = [(iv.start, iv.end, 1.0) for iv in mine if iv.state == "train"]
    trw = integrate(tr, mci, threshold, grid_s)
    idle = [(iv.start, iv.end, model_kw(site, "idle")) for iv in mine if iv.state == "idle"]
    row = {
        "region": site.region,
        "energy_kwh": r.energy_kwh,
        "emissions_kg": r.emissions_kg,
        "train_hours": seconds((iv.start, iv.end) for iv in mine if iv.state == "train") / 3600.0,
        "provisioned_hours": seconds((iv.start, iv.end) for iv in mine) / 3600.0,
        "curtailed_energy_share": r.in_window_kwh / r.energy_kwh if r.energy_kwh > 0 else 0.0,
        "in_window_train_hours": trw.in_window_s / 3600.0,
        "idle_energy_kwh": float(sum((e - s) * kw for s, e, kw in idle) / 3600.0),
    }
    return row, r.in_window_kwh


def _totals(rows: list[tuple[dict[str, Any], float]], wall_hours: float) -> dict[str, float]:
    """The summary's totals over the site rows (added in site order, as a plain loop)."""
    tot = dict.fromkeys(TOTALS, 0.0)
    in_window_kwh = 0.0
    for row, kwh in rows:
        for k in TOTALS:
            tot[k] += row[k]
        in_window_kwh += kwh
    tot["wall_hours"] = wall_hours
    tot["curtailed_energy_share"] = (
        in_window_kwh / tot["energy_kwh"] if tot["energy_kwh"] > 0 else 0.0
    )
    return tot
