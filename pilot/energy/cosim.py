"""Vessim co-simulation of the sites' grids, publishing curtailment signals into Redis.

One Vessim microgrid per site: the site's MCI as grid signal ``mci``, read at each tick from
the site's signal source (pilot.energy.sources: a trace replay, or a live WattTime / Electricity
Maps feed), one consumer actor ``gpu`` whose power is what the site reports in ``power:<s>``
(W, or a power-model state word "off" | "idle" | "train"; absent = off), and a
GridConnection that balances it. A controller publishes every tick (``meta``, ``site:<s>``,
``signals``, ``forecast:<s>``) and paces the run: Vessim's live mode has no speed-up, so we
run a study and sleep so that simulated time advances ``speedup`` times faster than wall
time (0 = as fast as possible; live sources run at 1).

A site whose source has no fresh value is *stale*: published without ``mci`` and with
``curtailed`` 0 and ``stale`` 1, its forecast removed, so the ServerApp's policy counts it
as not curtailed (pilot.control.policy.Policy.step treats a site missing from ``mci`` so); a
``fault`` event marks each site going stale. Vessim holds the last value it saw.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import vessim as vs

from pilot.config.sites import Site, SitesConfig
from pilot.energy.clock import Clock
from pilot.energy.sources.base import Reading, Source
from pilot.energy.sources.record import SignalRecord, forecaster
from pilot.energy.sources.trace import TraceSource
from pilot.energy.traces import Trace, iso
from pilot.infra.signals import Signals

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
    forecaster: str = "persistence"
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


class SiteMci(vs.Signal):
    """A site's MCI as its source gives it at each tick, rounded as published. Keeps the
    tick's reading for the publisher, so Vessim, Redis and the record see one value; on
    stale ticks Vessim, which needs a finite number, holds the last value seen (0 before)."""

    def __init__(self, source: Source, region: str, start: float):
        self.source, self.region, self.t0 = source, region, start
        self.reading: Reading | None = None
        self.held = 0.0

    def __repr__(self) -> str:
        return f"SiteMci({self.source.kind}:{self.region})"

    def at(self, elapsed: timedelta | float | None = None) -> float:
        s = elapsed.total_seconds() if isinstance(elapsed, timedelta) else float(elapsed or 0)
        self.reading = self.source.reading(self.region, self.t0 + s)
        if self.reading is not None:
            self.held = round(self.reading.mci, 3)
        return self.held


class Publisher(vs.Controller):
    """Publishes each tick into Redis and paces the run against the wall clock."""

    def __init__(
        self,
        signals: Signals,
        sites: SitesConfig,
        mci: dict[str, SiteMci],
        cfg: SimConfig,
        stop: threading.Event,
        verbose: bool = True,
        record: SignalRecord | None = None,
        clock: Clock | None = None,
    ):
        self.signals, self.sites, self.mci, self.cfg = signals, sites, mci, cfg
        self.stop = stop
        self.verbose = verbose
        self.record = record
        self.clock = clock  # None: anchored at the wall instant the run starts
        self.energy_wh = {s.name: 0.0 for s in sites.sites}
        self.last_curtailed: dict[str, bool] = {}
        self.transitions: list[tuple[float, str, bool]] = []  # (t, site, curtailed)
        self.stale: set[str] = set()
        self.ticks = 0
        self.wall_start = 0.0
        self._last_print = -math.inf

    def start(self, environment: vs.Environment) -> None:
        if self.clock is None:
            self.clock = Clock(self.cfg.start, time.time(), self.cfg.speedup)
        self.wall_start = self.clock.wall_at(self.cfg.start)
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
            sources={s.name: s.source for s in self.sites.sites},
        )
        self.signals.event("energy_sim", status="running", start=self.cfg.start, end=self.cfg.end)

    def step(self, now: datetime, microgrid_states: dict[str, vs.MicrogridState]) -> None:
        if self.stop.is_set():
            raise Stopped()
        t = pd.Timestamp(now).timestamp()
        states, forecasts, seen = {}, {}, {}
        for site in self.sites.sites:
            ms = microgrid_states[site.name]
            reading = self.mci[site.name].reading
            power_w = -float(ms["actor_states"]["gpu"]["power"])
            # energy over the tick that starts now (setpoints are held for one step)
            self.energy_wh[site.name] += power_w * min(self.cfg.step_s, self.cfg.end - t) / 3600.0
            st: dict[str, Any] = {
                "power_w": round(power_w, 3),
                "energy_wh": round(self.energy_wh[site.name], 6),
                "stale": reading is None,
            }
            if reading is None:
                curtailed = False
                self._went_stale(t, site)
            else:
                self.stale.discard(site.name)
                mci = float(ms["grid_signals"]["mci"])  # the reading, as Vessim saw it
                curtailed = mci < self.cfg.threshold
                st.update(mci=mci, observed_at=reading.time)
                forecasts[site.name] = reading.forecast
            st["curtailed"] = curtailed
            seen[site.region] = st.get("mci")
            if self.last_curtailed.get(site.name) != curtailed:
                self.transitions.append((t, site.name, curtailed))
                self.last_curtailed[site.name] = curtailed
            states[site.name] = st
        self._forget_stale(set(states) - set(forecasts))
        self.signals.publish_tick(t, states, forecasts)
        if self.record is not None:
            self.record.tick(t, seen)
        self.ticks += 1
        self._progress(t, states)
        self._pace(t + self.cfg.step_s)

    def _went_stale(self, t: float, site: Site) -> None:
        if site.name in self.stale:
            return
        self.stale.add(site.name)
        why = self.mci[site.name].source.stale_reason(site.region)
        self.signals.event(
            "fault", t=t, site=site.name, error=f"signal stale ({why}): published as not curtailed"
        )

    def _forget_stale(self, names: set[str]) -> None:
        """Drop the last value and forecast of stale sites before the tick is published:
        readers must not take an old value for a current one."""
        if not names:
            return
        with self.signals.r.pipeline(transaction=True) as p:
            for s in names:
                p.hdel(self.signals.key(f"site:{s}"), "mci")
                p.delete(self.signals.key(f"forecast:{s}"))
            p.execute()

    def _pace(self, next_t: float) -> None:
        """Sleep until the wall instant of the next tick (interruptible by a stop request)."""
        if self.cfg.speedup <= 0 or next_t >= self.cfg.end:
            return
        delay = self.clock.wall_at(next_t) - time.time()
        if delay > 0 and self.stop.wait(delay):
            raise Stopped()

    def _progress(self, t: float, states: dict[str, dict[str, Any]]) -> None:
        if not self.verbose or time.monotonic() - self._last_print < PROGRESS_EVERY_S:
            return
        self._last_print = time.monotonic()
        parts = [
            f"{s} {'stale' if st['stale'] else format(st['mci'], '.0f')}"
            f"{'*' if st['curtailed'] else ' '} {st['power_w']:.0f}W"
            for s, st in states.items()
        ]
        done = 100.0 * (t - self.cfg.start) / max(1.0, self.cfg.end - self.cfg.start)
        print(
            f"[sim {iso(t)} {done:5.1f}%] " + " | ".join(parts) + "   (* = curtailed)", flush=True
        )


def trace_source(sites: SitesConfig, trace: Trace, cfg: SimConfig) -> TraceSource:
    """Replay of ``trace`` over the run's span, forecast by the configured forecaster."""
    trace.require(cfg.start, cfg.end)
    return TraceSource(trace, forecaster(sites, cfg.forecaster, trace), cfg.horizon_s)


def build(
    signals: Signals,
    sites: SitesConfig,
    trace: Trace | None,
    cfg: SimConfig,
    stop: threading.Event,
    record: Path | None = None,
    verbose: bool = True,
    *,
    sources: dict[str, Source] | None = None,
    signal_record: SignalRecord | None = None,
    clock: Clock | None = None,
):
    """The Vessim environment, its publisher and its recorder (not yet run). ``sources``
    ({site: started source}) default to replaying ``trace``; ``clock`` (tests) anchors the
    run's pacing instead of the wall instant it starts."""
    if sources is None:
        if trace is None:
            raise ValueError("energy simulation: give a trace or the sites' sources")
        src = trace_source(sites, trace, cfg)
        sources = {s.name: src for s in sites.sites}
    env = vs.Environment(
        sim_start=pd.Timestamp(cfg.start, unit="s", tz="UTC"),
        step_size=cfg.step_s,
        name=f"curtail-{cfg.run}",
    )
    mci = {s.name: SiteMci(sources[s.name], s.region, cfg.start) for s in sites.sites}
    for site in sites.sites:
        env.add_microgrid(
            name=site.name,
            actors=[vs.Consumer("gpu", SitePower(signals, site))],
            dispatchables=[vs.GridConnection()],
            grid_signals={"mci": mci[site.name]},
        )
    publisher = env.add_controller(
        Publisher(signals, sites, mci, cfg, stop, verbose, signal_record, clock)
    )
    # timeseries only when written to disk: in memory it would grow without bound
    recorder = env.add_controller(vs.Recorder(record, timeseries=record is not None))
    return env, publisher, recorder


def run(
    signals: Signals,
    sites: SitesConfig,
    trace: Trace | None,
    cfg: SimConfig,
    stop: threading.Event | None = None,
    record: Path | None = None,
    verbose: bool = True,
    *,
    sources: dict[str, Source] | None = None,
    signal_record: SignalRecord | None = None,
    clock: Clock | None = None,
) -> dict[str, Any]:
    """Run to the end of the requested span (status "finished") or until ``stop`` is set
    (status "stopped"); a crash leaves status "failed". Returns a summary. The caller
    starts and closes ``sources`` (pilot.energy.sources.open_sources)."""
    stop = stop or threading.Event()
    env, pub, rec = build(
        signals,
        sites,
        trace,
        cfg,
        stop,
        record,
        verbose,
        sources=sources,
        signal_record=signal_record,
        clock=clock,
    )
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
