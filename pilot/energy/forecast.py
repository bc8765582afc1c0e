"""Forecasters: what a site's MCI will be over the horizon, from a trace (perfect, noisy,
same time yesterday), from the present alone (persistence) or from a live run's recorded
provider forecasts. Energy-side inputs to the policy; pure functions of their arguments."""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np

from pilot.config.sites import SitesConfig
from pilot.energy.traces import DAY_S, Trace

Series = list[tuple[float, float]]  # [(epoch s, gCO2/kWh)], increasing in time


# ----------------------------------------------------------------------------- forecasters


def _window_points(
    times: np.ndarray, values: np.ndarray, lo: float, hi: float
) -> list[tuple[float, float]]:
    """Piecewise-linear curve restricted to [lo, hi]: endpoints interpolated, inner samples as is."""
    i0, i1 = np.searchsorted(times, lo, side="right"), np.searchsorted(times, hi, side="left")
    pts = [(lo, float(np.interp(lo, times, values)))]
    pts += [(float(t), float(v)) for t, v in zip(times[i0:i1], values[i0:i1], strict=True)]
    if hi > lo:
        pts.append((hi, float(np.interp(hi, times, values))))
    return pts


@dataclass
class ForecastError:
    """The noisy forecaster's error model: what a live forecast gets wrong, growing with the
    horizon. Marginal-emission forecasts (WattTime's, grid operators') get the daily shape
    right but the *timing* of a ramp and its *level* wrong, more so the further ahead they
    look. Both errors are random walks along the horizon (so a forecast curve stays smooth and
    its error grows like sqrt(h)): timing error ``time_s`` and log-level error ``level`` are the
    1-sigma values one hour ahead. The defaults (15 min, 15% at 1 h) are an assumption, not a
    published accuracy: set them from a provider's own verification where it has one. Each
    forecast is seeded by (seed, region, issue time), so every replay of a run is the same."""

    time_s: float = 900.0
    level: float = 0.15
    seed: int = 0


def compose(now: float, mci: float, series: Series, horizon_s: float) -> Series:
    """The forecast to act on at ``now`` from a provider's series: the measured present, then
    the provider's points up to ``now + horizon_s`` (the end interpolated); persistence where
    none lie ahead."""
    end = now + horizon_s
    pts = [(now, mci), *((t, v) for t, v in series if now < t < end)]
    later = [(t, v) for t, v in series if t >= end]
    if later:
        (t0, v0), (t1, v1) = pts[-1], later[0]
        pts.append((end, v0 + (v1 - v0) * (end - t0) / (t1 - t0)))
    elif len(pts) == 1:
        pts.append((end, mci))
    return pts


@dataclass
class RecordedForecasts:
    """The provider forecasts a live run recorded (pilot.energy.sources.record, forecasts.csv), per
    region in issue order: ``issued[region]`` ascending, ``series[region][i]`` the forecast
    issued at ``issued[region][i]``."""

    issued: dict[str, list[float]]
    series: dict[str, list[Series]]

    def latest(self, region: str, now: float) -> Series | None:
        """The newest forecast issued at or before ``now``; None before the first one."""
        i = bisect.bisect_right(self.issued.get(region, []), now) - 1
        return None if i < 0 else self.series[region][i]


@dataclass
class Forecaster:
    """``forecast(region, now, horizon_s) -> [(t, mci)]`` starting at ``now``; [] if unknown.

    kind "perfect": the trace itself (replay; the oracle's knowledge, no live deployment has
    it); "noisy": the trace seen through ``error`` (a live forecast's quality); "same_time_
    yesterday": the trace 24 h earlier; "persistence": the current value held flat
    (``current`` if given, else the trace at now); "recorded": a live run's provider
    forecasts replayed issue time by issue time: at ``now`` the newest one issued at or
    before it, composed from the present as the live source did (``compose``), and
    persistence where the run had none yet (before the first issue, or for a region the
    provider gave no forecast for). The live run received each forecast up to one poll
    after its issue time, so the replay may act on it that much earlier."""

    kind: str
    trace: Trace | None = None
    error: ForecastError | None = None
    recorded: RecordedForecasts | None = None

    @property
    def shift_s(self) -> float:
        return DAY_S if self.kind == "same_time_yesterday" else 0.0

    @property
    def per_tick(self) -> bool:
        """A new forecast at (almost) every tick: no crossing tables shared between ticks."""
        return self.kind in ("noisy", "recorded")

    def forecast(
        self, region: str, now: float, horizon_s: float, current: float | None = None
    ) -> list[tuple[float, float]]:
        if self.kind in ("persistence", "recorded"):
            if current is None:
                if self.trace is None or not self.trace.start <= now <= self.trace.end:
                    return []
                current = self.trace.at(region, now)
            series = self.recorded.latest(region, now) if self.recorded is not None else None
            if series is not None:
                return compose(now, float(current), series, horizon_s)
            return [(now, float(current)), (now + horizon_s, float(current))]
        assert self.trace is not None
        times = self.trace.times + self.shift_s
        if not times[0] <= now <= times[-1]:
            return []
        if self.kind == "noisy":
            return self._noisy(region, now, min(horizon_s, float(times[-1]) - now), current)
        return _window_points(
            times, self.trace.row(region), now, min(now + horizon_s, float(times[-1]))
        )

    def _noisy(
        self, region: str, now: float, horizon_s: float, current: float | None
    ) -> list[tuple[float, float]]:
        """The perfect forecast's points (now, the trace's samples, the horizon's end), each
        read ``t_err`` late and scaled by ``exp(l_err)``: a random walk from 0 at now."""
        assert self.trace is not None and self.error is not None
        err, times = self.error, self.trace.times
        t = np.array([p[0] for p in _window_points(times, times, now, now + horizon_s)])
        rng = np.random.default_rng([err.seed, zlib.crc32(region.encode()), int(round(now))])
        steps = np.sqrt(np.diff(t) / 3600.0) * rng.normal(0.0, 1.0, (2, t.size - 1))
        walk = np.concatenate([np.zeros((2, 1)), np.cumsum(steps, axis=1)], axis=1)
        at = np.clip(t + walk[0] * err.time_s, times[0], times[-1])
        values = np.interp(at, times, self.trace.row(region)) * np.exp(walk[1] * err.level)
        if current is not None:
            values[0] = current  # the present is measured, not forecast
        return [(float(a), float(v)) for a, v in zip(t, values, strict=True)]


def perfect(trace: Trace) -> Forecaster:
    return Forecaster("perfect", trace)


def persistence(trace: Trace | None = None) -> Forecaster:
    return Forecaster("persistence", trace)


def same_time_yesterday(trace: Trace) -> Forecaster:
    return Forecaster("same_time_yesterday", trace)


def noisy(trace: Trace, error: ForecastError | None = None) -> Forecaster:
    return Forecaster("noisy", trace, error or ForecastError())


def recorded(forecasts: RecordedForecasts, trace: Trace | None = None) -> Forecaster:
    return Forecaster("recorded", trace, recorded=forecasts)


def make_forecaster(
    name: str,
    trace: Trace | None,
    error: ForecastError | None = None,
    forecasts: RecordedForecasts | None = None,
) -> Forecaster:
    """A forecaster by name; "recorded" replays ``forecasts`` (pilot.energy.sources.record.
    read_forecasts)."""
    if name == "perfect":
        return perfect(trace)
    if name == "persistence":
        return persistence(trace)
    if name == "same_time_yesterday":
        return same_time_yesterday(trace)
    if name == "noisy":
        return noisy(trace, error)
    if name == "recorded":
        if forecasts is None:
            raise ValueError(
                'forecaster "recorded" needs a live run\'s forecasts.csv (--forecasts)'
            )
        return recorded(forecasts, trace)
    raise ValueError(
        f"unknown forecaster {name!r}; use persistence, noisy, same_time_yesterday, recorded"
        " or perfect"
    )


def forecast_error(sites_config: SitesConfig) -> ForecastError:
    """The noisy forecaster's error model from a sites config's [policy] knobs."""
    return ForecastError(
        time_s=sites_config.forecast_time_error_s,
        level=sites_config.forecast_level_error,
        seed=sites_config.forecast_seed,
    )
