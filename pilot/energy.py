"""Vessim co-simulation of the sites' grids, publishing curtailment signals into Redis.

One Vessim microgrid per site: the site's MCI trace as grid signal ``mci``, one consumer actor
``gpu`` whose power is what the site reports in ``power:<s>`` (W, or a power-model state word
"off" | "idle" | "train"; absent = off), and a GridConnection that balances it. A controller
publishes every tick (``meta``, ``site:<s>``, ``signals``, ``forecast:<s>``) and paces the run:
Vessim's live mode has no speed-up, so we run a study and sleep so that simulated time advances
``speedup`` times faster than wall time (0 = as fast as possible).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import vessim as vs

from pilot.policy import make_forecaster
from pilot.signals import Signals
from pilot.sites import Site, SitesConfig
from pilot.traces import Trace, iso

PROGRESS_EVERY_S = 2.0  # wall seconds between progress lines


class Stopped(Exception):
    """Raised inside the simulation loop when a stop was requested (SIGINT/SIGTERM)."""


@dataclass(frozen=True)
class SimConfig:
    run: str
    start: float  # sim epoch seconds of tick 0
    hours: float
    step_s: int = 60
    speedup: float = 1.0  # sim seconds per wall second; 0 = as fast as possible
    threshold: float = 100.0
    forecaster: str = "perfect"
    horizon_s: float = 3600.0
    trace_source: str = ""  # the trace file(s) replayed, published so reports use the same one

    @property
    def end(self) -> float:
        return self.start + self.hours * 3600.0


class SitePower(vs.Signal):
    """A site's draw in W as it reports it in Redis, mapped through its power model."""

    def __init__(self, signals: Signals, site: Site):
        self.signals = signals
        self.site = site
        self.model_w = {"off": 0.0, "idle": site.idle_kw * 1000.0, "train": site.train_kw * 1000.0}

    def __repr__(self) -> str:
        return f"SitePower({self.site.name})"

    def at(self, elapsed=None) -> float:
        v = self.signals.power(self.site.name)
        if v is None:
            return 0.0
        return self.model_w[v] if isinstance(v, str) else float(v)


class Publisher(vs.Controller):
    """Publishes each tick into Redis and paces the run against the wall clock."""

    def __init__(
        self,
        signals: Signals,
        sites: SitesConfig,
        trace: Trace,
        cfg: SimConfig,
        stop: threading.Event,
        verbose: bool = True,
    ):
        self.signals, self.sites, self.trace, self.cfg = signals, sites, trace, cfg
        self.stop = stop
        self.verbose = verbose
        self.forecaster = make_forecaster(cfg.forecaster, trace)
        self.energy_wh = {s.name: 0.0 for s in sites.sites}
        self.last_curtailed: dict[str, bool] = {}
        self.transitions: list[tuple[float, str, bool]] = []  # (t, site, curtailed)
        self.ticks = 0
        self.wall_start = 0.0
        self._last_print = -math.inf

    def start(self, environment: vs.Environment) -> None:
        self.wall_start = time.time()
        self.signals.reset_published(self.sites.names)
        self.signals.publish_meta(
            sim_start=repr(self.cfg.start),
            wall_start=repr(self.wall_start),
            sim_time=repr(self.cfg.start),
            wall_time=repr(self.wall_start),
            speedup=self.cfg.speedup,
            status="running",
            sites=self.sites.names,
            regions=self.sites.regions,
            threshold=self.cfg.threshold,
            step_s=self.cfg.step_s,
            end=repr(self.cfg.end),
            horizon_s=self.cfg.horizon_s,
            forecaster=self.cfg.forecaster,
            trace=self.cfg.trace_source,
        )
        self.signals.event("energy_sim", status="running", start=self.cfg.start, end=self.cfg.end)

    def step(self, now: datetime, microgrid_states: dict[str, vs.MicrogridState]) -> None:
        if self.stop.is_set():
            raise Stopped()
        t = pd.Timestamp(now).timestamp()
        states, forecasts = {}, {}
        for site in self.sites.sites:
            ms = microgrid_states[site.name]
            mci = round(float(ms["grid_signals"]["mci"]), 3)  # as published: one truth
            power_w = -float(ms["actor_states"]["gpu"]["power"])
            # energy over the tick that starts now (setpoints are held for one step)
            self.energy_wh[site.name] += power_w * min(self.cfg.step_s, self.cfg.end - t) / 3600.0
            curtailed = mci < self.cfg.threshold
            if self.last_curtailed.get(site.name) != curtailed:
                self.transitions.append((t, site.name, curtailed))
                self.last_curtailed[site.name] = curtailed
            states[site.name] = {
                "mci": mci,
                "curtailed": curtailed,
                "power_w": round(power_w, 3),
                "energy_wh": round(self.energy_wh[site.name], 6),
            }
            forecasts[site.name] = self.forecaster.forecast(site.region, t, self.cfg.horizon_s, mci)
        self.signals.publish_tick(t, states, forecasts)
        self.ticks += 1
        self._progress(t, states)
        self._pace(t + self.cfg.step_s)

    def _pace(self, next_t: float) -> None:
        """Sleep until the wall instant of the next tick (interruptible by a stop request)."""
        if self.cfg.speedup <= 0 or next_t >= self.cfg.end:
            return
        delay = self.wall_start + (next_t - self.cfg.start) / self.cfg.speedup - time.time()
        if delay > 0 and self.stop.wait(delay):
            raise Stopped()

    def _progress(self, t: float, states: dict[str, dict[str, Any]]) -> None:
        if not self.verbose or time.monotonic() - self._last_print < PROGRESS_EVERY_S:
            return
        self._last_print = time.monotonic()
        parts = [
            f"{s} {st['mci']:.0f}{'*' if st['curtailed'] else ' '} {st['power_w']:.0f}W"
            for s, st in states.items()
        ]
        done = 100.0 * (t - self.cfg.start) / max(1.0, self.cfg.end - self.cfg.start)
        print(
            f"[sim {iso(t)} {done:5.1f}%] " + " | ".join(parts) + "   (* = curtailed)", flush=True
        )


def vessim_trace(trace: Trace, region: str, cfg: SimConfig) -> vs.Trace:
    """The region's MCI on the simulation's tick grid, offset-indexed from tick 0. Vessim's
    Trace holds values between samples (ffill); sampling our linear interpolation at every
    tick makes Vessim see exactly the interpolated trace."""
    offsets = np.arange(0.0, cfg.hours * 3600.0 + cfg.step_s, cfg.step_s)
    ts = np.minimum(cfg.start + offsets, trace.end)
    return vs.Trace(pd.Series(trace.series(region, ts), index=offsets, name=region), repr_=region)


def build(
    signals: Signals,
    sites: SitesConfig,
    trace: Trace,
    cfg: SimConfig,
    stop: threading.Event,
    record: Path | None = None,
    verbose: bool = True,
):
    """The Vessim environment, its publisher and its recorder (not yet run)."""
    trace.require(cfg.start, cfg.end)
    env = vs.Environment(
        sim_start=pd.Timestamp(cfg.start, unit="s", tz="UTC"),
        step_size=cfg.step_s,
        name=f"curtail-{cfg.run}",
    )
    for site in sites.sites:
        env.add_microgrid(
            name=site.name,
            actors=[vs.Consumer("gpu", SitePower(signals, site))],
            dispatchables=[vs.GridConnection()],
            grid_signals={"mci": vessim_trace(trace, site.region, cfg)},
        )
    publisher = env.add_controller(Publisher(signals, sites, trace, cfg, stop, verbose))
    # timeseries only when written to disk: in memory it would grow without bound
    recorder = env.add_controller(vs.Recorder(record, timeseries=record is not None))
    return env, publisher, recorder


def run(
    signals: Signals,
    sites: SitesConfig,
    trace: Trace,
    cfg: SimConfig,
    stop: threading.Event | None = None,
    record: Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run to the end of the requested span (status "finished") or until ``stop`` is set
    (status "stopped"); a crash leaves status "failed". Returns a summary."""
    stop = stop or threading.Event()
    env, pub, rec = build(signals, sites, trace, cfg, stop, record, verbose)
    status = "failed"
    try:
        env.run(until=int(round(cfg.hours * 3600)))
        status = "finished"
    except Stopped:
        status = "stopped"
    finally:
        signals.publish_meta(status=status, wall_time=repr(time.time()))
        signals.event("energy_sim", status=status, ticks=pub.ticks)
    consumed = (
        {s: rec.metrics["actors"][s]["gpu"]["energy_consumed"] for s in sites.names}
        if rec.collect_metrics
        else {}
    )
    return {
        "status": status,
        "ticks": pub.ticks,
        "energy_wh": dict(pub.energy_wh),
        "vessim_energy_wh": consumed,
        "transitions": list(pub.transitions),
        "wall_s": time.time() - pub.wall_start,
    }
