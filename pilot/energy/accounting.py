"""Energy and emissions accounting over provisioned/training intervals, and its baselines (pure).

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
idle_kw` (pilot.config.sites.Site). The Ledger that folds a run's events into intervals is
pilot.energy.carbon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pilot.energy.spans import Span, subtract, union
from pilot.energy.traces import DAY_S

STATES = ("train", "idle")
MAX_GRID_S = 60.0


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


def model_kw(site: Any, state: str) -> float:
    """The site's power model: kW drawn in `state`."""
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
            pieces.append((s, e, model_kw(site, iv.state)))
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


def sites_of(sites_config: Any) -> list[Any]:
    """The sites of a SitesConfig, or of a plain list of sites."""
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
    sites = sites_of(sites_config)
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
