"""Seeded synthetic marginal carbon intensity traces, shaped like real ones.

A diurnal solar dip below the curtailment threshold around each region's local midday, slow
wind swings, short-term noise and wind gusts; by default turned into marginal-emission levels
(low inside windows, fossil levels outside, jumps at the edges). Write one to a CSV with
``python -m pilot.energy.trace_cli synth``.
"""

from __future__ import annotations

import math

import numpy as np

from pilot.energy.traces import DAY_S, Trace, TraceError, parse_time

# Standard-time UTC offsets (hours) used to place the synthetic solar dip at local midday.
REGION_UTC_OFFSET_H = {"CAISO_NORTH": -8.0, "SPP_TX": -6.0, "NEM_SA": 9.5, "DE": 1.0}
# Synthetic model hyperparameters: night-time level per region (gCO2/kWh, marginal gas/coal
# mixes), depth of the midday solar dip, wind variability. Unknown regions use the default.
SYNTH_BASE = {"CAISO_NORTH": 380.0, "SPP_TX": 520.0, "NEM_SA": 430.0, "DE": 560.0}
SYNTH_BASE_DEFAULT = 450.0
SYNTH_LOW_FRAC = 0.45  # the dip bottoms out at ~45% of the threshold on a clear day
SYNTH_WIND_G = 45.0  # amplitude of slow wind swings
SYNTH_NOISE_G = 6.0  # short-term noise: makes the signal flicker near the threshold
SYNTH_RANGE = (20.0, 900.0)
# Wind gusts: a burst of wind pushes a renewable unit onto the margin for minutes, so MCI drops
# below the threshold briefly at any hour (clusters of 1-3 dips of 5-15 minutes, 10-20 minutes
# apart: short windows and flicker around the threshold), SYNTH_GUSTS_PER_DAY bursts per
# region-day on average (Poisson), each dip down to 40-95% of the threshold.
SYNTH_GUSTS_PER_DAY = 3.0
SYNTH_GUST_DIP_S = (300.0, 900.0)
SYNTH_GUST_PERIOD_S = (600.0, 1200.0)
SYNTH_GUST_LEVEL_FRAC = (0.4, 0.95)
SYNTH_START = "2024-06-01T00:00:00Z"
# Marginal emissions (``marginal=True``): the emission rate of the one unit on the margin.
# While curtailed renewables set it, it is low; when a gas or coal unit does, it jumps to
# fossil levels within one sample. So the smooth signal's windows (below SYNTH_WINDOW_LEVEL x
# the threshold: curtailment lasts longer than the dip of an average, gaps shorter than
# SYNTH_MIN_GAP_S merged, windows shorter than SYNTH_MIN_WINDOW_S dropped) are set to
# SYNTH_CLEAN_FRAC of it, the rest is lifted to fossil levels (at least SYNTH_FOSSIL_MIN_G),
# and windows hold short excursions (a gas unit briefly on the margin):
# SYNTH_EXCURSIONS_PER_H per window hour, each 1-2 samples at SYNTH_EXCURSION_G.
SYNTH_WINDOW_LEVEL = 1.6  # windows: where the smooth signal is below this x the threshold
SYNTH_CLEAN_FRAC = 0.45
SYNTH_MIN_GAP_S = 5400.0
SYNTH_MIN_WINDOW_S = 3600.0
SYNTH_FOSSIL_SCALE = 1.5
SYNTH_FOSSIL_MIN_G = 450.0
SYNTH_EXCURSIONS_PER_H = 0.1
SYNTH_EXCURSION_G = (150.0, 450.0)


def synthetic(
    regions: list[str],
    hours: float,
    seed: int,
    start: float | str | None = None,
    step_s: float = 300.0,
    threshold: float = 100.0,
    utc_offsets: dict[str, float] | None = None,
    gusts: bool = True,
    marginal: bool = True,
) -> Trace:
    """Seeded synthetic MCI: a diurnal solar dip below ``threshold`` around each region's local
    midday (depth varies day to day: some days are cloudy), slow wind swings and short-term
    noise, clipped to a realistic 20..900 g/kWh, and (``gusts``) wind gusts: short dips below
    the threshold at any hour, some in flickering clusters (see SYNTH_GUST_*). Vectorised over
    regions and time. The gusts draw from their own random stream: ``gusts=False`` gives the
    smooth trace of the same seed (the bundled configs/traces/synthetic-3site.csv is seed 44
    without gusts). ``marginal`` (default) turns the smooth shape into what real marginal
    emissions look like (see SYNTH_CLEAN_FRAC): jumps at the windows' edges, short excursions
    inside them; ``marginal=False`` keeps the smooth, average-intensity-like shape."""
    offsets = {**REGION_UTC_OFFSET_H, **(utc_offsets or {})}
    unknown = [r for r in regions if r not in offsets]
    if unknown:
        raise TraceError(
            f"no UTC offset known for region(s) {', '.join(unknown)}; pass utc_offsets "
            f"(CLI: --utc-offset {unknown[0]}=+2)"
        )
    t0 = parse_time(SYNTH_START if start is None else start)
    n = int(round(hours * 3600 / step_s)) + 1
    times = t0 + np.arange(n) * step_s
    rng = np.random.default_rng(seed)
    R = len(regions)
    off = np.array([offsets[r] for r in regions])[:, None]
    base = np.array([SYNTH_BASE.get(r, SYNTH_BASE_DEFAULT) for r in regions])[:, None]
    base = base * rng.uniform(0.9, 1.1, (R, 1))
    local_h = ((times[None, :] / 3600.0 + off) % 24.0 + 24.0) % 24.0
    local_day = np.floor((times[None, :] / 3600.0 + off) / 24.0)
    # solar shape: 0 outside 06-18 local, 1 at 12:00; ^1.5 narrows the dip to a few hours
    sun = np.clip(np.sin(np.pi * (local_h - 6.0) / 12.0), 0.0, None) ** 1.5
    days = local_day - local_day.min()
    n_days = int(days.max()) + 1
    clear = rng.uniform(0.95, 1.15, (R, n_days))  # day-to-day cloudiness
    depth = np.take_along_axis(clear, days.astype(int), axis=1)
    low = SYNTH_LOW_FRAC * threshold
    mci = base - (base - low) * np.clip(sun * depth, 0.0, 1.0)
    # slow wind: a few random sinusoids with periods of 6..48 h
    t_h = (times - t0)[None, :] / 3600.0
    for _ in range(4):
        period = rng.uniform(6.0, 48.0, (R, 1))
        phase = rng.uniform(0.0, 2 * np.pi, (R, 1))
        mci += SYNTH_WIND_G / 2 * np.sin(2 * np.pi * t_h / period + phase) * (1.0 - 0.7 * sun)
    # short-term noise, lightly smoothed (3-sample moving average)
    noise = rng.normal(0.0, SYNTH_NOISE_G * math.sqrt(3), (R, n + 2))
    mci += (noise[:, :-2] + noise[:, 1:-1] + noise[:, 2:]) / 3.0
    mci = np.clip(mci, *SYNTH_RANGE)
    if marginal:
        mci = _marginal(np.random.default_rng([seed, 2]), mci, times, threshold)
    if gusts:
        mci = np.minimum(mci, _gust_levels(np.random.default_rng([seed, 1]), R, times, threshold))
    return Trace(times, list(regions), mci)


def _marginal(
    rng: np.random.Generator, smooth: np.ndarray, times: np.ndarray, threshold: float
) -> np.ndarray:
    """Marginal-emission levels from a smooth signal (see SYNTH_CLEAN_FRAC)."""
    step = float(times[1] - times[0]) if times.size > 1 else 300.0
    inside = np.stack([_merged_runs(row < SYNTH_WINDOW_LEVEL * threshold, step) for row in smooth])
    clean = np.minimum(smooth * SYNTH_CLEAN_FRAC, 0.95 * threshold)
    fossil = np.clip(smooth * SYNTH_FOSSIL_SCALE, SYNTH_FOSSIL_MIN_G, SYNTH_RANGE[1])
    out = np.where(inside, clean, fossil)
    # excursions start at a random in-window sample and stay inside the window
    start = inside & (rng.random(inside.shape) < SYNTH_EXCURSIONS_PER_H * step / 3600.0)
    length = rng.integers(1, 3, inside.shape)
    level = rng.uniform(*SYNTH_EXCURSION_G, inside.shape)
    for r, k in zip(*np.nonzero(start), strict=True):
        span = slice(k, k + int(length[r, k]))
        out[r, span] = np.where(inside[r, span], level[r, k], out[r, span])
    return out


def _merged_runs(below: np.ndarray, step: float) -> np.ndarray:
    """``below`` with gaps shorter than SYNTH_MIN_GAP_S filled and runs shorter than
    SYNTH_MIN_WINDOW_S removed."""
    out = below.copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], below.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2], strict=True))  # [start, end) sample indices
    for (_, e0), (s1, _) in zip(runs, runs[1:], strict=False):
        if (s1 - e0) * step < SYNTH_MIN_GAP_S:
            out[e0:s1] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[0], out.astype(np.int8), [0]])))
    for s0, e0 in zip(edges[::2], edges[1::2], strict=True):
        if (e0 - s0) * step < SYNTH_MIN_WINDOW_S:
            out[s0:e0] = False
    return out


def _gust_levels(
    rng: np.random.Generator, R: int, times: np.ndarray, threshold: float
) -> np.ndarray:
    """(R, n) MCI ceilings from wind gusts (inf where none): per region a Poisson number of
    bursts at uniform times, each 1-3 dips; a dip covers at least one sample."""
    n, step = times.size, float(times[1] - times[0]) if times.size > 1 else 300.0
    out = np.full((R, n), np.inf)
    span = float(times[-1] - times[0])
    counts = rng.poisson(SYNTH_GUSTS_PER_DAY * span / DAY_S, R)
    E = int(counts.sum())
    if E == 0:
        return out
    reg = np.repeat(np.arange(R), counts)
    t_ev = rng.uniform(0.0, span, E)
    n_dips = rng.integers(1, 4, E)
    period = rng.uniform(*SYNTH_GUST_PERIOD_S, E)
    for j in range(3):
        dur = np.minimum(rng.uniform(*SYNTH_GUST_DIP_S, E), period - 300.0)
        level = rng.uniform(*SYNTH_GUST_LEVEL_FRAC, E) * threshold
        on = n_dips > j
        i0 = np.round((t_ev + j * period) / step).astype(np.int64)
        m = np.maximum(1, np.round(dur / step).astype(np.int64))
        for o in range(int(m.max())):
            sel = on & (o < m) & (i0 + o < n)
            np.minimum.at(out, (reg[sel], i0[sel] + o), level[sel])
    return out
