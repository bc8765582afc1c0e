"""Energy co-simulation: per-site MCI + power in Vessim, published into Redis.

    CURTAIL_REDIS_URL=redis://:PW@127.0.0.1:6379/0 \\
        python energy_simulation.py --sites configs/sites.toml --run demo --speedup 60

--speedup 1 runs in real time, S > 1 runs S times faster, 0 as fast as possible. SIGINT or
SIGTERM stop it cleanly (meta.status = stopped); the end of the span sets status = finished.

Sites with ``source = "watttime"`` or ``"electricitymaps"`` read live signals (README, "Live
signals"): the run starts now, in real time, until stopped (or --hours), and records what
it saw under --record-signals (default CURTAIL_HOME/runs/<run>/signals) for replay.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from pilot.config.paths import curtail_home
from pilot.config.sites import FORECASTER_NAMES, SitesConfig, load_sites
from pilot.energy import cosim as energy
from pilot.energy.sources import open_sources
from pilot.energy.sources.record import SignalRecord
from pilot.energy.traces import Trace, load_trace, parse_time
from pilot.infra.signals import Signals, connect, redact
from pilot.launch.plan import trace_path

DEFAULT_SITES = Path(__file__).resolve().parent / "configs" / "sites.toml"
LIVE_HOURS = 24 * 365.0  # a live run goes on until stopped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default=str(DEFAULT_SITES), help="sites TOML")
    ap.add_argument(
        "--trace", default=None, help="trace CSV(s), comma-separated (default: the sites file's)"
    )
    ap.add_argument(
        "--redis-url", default=None, help="default: $CURTAIL_REDIS_URL (prefer the env var)"
    )
    ap.add_argument("--run", default="demo", help="run name: keys live under curtail:<run>:")
    ap.add_argument("--threshold", type=float, default=None, help="gCO2/kWh (default: sites file)")
    ap.add_argument("--start", default=None, help="ISO time with offset (default: trace start)")
    ap.add_argument("--hours", type=float, default=None, help="default: until the trace ends")
    ap.add_argument("--step", type=int, default=60, help="tick in simulated seconds")
    ap.add_argument("--speedup", type=float, default=1.0, help="sim s per wall s; 0 = unpaced")
    ap.add_argument("--forecaster", default=None, choices=FORECASTER_NAMES)
    ap.add_argument("--horizon", type=float, default=None, help="forecast horizon (s)")
    ap.add_argument("--record", default=None, help="directory for Vessim's experiment record")
    ap.add_argument(
        "--record-signals", default=None, help="directory for the signals seen (live: default)"
    )
    ap.add_argument("--poll", type=float, default=None, help="live: s between polls (default: 300)")
    ap.add_argument("--fresh", action="store_true", help="delete the run's existing keys first")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def replay_trace(a: argparse.Namespace, sites: SitesConfig) -> tuple[Trace | None, str]:
    """The trace replayed by the sites that have no live source (None if none), and its
    file name(s) for ``meta.trace``."""
    regions = sites.trace_regions
    if not regions:
        return None, ""
    trace_arg = a.trace.split(",") if a.trace else sites.trace
    if trace_arg is None:
        raise ValueError(f"{a.sites}: no trace; pass --trace")
    names = trace_arg if isinstance(trace_arg, list) else [trace_arg]
    # absolute, so the ServerApp's report (another process, another directory) finds them
    published = ",".join(trace_path(str(t), Path.cwd()) for t in names)
    return load_trace(trace_arg, regions=regions), published


def sim_config(
    a: argparse.Namespace, sites: SitesConfig, trace: Trace | None, trace_source: str, live: bool
) -> energy.SimConfig:
    if live and a.speedup != 1:
        raise ValueError("live signal sources run in real time: --speedup must be 1")
    if live and a.start is not None:
        raise ValueError("--start: a run with live signal sources starts now")
    if live:
        start = float(int(time.time()))
        hours = LIVE_HOURS if a.hours is None else a.hours
    else:
        assert trace is not None
        start = trace.start if a.start is None else parse_time(a.start)
        hours = (trace.end - start) / 3600.0 if a.hours is None else a.hours
    if a.step <= 0 or a.speedup < 0 or hours <= 0 or (a.poll is not None and a.poll <= 0):
        raise ValueError("--step, --hours and --poll must be > 0 and --speedup >= 0")
    cfg = energy.SimConfig(
        run=a.run,
        start=start,
        hours=hours,
        step_s=a.step,
        speedup=a.speedup,
        threshold=sites.threshold if a.threshold is None else a.threshold,
        forecaster=a.forecaster or sites.forecaster,
        horizon_s=sites.horizon_s if a.horizon is None else a.horizon,
        trace_source=trace_source,
    )
    if trace is not None:
        trace.require(cfg.start, cfg.end)
    return cfg


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # the live sources' retries and skipped values are logged (stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    record, sources = None, {}
    try:
        sites = load_sites(a.sites)
        live = sites.live
        trace, trace_source = replay_trace(a, sites)
        cfg = sim_config(a, sites, trace, trace_source, live)
        sig = Signals(connect(a.redis_url), a.run)
        rec_dir = a.record_signals or (
            curtail_home() / "runs" / a.run / "signals" if live else None
        )
        if rec_dir is not None:
            record = SignalRecord(rec_dir, [s.region for s in sites.sites], cfg.start)
            if live:  # reports and replays read what the run saw
                cfg = dataclasses.replace(cfg, trace_source=str(record.trace_path))
        replay = energy.trace_source(sites, trace, cfg) if trace is not None else None
        sources = open_sources(sites, replay, horizon_s=cfg.horizon_s, poll_s=a.poll, record=record)
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if record is not None:
            record.close()
        return 2
    if a.fresh:
        sig.clear()
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    url = a.redis_url or "$CURTAIL_REDIS_URL"
    feeds = ",".join(sorted({s.source for s in sites.sites}))
    print(
        f"energy simulation run={a.run} sites={','.join(sites.names)} sources={feeds} "
        f"redis={redact(url)} {cfg.hours:g} h from {energy.iso(cfg.start)} step={cfg.step_s}s "
        f"speedup={cfg.speedup:g}",
        flush=True,
    )
    try:
        summary = energy.run(
            sig,
            sites,
            trace,
            cfg,
            stop,
            Path(a.record) if a.record else None,
            not a.quiet,
            sources=sources,
            signal_record=record,
        )
    finally:
        for src in set(sources.values()):
            src.close()
        if record is not None:
            record.close()
    kwh = ", ".join(f"{s} {wh / 1000:.3f} kWh" for s, wh in summary["energy_wh"].items())
    print(
        f"{summary['status']}: {summary['ticks']} ticks in {summary['wall_s']:.1f} s wall; {kwh}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
