"""What a forecast says about the next curtailment window: when it opens and when it ends.

``outlook`` reads one forecast (the step policy, live); ``forecast_arrays`` gives the same
crossing times for every site and tick at once (the batch policy, what-if simulator and bench).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pilot.energy.forecast import Forecaster
from pilot.energy.traces import Trace


@dataclass(frozen=True)
class Outlook:
    """What a forecast says, seen from ``now``."""

    now_value: float  # forecast at now (to check it agrees with the measured present)
    t_open: float  # first instant >= now with forecast < threshold (inf: none in horizon)
    t_close: float  # first instant > t_open with forecast >= threshold (inf: beyond horizon)
    t_up: float = math.inf  # first rise >= threshold after t_open, short blips not merged


def outlook(
    fc: list[tuple[float, float]], threshold: float, release_s: float = 0.0
) -> Outlook | None:
    """Crossing times of the linearly interpolated forecast; None for an empty forecast.

    A rise above the threshold that the forecast shows falling back below within
    ``release_s`` does not end the window (the hysteresis would hold it open anyway)."""
    if not fc:
        return None
    t_open = up = t_up = math.inf
    t_prev, v_prev = fc[0]
    if v_prev < threshold:
        t_open = t_prev
    for t, v in fc[1:]:
        if t_open == math.inf:
            if v_prev >= threshold > v:
                t_open = t_prev + (v_prev - threshold) / (v_prev - v) * (t - t_prev)
        elif up == math.inf:
            if v_prev < threshold <= v:
                up = t_prev + (threshold - v_prev) / (v - v_prev) * (t - t_prev)
                t_up = min(t_up, up)
        elif v_prev >= threshold > v:
            down = t_prev + (v_prev - threshold) / (v_prev - v) * (t - t_prev)
            if down - up >= release_s:
                break  # a long enough gap: the window really ends at ``up``
            up = math.inf  # a short blip above: the window goes on
        t_prev, v_prev = t, v
    return Outlook(fc[0][1], t_open, up, t_up)


@dataclass
class ForecastArrays:
    """Per (site, tick) outlook, the array form of ``outlook`` (NaN now_value: no forecast)."""

    now_value: np.ndarray  # (S, K)
    t_open: np.ndarray  # (S, K), inf = no window within the horizon
    t_close: np.ndarray  # (S, K), inf = beyond the horizon
    t_up: np.ndarray | None = None  # (S, K) Outlook.t_up; None: t_close


def forecast_arrays(
    fc: Forecaster,
    trace: Trace,
    regions: list[str],
    ticks: np.ndarray,
    horizon_s: float,
    threshold: float,
    release_s: float = 0.0,
    mci: np.ndarray | None = None,
) -> ForecastArrays:
    """``outlook(fc.forecast(region, t, horizon_s), threshold, release_s)`` for every site and
    tick, on arrays. ``mci`` (S, K): measured values (what persistence forecasts).

    Crossings live on the forecast's segments; "next crossing at or after segment j" tables are
    reverse running minima, so every (site, tick) query is a gather, not a Python loop."""
    S, K = len(regions), len(ticks)
    if fc.per_tick:
        return _outlook_arrays(fc, regions, ticks, horizon_s, threshold, release_s, mci)
    if fc.kind == "persistence":
        cur = trace.series_all(ticks, regions) if mci is None else mci
        t_open = np.where(cur < threshold, ticks[None, :], np.inf)
        return ForecastArrays(cur.copy(), t_open, np.full((S, K), np.inf), np.full((S, K), np.inf))
    g_times = trace.times + fc.shift_s
    avail = (ticks >= g_times[0]) & (ticks <= g_times[-1])
    out = ForecastArrays(*(np.full((S, K), v) for v in (np.nan, np.inf, np.inf, np.inf)))
    if not avail.any():
        return out
    tk = ticks[avail]
    h_end = np.minimum(tk + horizon_s, g_times[-1])
    # only the samples these ticks can see (bounded memory when the caller chunks)
    lo = min(max(0, int(np.searchsorted(g_times, tk[0], side="right")) - 1), len(g_times) - 2)
    hi = max(min(len(g_times), int(np.searchsorted(g_times, h_end[-1], side="left")) + 1), lo + 2)
    g = trace.values[:, lo:hi][[trace.index(r) for r in regions]]  # (S, n), slice first
    now_v, t_open, t_close, t_up = _series_outlooks(
        g_times[lo:hi], g, tk, h_end, threshold, release_s
    )
    out.now_value[:, avail], out.t_open[:, avail], out.t_close[:, avail] = now_v, t_open, t_close
    out.t_up[:, avail] = t_up
    return out


def _series_outlooks(
    gt: np.ndarray,
    g: np.ndarray,
    tk: np.ndarray,
    h_end: np.ndarray,
    threshold: float,
    release_s: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(now_value, t_open, t_close, t_up), each (S, len(tk)), of the series ``g`` (S, n)
    sampled at ``gt`` and seen from the ticks ``tk`` up to ``h_end``."""
    n = gt.size
    big = n - 1  # "no such segment": a padding column of inf
    seg_dt = np.diff(gt)
    down_t, up_t = _crossings(gt, seg_dt, g, threshold)
    idx = np.arange(n)
    nd, nu = _next_at_or_after(np.isfinite(down_t)), _next_at_or_after(np.isfinite(up_t))
    # gap after each up crossing until the next down crossing; long gaps really end a window
    down_after = _take(down_t, nd[:, np.minimum(idx + 1, big)])
    with np.errstate(invalid="ignore"):  # inf - inf where there is no crossing
        nul = _next_at_or_after(np.isfinite(up_t) & (down_after - up_t >= release_s))
    last_down = np.maximum.accumulate(np.where(np.isfinite(down_t), idx, -1), axis=1)

    seg = np.clip(np.searchsorted(gt, tk, side="right") - 1, 0, n - 2)[None, :]  # tick's segment
    w = (tk - gt[seg]) / seg_dt[seg]
    now_v = g[:, seg[0]] * (1.0 - w) + g[:, seg[0] + 1] * w
    below = now_v < threshold
    # open now, or at the next down crossing (one in the tick's own segment lies after it)
    j_down = nd[:, seg[0]]
    t_open = np.where(below, tk[None, :], _take(down_t, j_down))
    seg_open = np.where(below, seg, j_down)
    # the window ends at the first up crossing followed by a long gap, or by no down crossing
    # the forecast can see (none up to h_end: segments after the last down <= h_end)
    e = np.clip(np.searchsorted(gt, h_end, side="right") - 1, 0, n - 2)[None, :]
    down_e = down_t[:, e[0]] <= h_end[None, :]
    q = np.where(down_e, e, last_down[:, np.maximum(e[0] - 1, 0)])
    q = np.where((e == 0) & ~down_e, -1, q)
    first_up = _take(nu, seg_open)
    unseen = _take(nu, np.minimum(np.maximum(q + 1, seg_open), big))
    t_close = _take(up_t, np.minimum(_take(nul, first_up), unseen))
    t_open = np.where(t_open <= h_end[None, :], t_open, np.inf)
    t_close = np.where(np.isfinite(t_open) & (t_close <= h_end[None, :]), t_close, np.inf)
    t_up = _take(up_t, first_up)
    t_up = np.where(np.isfinite(t_open) & (t_up <= h_end[None, :]), t_up, np.inf)
    return now_v, t_open, t_close, t_up


def _crossings(
    gt: np.ndarray, seg_dt: np.ndarray, g: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(S, n) times of the down and up crossings of the threshold on each segment (inf: none),
    with a padding column of inf at the end."""
    v0, v1 = g[:, :-1], g[:, 1:]
    pad = np.full((g.shape[0], 1), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        down = (v0 >= threshold) & (v1 < threshold)
        up = (v0 < threshold) & (v1 >= threshold)
        down_t = np.hstack(
            [np.where(down, gt[:-1] + (v0 - threshold) / (v0 - v1) * seg_dt, np.inf), pad]
        )
        up_t = np.hstack(
            [np.where(up, gt[:-1] + (threshold - v0) / (v1 - v0) * seg_dt, np.inf), pad]
        )
    return down_t, up_t


def _next_at_or_after(mask: np.ndarray) -> np.ndarray:
    """Row-wise index of the first True at or after each column (the last column if none)."""
    n = mask.shape[1]
    return np.minimum.accumulate(np.where(mask, np.arange(n), n - 1)[:, ::-1], axis=1)[:, ::-1]


def _outlook_arrays(
    fc: Forecaster,
    regions: list[str],
    ticks: np.ndarray,
    horizon_s: float,
    threshold: float,
    release_s: float,
    mci: np.ndarray | None,
) -> ForecastArrays:
    """``forecast_arrays`` one forecast at a time, through ``outlook`` itself (a forecast
    issued at each tick: ~20 us per site and tick)."""
    S, K = len(regions), len(ticks)
    out = ForecastArrays(*(np.full((S, K), v) for v in (np.nan, np.inf, np.inf, np.inf)))
    for i, region in enumerate(regions):
        for k, now in enumerate(ticks):
            cur = None if mci is None else float(mci[i, k])
            ol = outlook(fc.forecast(region, float(now), horizon_s, cur), threshold, release_s)
            if ol is not None:
                out.now_value[i, k], out.t_open[i, k] = ol.now_value, ol.t_open
                out.t_close[i, k], out.t_up[i, k] = ol.t_close, ol.t_up
    return out


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Row-wise gather: ``out[s, k] = a[s, idx[s, k]]``."""
    return np.take_along_axis(a, idx, axis=1)
