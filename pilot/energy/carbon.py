"""Energy and emissions accounting: the carbon ledger and its baselines (pure).

The method of the published analysis, made first-class:

- energy per site = ∫ P(t) dt over the site's provisioned time, where P is the measured power
  when a site reports it (NVML joules over a span), else the site's power model: `train_kw`
  while training, `idle_kw` while provisioned but not training (booting, waiting, release delay);
- emissions = Σ P·MCI·dt on a grid of `grid_s` ≤ 60 s cells aligned to the epoch, MCI linearly
  interpolated between trace points and sampled at each cell's midpoint. Interval edges cut
  cells exactly (a partial cell at either end counts only its own length), and the midpoint
  rule is exact for MCI that is linear inside a cell, so a trace whose points fall on the grid
  (5-minute data, 60 s grid) is integrated exactly;
- share of energy drawn inside curtailment windows (raw MCI < threshold, no hysteresis);
- baselines from the same trace: each region alone training the same site-hours back-to-back
  from the run start, and every site training continuously over the run's wall span.

Everything takes plain values (floats, dataclasses, dicts) so the live ServerApp, the what-if
simulator and the report compute the numbers the same way. A "trace" is anything with
`series(region, ts) -> ndarray` (pilot.energy.traces.Trace); a plain callable `mci(ts) -> ndarray`
works where a single region is meant. A "site" is anything with `name, region, train_kw,
idle_kw` (pilot.config.sites.Site).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pilot.energy.traces import DAY_S

STATES = ("train", "idle")
MAX_GRID_S = 60.0

Span = tuple[float, float]


@dataclass(frozen=True)
class Interval:
    """`site` drew power in `state` ("train" | "idle" = provisioned, not training) over [start, end)."""

    site: str
    start: float
    end: float
    state: str

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"interval state {self.state!r} is not one of {STATES}")
        if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.end < self.start:
            raise ValueError(
                f"interval [{self.start}, {self.end}) of {self.site!r} is not a valid span"
            )

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Measured:
    """Energy a site measured itself (e.g. NVML) over [start, end); it replaces the power model there."""

    site: str
    start: float
    end: float
    joules: float


# --- spans ------------------------------------------------------------------------------------


def union(spans: Iterable[Span]) -> list[Span]:
    """Sorted disjoint spans covering the input; touching spans merge (a re-reported span is a no-op)."""
    out: list[list[float]] = []
    for s, e in sorted((float(s), float(e)) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(spans: Iterable[Span], cut: Iterable[Span]) -> list[Span]:
    """`spans` minus `cut`, both taken as unions."""
    cut = union(cut)
    out: list[Span] = []
    for s, e in union(spans):
        cur = s
        for cs, ce in cut:
            if ce <= cur or cs >= e:
                continue
            if cs > cur:
                out.append((cur, cs))
            cur = max(cur, ce)
        if cur < e:
            out.append((cur, e))
    return out


def clip(spans: Iterable[Span], start: float, end: float) -> list[Span]:
    return [(max(s, start), min(e, end)) for s, e in spans if min(e, end) > max(s, start)]


def seconds(spans: Iterable[Span]) -> float:
    return float(sum(e - s for s, e in spans))


def normalize(intervals: Iterable[Interval]) -> list[Interval]:
    """Disjoint intervals per site: train wins where train and idle overlap (train implies provisioned)."""
    by_site: dict[str, dict[str, list[Span]]] = {}
    for iv in intervals:
        d = by_site.setdefault(iv.site, {"train": [], "idle": []})
        d[iv.state].append((iv.start, iv.end))
    out: list[Interval] = []
    for site, d in by_site.items():
        train = union(d["train"])
        idle = subtract(d["idle"], train)
        out += [Interval(site, s, e, "train") for s, e in train]
        out += [Interval(site, s, e, "idle") for s, e in idle]
    return sorted(out, key=lambda iv: (iv.site, iv.start))


# --- MCI on the grid --------------------------------------------------------------------------


def mci_fn(
    trace: Any, region: str | None, wrap: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised t -> MCI for one region.

    `wrap=True` lets baselines run past the trace end: such instants map back by whole days
    (by the trace span when it is shorter than a day), which keeps the diurnal phase.
    """
    if hasattr(trace, "series"):

        def f(ts: np.ndarray) -> np.ndarray:
            return np.asarray(trace.series(region, ts), dtype=np.float64)
    elif callable(trace):

        def f(ts: np.ndarray) -> np.ndarray:
            return np.asarray(trace(ts), dtype=np.float64)
    else:
        raise TypeError("trace must have series(region, ts) or be a callable mci(ts)")
    if not wrap:
        return f
    t0, t1 = float(trace.start), float(trace.end)
    period = DAY_S if t1 - t0 >= DAY_S else t1 - t0
    if period <= 0:
        return f

    def wrapped(ts: np.ndarray) -> np.ndarray:
        ts = np.asarray(ts, dtype=np.float64)
        k = np.ceil(np.maximum(ts - t1, 0.0) / period)
        return f(ts - k * period)

    return wrapped


def cells(
    starts: np.ndarray, ends: np.ndarray, grid_s: float = 60.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut spans into epoch-aligned grid cells: (span index, cell start, cell end) per cell.

    Edges are exact: a span starting at 00:00:30 on a 60 s grid gets a 30 s first cell.
    Vectorised, so days of intervals cost a few numpy calls.
    """
    if not 0 < grid_s <= MAX_GRID_S:
        raise ValueError(f"grid_s={grid_s} must be in (0, {MAX_GRID_S:g}] seconds")
    starts = np.asarray(starts, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.float64)
    keep = ends > starts
    starts, ends, ids = starts[keep], ends[keep], np.flatnonzero(keep)
    if starts.size == 0:
        empty = np.zeros(0)
        return np.zeros(0, dtype=np.int64), empty, empty
    k0 = np.floor(starts / grid_s)
    k1 = np.ceil(ends / grid_s)
    n = np.maximum(k1 - k0, 1).astype(np.int64)
    rep = np.repeat(np.arange(starts.size), n)
    offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    k = k0[rep] + offset
    lo = np.maximum(k * grid_s, starts[rep])
    hi = np.minimum((k + 1) * grid_s, ends[rep])
    ok = hi > lo
    return ids[rep[ok]], lo[ok], hi[ok]


@dataclass(frozen=True)
class Integral:
    energy_kwh: float
    emissions_kg: float
    in_window_kwh: float
    in_window_s: float  # seconds of the pieces that lie inside curtailment windows


def integrate(
    pieces: Sequence[tuple[float, float, float]],
    mci: Callable[[np.ndarray], np.ndarray],
    threshold: float | None = None,
    grid_s: float = 60.0,
) -> Integral:
    """Σ P·MCI·dt over pieces (start, end, kW); energy itself is exact (no grid)."""
    if not pieces:
        return Integral(0.0, 0.0, 0.0, 0.0)
    arr = np.asarray(pieces, dtype=np.float64).reshape(-1, 3)
    idx, lo, hi = cells(arr[:, 0], arr[:, 1], grid_s)
    kw = arr[idx, 2]
    dt_h = (hi - lo) / 3600.0
    m = mci(0.5 * (lo + hi))
    if not np.all(np.isfinite(m)):
        raise ValueError("MCI is not finite inside an accounted interval")
    inside = m < threshold if threshold is not None else np.zeros(m.shape, dtype=bool)
    return Integral(
        energy_kwh=float(np.sum(arr[:, 2] * (arr[:, 1] - arr[:, 0])) / 3600.0),
        emissions_kg=float(np.sum(kw * m * dt_h) / 1000.0),
        in_window_kwh=float(np.sum((kw * dt_h)[inside])),
        in_window_s=float(np.sum((hi - lo)[inside])),
    )


def _kw(site: Any, state: str) -> float:
    return float(site.train_kw if state == "train" else site.idle_kw)


def site_pieces(
    intervals: Iterable[Interval], site: Any, measured: Iterable[Measured] = ()
) -> list[tuple[float, float, float]]:
    """(start, end, kW) for one site: the power model, replaced by measured energy where reported."""
    ivs = [iv for iv in normalize(intervals) if iv.site == site.name]
    meas = [m for m in measured if m.site == site.name and m.end > m.start]
    cut = [(m.start, m.end) for m in meas]
    pieces: list[tuple[float, float, float]] = []
    for iv in ivs:
        for s, e in subtract([(iv.start, iv.end)], cut):
            pieces.append((s, e, _kw(site, iv.state)))
    # Measured joules spread evenly over their span: the site reports no finer power profile.
    pieces += [(m.start, m.end, m.joules / (m.end - m.start) / 1000.0) for m in meas]
    return sorted(pieces)


def energy_kwh(
    intervals: Iterable[Interval], site: Any, measured: Iterable[Measured] = ()
) -> float:
    return float(sum((e - s) * kw for s, e, kw in site_pieces(intervals, site, measured)) / 3600.0)


def emissions_kg(
    intervals: Iterable[Interval],
    trace: Any,
    region: str | None,
    site: Any,
    grid_s: float = 60.0,
    measured: Iterable[Measured] = (),
) -> float:
    pieces = site_pieces(intervals, site, measured)
    return integrate(pieces, mci_fn(trace, region), None, grid_s).emissions_kg


def curtailed_energy_share(
    intervals: Iterable[Interval],
    trace: Any,
    region: str | None,
    site: Any,
    threshold: float,
    grid_s: float = 60.0,
    measured: Iterable[Measured] = (),
) -> float:
    r = integrate(site_pieces(intervals, site, measured), mci_fn(trace, region), threshold, grid_s)
    return r.in_window_kwh / r.energy_kwh if r.energy_kwh > 0 else 0.0


def windows(
    trace: Any, region: str, start: float, end: float, threshold: float, grid_s: float = 60.0
) -> list[Span]:
    """Raw curtailment windows (MCI < threshold at cell midpoints) of a region inside [start, end)."""
    _, lo, hi = cells(np.array([start]), np.array([end]), grid_s)
    inside = mci_fn(trace, region)(0.5 * (lo + hi)) < threshold
    return union(zip(lo[inside].tolist(), hi[inside].tolist(), strict=True))


# --- baselines --------------------------------------------------------------------------------


def _sites_of(sites_config: Any) -> list[Any]:
    return list(getattr(sites_config, "sites", sites_config))


def baselines(
    trace: Any,
    sites_config: Any,
    start: float,
    end: float,
    train_hours: float,
    grid_s: float = 60.0,
) -> dict[str, dict[str, float]]:
    """What the same compute would have cost without curtailment-following, on the same trace.

    `single_site:<REGION>`: the run's training site-hours back-to-back from `start` at that
    region (its first site's `train_kw`), past the trace end by whole-day wrap-around if need be.
    `continuous_federated`: every site training over the run's wall span [start, end).
    """
    sites = _sites_of(sites_config)
    out: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    dur = max(train_hours, 0.0) * 3600.0
    for site in sites:
        if site.region in seen:
            continue
        seen.add(site.region)
        r = integrate(
            [(start, start + dur, float(site.train_kw))],
            mci_fn(trace, site.region, wrap=True),
            None,
            grid_s,
        )
        b = {"energy_kwh": r.energy_kwh, "emissions_kg": r.emissions_kg, "wall_hours": train_hours}
        past = start + dur - float(getattr(trace, "end", math.inf))
        if past > 0:
            b["trace_wrapped_hours"] = past / 3600.0
        out[f"single_site:{site.region}"] = b
    e_kwh = em_kg = 0.0
    for site in sites:
        r = integrate(
            [(start, end, float(site.train_kw))], mci_fn(trace, site.region), None, grid_s
        )
        e_kwh += r.energy_kwh
        em_kg += r.emissions_kg
    out["continuous_federated"] = {
        "energy_kwh": e_kwh,
        "emissions_kg": em_kg,
        "wall_hours": (end - start) / 3600.0,
    }
    return out


# --- the ledger -------------------------------------------------------------------------------


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
        sites = _sites_of(sites_config)
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
        # Only [start, end) is accounted: a span reaching past it (a run going on after the
        # trace ends) is cut, and measured joules are cut in proportion.
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
        per: dict[str, Any] = {}
        tot = {
            "energy_kwh": 0.0,
            "emissions_kg": 0.0,
            "train_hours": 0.0,
            "in_window_train_hours": 0.0,
            "idle_energy_kwh": 0.0,
            "provisioned_hours": 0.0,
        }
        in_window_kwh = 0.0
        for site in sites:
            mine = [iv for iv in ivs if iv.site == site.name]
            f = mci_fn(trace, site.region)
            r = integrate(site_pieces(mine, site, measured), f, threshold, grid_s)
            tr = [(iv.start, iv.end, 1.0) for iv in mine if iv.state == "train"]
            trw = integrate(tr, f, threshold, grid_s)
            idle = [(iv.start, iv.end, _kw(site, "idle")) for iv in mine if iv.state == "idle"]
            idle_kwh = float(sum((e - s) * kw for s, e, kw in idle) / 3600.0)
            train_h = seconds((iv.start, iv.end) for iv in mine if iv.state == "train") / 3600.0
            prov_h = seconds((iv.start, iv.end) for iv in mine) / 3600.0
            per[site.name] = {
                "region": site.region,
                "energy_kwh": r.energy_kwh,
                "emissions_kg": r.emissions_kg,
                "train_hours": train_h,
                "provisioned_hours": prov_h,
                "curtailed_energy_share": r.in_window_kwh / r.energy_kwh
                if r.energy_kwh > 0
                else 0.0,
                "in_window_train_hours": trw.in_window_s / 3600.0,
                "idle_energy_kwh": idle_kwh,
            }
            tot["energy_kwh"] += r.energy_kwh
            tot["emissions_kg"] += r.emissions_kg
            tot["train_hours"] += train_h
            tot["in_window_train_hours"] += trw.in_window_s / 3600.0
            tot["idle_energy_kwh"] += idle_kwh
            tot["provisioned_hours"] += prov_h
            in_window_kwh += r.in_window_kwh
        tot["wall_hours"] = (end - start) / 3600.0
        tot["curtailed_energy_share"] = (
            in_window_kwh / tot["energy_kwh"] if tot["energy_kwh"] > 0 else 0.0
        )
        return {
            "start": start,
            "end": end,
            "threshold": threshold,
            "grid_s": grid_s,
            "sites": per,
            "total": tot,
            "baselines": baselines(trace, sites, start, end, tot["train_hours"], grid_s),
        }

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
